"""Mesh policies: what every resilience layer is told to do, per service and per method.

Every value here is good without any file: a mesh channel with no configuration retries
UNAVAILABLE up to 3 attempts within a budget of 20% + 10/s, balances by P2C, ejects an
endpoint after 5 consecutive failures and opens a breaker at a 50% failure rate. Settings
change that with one file format, TOML (tomllib, no dependency), read once at start-up:

    [defaults]                     # every service; same keys as a service, except methods
    timeout = 10.0
    [services.catalog]
    balancer = "p2c"
    timeout = 2.0
    [services.catalog.retry]
    max_attempts = 4
    [services.catalog.methods.GetItem]
    timeout = 0.5
    hedge = { delay = 0.05, max_hedges = 1 }
    [services.orders.methods.PlaceOrder]
    classify = { ABORTED = "retryable_failure" }    # or a preset: "retry_on_aborted"

A method's policy is its table merged over its service's, merged over [defaults], key by key
(`methods.GetItem.retry.max_attempts` changes only that key of the service's retry table).
A bad file stops start-up with a PolicyError naming the full key
(`services.catalog.retry.max_attempts: must be 1..5, got 9`); an unknown key is an error too,
since a typo silently ignored is a policy silently not applied.

The value classes are frozen dataclasses validated in __post_init__, whose errors start with
the field's name; the loader prefixes the table's path. Each layer's own policy value lives
next to the mechanism that follows it (mesh/resilience/: RetryPolicy, BudgetPolicy,
HedgePolicy, BreakerPolicy, EjectionPolicy, BulkheadPolicy, FaultPolicy); this module gathers
them per method and per service, and is the one place that reads the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from mesh.core.backoff import ExponentialBackoff
from mesh.core.outcome import DEFAULT as DEFAULT_CLASSIFIER
from mesh.core.outcome import PRESETS, VERDICTS, Classifier
from mesh.resilience.balance import BALANCERS, BalancerName
from mesh.resilience.breaker import BreakerPolicy
from mesh.resilience.bulkhead import BulkheadPolicy
from mesh.resilience.ejection import EjectionPolicy
from mesh.resilience.faults import FaultPolicy
from mesh.resilience.retry.budget import BudgetPolicy
from mesh.resilience.retry.hedge import HedgePolicy
from mesh.resilience.retry.policy import RetryPolicy

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

POLICY_ENV = "FOODMESH_POLICY"
"""Environment variable holding the path of the policy file."""

__all__ = [
    "POLICY_ENV",
    "BreakerPolicy",
    "BudgetPolicy",
    "BulkheadPolicy",
    "Classifier",
    "EjectionPolicy",
    "FaultPolicy",
    "HedgePolicy",
    "MeshPolicy",
    "MethodPolicy",
    "PolicyError",
    "RetryPolicy",
    "ServicePolicy",
    "load_policy",
    "load_policy_from_env",
]


class PolicyError(ValueError):
    """An invalid policy; the message names the full key."""


@dataclass(frozen=True, slots=True)
class MethodPolicy:
    """How calls to one method are made."""

    timeout: float = 10.0
    """Deadline (seconds) of a call whose caller gives none and that serves no inbound call."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    idempotent: bool | None = None
    """Safe to repeat after reaching the server; None: the proto's idempotency_level."""
    hedge: HedgePolicy | None = None
    fault: FaultPolicy = field(default_factory=FaultPolicy)
    classifier: Classifier = DEFAULT_CLASSIFIER
    """What each status code says about the endpoint and whether it may be retried
    (mesh/core/outcome.py); today's table unless the policy names codes or a preset."""

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"timeout: must be > 0, got {self.timeout}")


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """How calls to one service are made; `methods` hold complete per-method policies."""

    defaults: MethodPolicy = MethodPolicy()
    methods: Mapping[str, MethodPolicy] = field(default_factory=dict)
    balancer: BalancerName = "p2c"
    budget: BudgetPolicy = field(default_factory=BudgetPolicy)
    ejection: EjectionPolicy = field(default_factory=EjectionPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    bulkhead: BulkheadPolicy = field(default_factory=BulkheadPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", MappingProxyType(dict(self.methods)))
        if self.balancer not in BALANCERS:
            raise ValueError(
                f"balancer: must be one of {', '.join(BALANCERS)}, got {self.balancer!r}"
            )
        for name in self.methods:
            if not name or "/" in name or "." in name:
                raise ValueError(
                    f"methods: a method name is a bare name like GetItem, got {name!r}"
                )

    def for_method(self, method: str) -> MethodPolicy:
        """The policy of `method` ("GetItem", or a full "/pkg.Service/GetItem")."""
        return self.methods.get(method.rpartition("/")[2], self.defaults)


@dataclass(frozen=True, slots=True)
class MeshPolicy:
    """Policies of every service a process calls."""

    defaults: ServicePolicy = field(default_factory=ServicePolicy)
    services: Mapping[str, ServicePolicy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))

    def for_service(self, service: str) -> ServicePolicy:
        return self.services.get(service, self.defaults)

    @classmethod
    def from_toml(cls, text: str) -> MeshPolicy:
        """Parse a policy file's text; PolicyError names the offending key."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"not valid TOML: {exc}") from None
        return _mesh(document)


def load_policy(path: str | Path | None) -> MeshPolicy:
    """The policy in the TOML file at `path`; the defaults for None."""
    if path is None:
        return MeshPolicy()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from None
    try:
        return MeshPolicy.from_toml(text)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def load_policy_from_env(environ: Mapping[str, str] | None = None) -> MeshPolicy:
    """The policy in the file named by $FOODMESH_POLICY; the defaults when unset or empty."""
    env = os.environ if environ is None else environ
    return load_policy(env.get(POLICY_ENV) or None)


# -- the loader ------------------------------------------------------------------------------

Table = dict[str, Any]
_T = TypeVar("_T", bound="DataclassInstance")
_RETRY_KEYS = frozenset(
    {"max_attempts", "retryable_codes", "backoff_base", "backoff_cap", "per_attempt_timeout"}
)
_METHOD_KEYS = frozenset({"timeout", "retry", "idempotent", "hedge", "fault", "classify"})
_SIMPLE: dict[str, type[Any]] = {
    "budget": BudgetPolicy,
    "ejection": EjectionPolicy,
    "breaker": BreakerPolicy,
    "bulkhead": BulkheadPolicy,
}
_SERVICE_KEYS = _METHOD_KEYS | {"balancer", "methods", *_SIMPLE}


def _mesh(document: Table) -> MeshPolicy:
    _check_keys(document, frozenset({"defaults", "services"}), "")
    base = _table(document.get("defaults", {}), "defaults")
    defaults = _service(base, "defaults", with_methods=False)
    services = {
        name: _service(_merge(base, _table(table, f"services.{name}")), f"services.{name}")
        for name, table in _table(document.get("services", {}), "services").items()
    }
    return MeshPolicy(defaults, services)


def _service(table: Table, path: str, *, with_methods: bool = True) -> ServicePolicy:
    _check_keys(table, _SERVICE_KEYS if with_methods else _SERVICE_KEYS - {"methods"}, path)
    method_keys = {key: value for key, value in table.items() if key in _METHOD_KEYS}
    methods: dict[str, MethodPolicy] = {}
    methods_path = _key(path, "methods")
    for name, override in _table(table.get("methods", {}), methods_path).items():
        method_path = _key(methods_path, name)
        override = _table(override, method_path)
        _check_keys(override, _METHOD_KEYS, method_path)
        methods[name] = _method(_merge(method_keys, override), method_path)
    kwargs: Table = {"defaults": _method(method_keys, path), "methods": methods}
    if "balancer" in table:
        kwargs["balancer"] = _string(table["balancer"], _key(path, "balancer"))
    for key, cls in _SIMPLE.items():
        if key in table:
            kwargs[key] = _simple(cls, _table(table[key], _key(path, key)), _key(path, key))
    return _construct(ServicePolicy, kwargs, path)


def _method(table: Table, path: str) -> MethodPolicy:
    kwargs: Table = {}
    if "timeout" in table:
        kwargs["timeout"] = _number(table["timeout"], _key(path, "timeout"))
    if "idempotent" in table:
        kwargs["idempotent"] = _bool(table["idempotent"], _key(path, "idempotent"))
    if "retry" in table:
        kwargs["retry"] = _retry(_table(table["retry"], _key(path, "retry")), _key(path, "retry"))
    if "hedge" in table:
        kwargs["hedge"] = _hedge(table["hedge"], _key(path, "hedge"))
    if "fault" in table:
        kwargs["fault"] = _fault(_table(table["fault"], _key(path, "fault")), _key(path, "fault"))
    if "classify" in table:
        kwargs["classifier"] = _classifier(table["classify"], _key(path, "classify"))
    return _construct(MethodPolicy, kwargs, path)


def _retry(table: Table, path: str) -> RetryPolicy:
    _check_keys(table, _RETRY_KEYS, path)
    kwargs: Table = {}
    if "max_attempts" in table:
        kwargs["max_attempts"] = _integer(table["max_attempts"], _key(path, "max_attempts"))
    if "retryable_codes" in table:
        codes_path = _key(path, "retryable_codes")
        codes = table["retryable_codes"]
        if not isinstance(codes, list):
            raise PolicyError(f"{codes_path}: must be a list of status code names, got {codes!r}")
        kwargs["retryable_codes"] = frozenset(_code(code, codes_path) for code in codes)
    if "per_attempt_timeout" in table:
        kwargs["per_attempt_timeout"] = _number(
            table["per_attempt_timeout"], _key(path, "per_attempt_timeout")
        )
    if "backoff_base" in table or "backoff_cap" in table:
        default = RetryPolicy().backoff
        base = _number(table.get("backoff_base", default.base), _key(path, "backoff_base"))
        cap = _number(table.get("backoff_cap", default.cap), _key(path, "backoff_cap"))
        try:
            kwargs["backoff"] = ExponentialBackoff(base, cap)
        except ValueError as exc:
            key = "backoff_base" if not base > 0 else "backoff_cap"
            raise PolicyError(f"{_key(path, key)}: {exc}") from None
    return _construct(RetryPolicy, kwargs, path)


def _hedge(value: Any, path: str) -> HedgePolicy | None:
    if value is False:
        return None
    if value is True:
        return HedgePolicy()
    return _simple(HedgePolicy, _table(value, path), path)


def _fault(table: Table, path: str) -> FaultPolicy:
    table = dict(table)
    if "abort_code" in table:
        table["abort_code"] = _code(table["abort_code"], _key(path, "abort_code"))
    return _simple(FaultPolicy, table, path)


def _classifier(value: Any, path: str) -> Classifier:
    """A preset's name, or a table of status codes to outcomes over the default table."""
    if isinstance(value, str):
        preset = PRESETS.get(value)
        if preset is None:
            raise PolicyError(f"{path}: unknown preset {value!r} (one of {', '.join(PRESETS)})")
        return preset
    rules = {}
    for name, verdict in _table(value, path).items():
        code = _code(name, _key(path, name))
        word = _string(verdict, _key(path, name))
        if word not in VERDICTS:
            known = ", ".join(VERDICTS)
            raise PolicyError(f"{_key(path, name)}: unknown outcome {word!r} (one of {known})")
        rules[code] = VERDICTS[word]
    try:
        return Classifier.of(rules)
    except ValueError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _simple(cls: type[_T], table: Table, path: str) -> _T:
    """A dataclass of numbers from a table whose keys are its field names."""
    types = {f.name: f.type for f in fields(cls)}
    _check_keys(table, frozenset(types), path)
    kwargs: Table = {}
    for key, value in table.items():
        kind = types[key]
        if kind == "int":
            kwargs[key] = _integer(value, _key(path, key))
        elif kind in ("float", "float | None"):
            kwargs[key] = _number(value, _key(path, key))
        else:
            kwargs[key] = value
    return _construct(cls, kwargs, path)


def _construct(cls: type[_T], kwargs: Table, path: str) -> _T:
    try:
        return cls(**kwargs)
    except PolicyError:
        raise
    except ValueError as exc:
        raise PolicyError(_key(path, str(exc))) from None


def _merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> Table:
    merged = dict(base)
    for key, value in override.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check_keys(table: Table, known: frozenset[str], path: str) -> None:
    for key in table:
        if key not in known:
            raise PolicyError(
                f"{_key(path, key)}: unknown key (known here: {', '.join(sorted(known))})"
            )


def _table(value: Any, path: str) -> Table:
    if not isinstance(value, dict):
        raise PolicyError(f"{path}: must be a table, got {value!r}")
    return value


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{path}: must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PolicyError(f"{path}: must be an integer, got {value!r}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{path}: must be true or false, got {value!r}")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{path}: must be a string, got {value!r}")
    return value


def _code(value: Any, path: str) -> grpc.StatusCode:
    name = _string(value, path)
    code = grpc.StatusCode.__members__.get(name)
    if code is None:
        raise PolicyError(f"{path}: unknown status code {name!r} (names like UNAVAILABLE)")
    return code
