"""Mesh policies: good defaults without a file, the TOML file's shape and merging, and every
invalid or unknown key refused at start-up with the full key in the message."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from mesh.core.backoff import ExponentialBackoff
from mesh.core.outcome import DEFAULT, Outcome
from mesh.policy import (
    POLICY_ENV,
    BreakerPolicy,
    BudgetPolicy,
    BulkheadPolicy,
    EjectionPolicy,
    HedgePolicy,
    MeshPolicy,
    MethodPolicy,
    PolicyError,
    ServicePolicy,
    load_policy,
    load_policy_from_env,
)
from mesh.resilience.faults import FaultPolicy
from mesh.resilience.retry import RetryPolicy

C = grpc.StatusCode

EXAMPLE = """
[defaults]                 # applies to every service
timeout = 10.0
[defaults.retry]
max_attempts = 3
[services.catalog]
balancer = "p2c"
timeout = 2.0
[services.catalog.retry]
max_attempts = 4
retryable_codes = ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
backoff_base = 0.025
backoff_cap = 0.25
per_attempt_timeout = 0.5
[services.catalog.budget]
ratio = 0.2
[services.catalog.ejection]
consecutive_failures = 5
[services.catalog.breaker]
failure_rate_threshold = 0.5
[services.catalog.bulkhead]
max_concurrent = 1024
[services.catalog.fault]
delay_seconds = 0.1
delay_percent = 10
[services.catalog.methods.GetItem]
timeout = 0.5
idempotent = true
hedge = { delay = 0.05, max_hedges = 1 }
"""


def test_defaults_without_a_file() -> None:
    policy = load_policy(None)
    assert policy == MeshPolicy()
    service = policy.for_service("anything")
    assert service.balancer == "p2c"
    assert service.budget == BudgetPolicy(ratio=0.2, min_retries_per_second=10, ttl=10.0)
    assert service.ejection == EjectionPolicy(
        consecutive_failures=5, base_time=30.0, max_time=300.0, max_ejection_percent=50.0,
        jitter=0.1,
    )  # fmt: skip
    assert service.breaker == BreakerPolicy(
        failure_rate_threshold=0.5, minimum_calls=20, window=10.0, open_time=5.0,
        half_open_calls=3,
    )  # fmt: skip
    assert service.bulkhead.max_concurrent == 1024
    method = service.for_method("GetItem")
    assert method == MethodPolicy()
    assert method.timeout == 10.0
    assert method.retry == RetryPolicy()
    assert method.idempotent is None and method.hedge is None
    assert not method.fault.active


def test_empty_file_is_the_defaults() -> None:
    assert MeshPolicy.from_toml("") == MeshPolicy()


def test_the_full_example_parses() -> None:
    policy = MeshPolicy.from_toml(EXAMPLE)
    catalog = policy.for_service("catalog")
    assert catalog.balancer == "p2c"
    assert catalog.defaults.timeout == 2.0
    assert catalog.defaults.retry == RetryPolicy(
        max_attempts=4,
        retryable_codes=frozenset({C.UNAVAILABLE, C.RESOURCE_EXHAUSTED}),
        backoff=ExponentialBackoff(0.025, 0.25),
        per_attempt_timeout=0.5,
    )
    assert catalog.defaults.fault == FaultPolicy(delay_seconds=0.1, delay_percent=10)
    assert catalog.bulkhead == BulkheadPolicy(1024)
    get_item = catalog.for_method("GetItem")
    assert get_item.timeout == 0.5
    assert get_item.idempotent is True
    assert get_item.hedge == HedgePolicy(delay=0.05, max_hedges=1)
    assert get_item.retry == catalog.defaults.retry  # inherited from the service
    assert get_item.fault == catalog.defaults.fault
    assert catalog.for_method("/foodmesh.catalog.v1.CatalogService/GetItem") is get_item
    assert catalog.for_method("ListItems") is catalog.defaults
    assert policy.for_service("orders") is policy.defaults


def test_method_over_service_over_defaults_key_by_key() -> None:
    policy = MeshPolicy.from_toml(
        """
        [defaults]
        timeout = 7.0
        balancer = "round_robin"
        [defaults.retry]
        max_attempts = 2
        retryable_codes = ["UNAVAILABLE", "INTERNAL"]
        [defaults.breaker]
        minimum_calls = 50
        [services.catalog.retry]
        per_attempt_timeout = 1.0
        [services.catalog.breaker]
        open_time = 9.0
        [services.catalog.methods.GetItem.retry]
        max_attempts = 5
        [services.catalog.methods.ListItems]
        hedge = true
        [services.orders.methods.PlaceOrder]
        idempotent = false
        """
    )
    everyone = policy.defaults
    assert everyone.balancer == "round_robin"
    assert everyone.defaults.timeout == 7.0
    catalog = policy.for_service("catalog")
    assert catalog.balancer == "round_robin"
    assert catalog.breaker == BreakerPolicy(minimum_calls=50, open_time=9.0)
    assert catalog.defaults.timeout == 7.0
    assert catalog.defaults.retry == RetryPolicy(
        max_attempts=2,
        retryable_codes=frozenset({C.UNAVAILABLE, C.INTERNAL}),
        per_attempt_timeout=1.0,
    )
    assert catalog.for_method("GetItem").retry == RetryPolicy(
        max_attempts=5,
        retryable_codes=frozenset({C.UNAVAILABLE, C.INTERNAL}),
        per_attempt_timeout=1.0,
    )
    assert catalog.for_method("GetItem").timeout == 7.0
    assert catalog.for_method("ListItems").hedge == HedgePolicy()
    orders = policy.for_service("orders")
    assert orders.for_method("PlaceOrder").idempotent is False
    assert orders.for_method("PlaceOrder").retry.max_attempts == 2


def test_a_method_can_turn_off_the_services_hedging() -> None:
    policy = MeshPolicy.from_toml(
        """
        [services.catalog]
        hedge = { max_hedges = 2 }
        [services.catalog.methods.ListItems]
        hedge = false
        """
    )
    catalog = policy.for_service("catalog")
    assert catalog.defaults.hedge == HedgePolicy(delay=None, max_hedges=2)
    assert catalog.for_method("ListItems").hedge is None


def test_classify_per_service_and_per_method_over_the_default() -> None:
    policy = MeshPolicy.from_toml(
        """
        [services.orders.classify]
        ABORTED = "retryable_failure"
        [services.orders.methods.PlaceOrder.classify]
        NOT_FOUND = "neutral"
        [services.orders.methods.GetOrder]
        classify = "default"
        """
    )
    orders = policy.for_service("orders")
    service, place, get = (
        orders.defaults.classifier,
        orders.for_method("PlaceOrder").classifier,
        orders.for_method("GetOrder").classifier,
    )
    assert service.classify(C.ABORTED).retryable and service.classify(C.NOT_FOUND).outcome is (
        Outcome.CALLER_ERROR
    )
    # a method's table merges over its service's, key by key
    assert place.classify(C.ABORTED).retryable
    assert place.classify(C.NOT_FOUND).outcome is Outcome.NEUTRAL
    assert get == DEFAULT
    assert policy.for_service("catalog").defaults.classifier == DEFAULT


def test_fault_abort_code_by_name() -> None:
    policy = MeshPolicy.from_toml(
        """
        [services.catalog.fault]
        abort_code = "UNAVAILABLE"
        abort_percent = 100
        """
    )
    assert policy.for_service("catalog").defaults.fault == FaultPolicy(
        abort_code=C.UNAVAILABLE, abort_percent=100
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[services.catalog.retry]\nmax_attempts = 9",
            "services.catalog.retry.max_attempts: must be 1..5, got 9",
        ),
        ("[defaults.retry]\nmax_attempts = 0", "defaults.retry.max_attempts: must be 1..5, got 0"),
        (
            "[services.catalog.methods.GetItem.retry]\nmax_attempts = 6",
            "services.catalog.methods.GetItem.retry.max_attempts: must be 1..5, got 6",
        ),
        ('[defaults.retry]\nmax_attempts = "3"', "defaults.retry.max_attempts: must be an integer"),
        (
            "[defaults.retry]\nmax_attempts = true",
            "defaults.retry.max_attempts: must be an integer",
        ),
        (
            '[services.catalog.retry]\nretryable_codes = ["UNAVAILBLE"]',
            "services.catalog.retry.retryable_codes: unknown status code 'UNAVAILBLE'",
        ),
        (
            '[services.catalog.retry]\nretryable_codes = ["NOT_FOUND"]',
            "services.catalog.retry.retryable_codes: NOT_FOUND is never retried",
        ),
        (
            '[services.catalog.retry]\nretryable_codes = "UNAVAILABLE"',
            "services.catalog.retry.retryable_codes: must be a list",
        ),
        (
            "[services.catalog.retry]\nbackoff_base = 0",
            "services.catalog.retry.backoff_base: backoff base must be > 0",
        ),
        (
            "[services.catalog.retry]\nbackoff_cap = 0.01",
            "services.catalog.retry.backoff_cap: backoff cap (0.01) must be >= base",
        ),
        (
            "[services.catalog.retry]\nper_attempt_timeout = -1",
            "services.catalog.retry.per_attempt_timeout: must be > 0",
        ),
        ("[services.catalog]\ntimeout = 0", "services.catalog.timeout: must be > 0"),
        ('[services.catalog]\ntimeout = "2s"', "services.catalog.timeout: must be a number"),
        (
            "[services.catalog.methods.GetItem]\ntimeout = -0.5",
            "services.catalog.methods.GetItem.timeout: must be > 0",
        ),
        (
            '[services.catalog.methods.GetItem]\nidempotent = "yes"',
            "services.catalog.methods.GetItem.idempotent: must be true or false",
        ),
        (
            '[services.catalog]\nbalancer = "random"',
            "services.catalog.balancer: must be one of p2c, round_robin, got 'random'",
        ),
        ("[services.catalog]\nbalancer = 3", "services.catalog.balancer: must be a string"),
        ("[services.catalog.budget]\nratio = -0.1", "services.catalog.budget.ratio: must be >= 0"),
        ("[services.catalog.budget]\nttl = 0.5", "services.catalog.budget.ttl: must be 1..60"),
        (
            "[services.catalog.budget]\nmin_retries_per_second = -1",
            "services.catalog.budget.min_retries_per_second: must be >= 0",
        ),
        (
            "[services.catalog.ejection]\nconsecutive_failures = 0",
            "services.catalog.ejection.consecutive_failures: must be >= 1",
        ),
        (
            "[services.catalog.ejection]\nmax_time = 10",
            "services.catalog.ejection.max_time: must be >= base_time",
        ),
        (
            "[services.catalog.ejection]\nmax_ejection_percent = 150",
            "services.catalog.ejection.max_ejection_percent: must be 0..100",
        ),
        (
            "[services.catalog.ejection]\njitter = 2",
            "services.catalog.ejection.jitter: must be 0..1",
        ),
        (
            "[services.catalog.breaker]\nfailure_rate_threshold = 0",
            "services.catalog.breaker.failure_rate_threshold: must be in (0, 1]",
        ),
        (
            "[services.catalog.breaker]\nminimum_calls = 2.5",
            "services.catalog.breaker.minimum_calls: must be an integer",
        ),
        (
            "[services.catalog.breaker]\nhalf_open_calls = 0",
            "services.catalog.breaker.half_open_calls: must be >= 1",
        ),
        (
            "[services.catalog.bulkhead]\nmax_concurrent = 0",
            "services.catalog.bulkhead.max_concurrent: must be >= 1",
        ),
        (
            "[services.catalog.fault]\ndelay_percent = 120",
            "services.catalog.fault.delay_percent: must be 0..100",
        ),
        (
            '[services.catalog.fault]\nabort_code = "NOPE"\nabort_percent = 5',
            "services.catalog.fault.abort_code: unknown status code 'NOPE'",
        ),
        (
            "[services.catalog.fault]\nabort_percent = 5",
            "services.catalog.fault.abort_code: required when abort_percent > 0",
        ),
        (
            "[services.catalog.methods.GetItem]\nhedge = { max_hedges = 5 }",
            "services.catalog.methods.GetItem.hedge.max_hedges: must be 1..4, got 5",
        ),
        (
            "[services.catalog.methods.GetItem]\nhedge = { delay = -1 }",
            "services.catalog.methods.GetItem.hedge.delay: must be >= 0",
        ),
        ("[services.catalog]\nretry = 3", "services.catalog.retry: must be a table"),
        ("services = 1", "services: must be a table"),
        ("[services]\ncatalog = 1", "services.catalog: must be a table"),
        ("[defaults]\ntimeout = 10\n[[oops", "not valid TOML"),
        (
            '[services.orders]\nclassify = "retry_on_everything"',
            "services.orders.classify: unknown preset 'retry_on_everything'",
        ),
        (
            '[services.orders.classify]\nABORTD = "failure"',
            "services.orders.classify.ABORTD: unknown status code 'ABORTD'",
        ),
        (
            '[services.orders.classify]\nABORTED = "broken"',
            "services.orders.classify.ABORTED: unknown outcome 'broken'",
        ),
        (
            '[services.orders.methods.PlaceOrder.classify]\nOK = "failure"',
            "services.orders.methods.PlaceOrder.classify: OK is always success",
        ),
    ],
)
def test_invalid_values_name_the_full_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        MeshPolicy.from_toml(text)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[servces.catalog]\ntimeout = 1", "servces"),
        ("[defaults]\ntimout = 1", "defaults.timout"),
        ("[defaults.methods.GetItem]\ntimeout = 1", "defaults.methods"),
        ("[services.catalog]\nretries = 1", "services.catalog.retries"),
        ("[services.catalog.retry]\nmax_attempt = 2", "services.catalog.retry.max_attempt"),
        ("[services.catalog.budget]\npercent = 2", "services.catalog.budget.percent"),
        ("[services.catalog.ejection]\nbase = 2", "services.catalog.ejection.base"),
        ("[services.catalog.breaker]\nthreshold = 0.5", "services.catalog.breaker.threshold"),
        ("[services.catalog.bulkhead]\nmax = 5", "services.catalog.bulkhead.max"),
        ("[services.catalog.fault]\ndelay = 5", "services.catalog.fault.delay"),
        (
            "[services.catalog.methods.GetItem]\nbalancer = 'p2c'",
            "services.catalog.methods.GetItem.balancer",
        ),
        (
            "[services.catalog.methods.GetItem.retry]\nbackoff = 1",
            "services.catalog.methods.GetItem.retry.backoff",
        ),
        (
            "[services.catalog.methods.GetItem]\nhedge = { delay = 1, hedges = 2 }",
            "services.catalog.methods.GetItem.hedge.hedges",
        ),
    ],
)
def test_unknown_keys_are_refused_by_name(text: str, key: str) -> None:
    with pytest.raises(PolicyError, match="unknown key") as caught:
        MeshPolicy.from_toml(text)
    assert str(caught.value).startswith(f"{key}: unknown key")


def test_an_invalid_default_is_reported_under_defaults() -> None:
    text = "[defaults]\ntimeout = -1\n[services.catalog]\nbalancer = 'p2c'"
    with pytest.raises(PolicyError, match=r"^defaults\.timeout: must be > 0"):
        MeshPolicy.from_toml(text)


def test_load_policy_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text(EXAMPLE)
    assert load_policy(path) == MeshPolicy.from_toml(EXAMPLE)
    assert load_policy(str(path)) == MeshPolicy.from_toml(EXAMPLE)


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text("[services.catalog.retry]\nmax_attempts = 9\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value) == (
        f"{path}: services.catalog.retry.max_attempts: must be 1..5, got 9"
    )
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "missing.toml")


def test_load_policy_from_env(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text(EXAMPLE)
    assert POLICY_ENV == "FOODMESH_POLICY"
    assert load_policy_from_env({}) == MeshPolicy()
    assert load_policy_from_env({POLICY_ENV: ""}) == MeshPolicy()
    assert load_policy_from_env({POLICY_ENV: str(path)}) == MeshPolicy.from_toml(EXAMPLE)


def test_load_policy_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert load_policy_from_env() == MeshPolicy()
    path = tmp_path / "mesh.toml"
    path.write_text("[services.catalog]\ntimeout = 3.0\n")
    monkeypatch.setenv(POLICY_ENV, str(path))
    assert load_policy_from_env().for_service("catalog").defaults.timeout == 3.0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: HedgePolicy(max_hedges=0), "max_hedges: must be 1..4"),
        (lambda: BudgetPolicy(ttl=61), "ttl: must be 1..60"),
        (lambda: EjectionPolicy(base_time=0), "base_time: must be > 0"),
        (lambda: BreakerPolicy(window=0), "window: must be > 0"),
        (lambda: BreakerPolicy(open_time=0), "open_time: must be > 0"),
        (lambda: MethodPolicy(timeout=0), "timeout: must be > 0"),
        (lambda: ServicePolicy(balancer="x"), "balancer: must be one of"),  # type: ignore[arg-type]
        (lambda: ServicePolicy(methods={"/a/B": MethodPolicy()}), "methods: a method name"),
    ],
)
def test_values_validate_themselves(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_policies_are_immutable() -> None:
    service = ServicePolicy(methods={"GetItem": MethodPolicy(timeout=1.0)})
    with pytest.raises(TypeError):
        service.methods["ListItems"] = MethodPolicy()  # type: ignore[index]
    with pytest.raises(AttributeError):
        service.balancer = "round_robin"  # type: ignore[misc]


def test_the_readme_example_is_a_valid_policy() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, flags=re.DOTALL)
    mesh_blocks = [block for block in blocks if "[services." in block]
    assert mesh_blocks, "the README shows a policy file"
    policy = MeshPolicy.from_toml(mesh_blocks[0])
    catalog = policy.for_service("catalog")
    assert catalog.for_method("GetItem").timeout == 0.5
    assert catalog.for_method("ListItems").timeout == 2.0
    assert catalog.for_method("GetItem").hedge is not None
