"""ConsulWatch's rules, with scripted Consul answers and a fake clock (no wall-clock waits)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from mesh.core.backoff import ExponentialBackoff
from mesh.discovery import (
    ConsulWatch,
    Endpoint,
    next_index,
    parse_health_entries,
)
from mesh.testing import FakeClock


def entry(port: int, host: str = "127.0.0.1", node: str = "10.0.0.1") -> dict[str, Any]:
    return {
        "Node": {"Address": node},
        "Service": {"ID": f"svc-{port}", "Address": host, "Port": port, "Meta": {"version": "1"}},
    }


class ScriptedConsul:
    """Answers fetches from a script; each step is (index, entries), an exception, or a
    (duration, (index, entries)) pair meaning "the blocking query took that long"."""

    def __init__(self, clock: FakeClock, script: list[Any]) -> None:
        self.clock = clock
        self.script = list(script)
        self.queries: list[tuple[int, float]] = []
        self.exhausted = asyncio.Event()

    async def fetch(
        self, service: str, index: int, wait: float
    ) -> tuple[int, list[Mapping[str, Any]]]:
        self.queries.append((index, wait))
        if not self.script:
            self.exhausted.set()
            await asyncio.Event().wait()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        if isinstance(step[0], float):
            self.clock.now += step[0]
            step = step[1]
        return step


async def collect(watch: ConsulWatch, consul: ScriptedConsul) -> list[frozenset[Endpoint]]:
    seen: list[frozenset[Endpoint]] = []

    async def run() -> None:
        async for endpoints in watch:
            seen.append(endpoints)

    task = asyncio.create_task(run())
    await asyncio.wait_for(consul.exhausted.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return seen


def make(script: list[Any], **kwargs: Any) -> tuple[ConsulWatch, ScriptedConsul, FakeClock]:
    clock = FakeClock()
    consul = ScriptedConsul(clock, script)
    kwargs.setdefault("rng", lambda: 0.5)
    watch = ConsulWatch("catalog", consul.fetch, clock=clock, sleep=clock.sleep, **kwargs)
    return watch, consul, clock


def ports(endpoints: frozenset[Endpoint]) -> set[int]:
    return {e.port for e in endpoints}


def test_next_index_rules() -> None:
    assert next_index(0, 12) == 12
    assert next_index(12, 15) == 15
    assert next_index(15, 15) == 15
    assert next_index(15, 3) == 0, "an index that goes backwards resets to 0"
    assert next_index(0, 0) == 1, "an index <= 0 would make the loop busy"
    assert next_index(0, -4) == 1


def test_parse_prefers_service_address_and_skips_bad_entries() -> None:
    bad = {"Node": {"Address": "10.0.0.9"}, "Service": {"ID": "broken", "Port": 0}}
    nodeonly = {"Node": {"Address": "10.0.0.7"}, "Service": {"ID": "n", "Address": "", "Port": 7}}
    parsed = parse_health_entries([entry(5001, host="192.168.1.5"), bad, nodeonly])
    assert {(e.host, e.port) for e in parsed} == {("192.168.1.5", 5001), ("10.0.0.7", 7)}
    first = next(e for e in parsed if e.port == 5001)
    assert first.instance_id == "svc-5001" and first.meta["version"] == "1"


async def test_yields_first_answer_even_empty_then_only_changes() -> None:
    watch, consul, _ = make([(5, []), (6, [entry(1)]), (7, [entry(1)]), (8, [entry(1), entry(2)])])
    seen = await collect(watch, consul)
    assert [ports(s) for s in seen] == [set(), {1}, {1, 2}]
    assert [q[0] for q in consul.queries] == [0, 5, 6, 7, 8]


async def test_index_going_backwards_resets_to_zero() -> None:
    watch, consul, _ = make([(50, [entry(1)]), (3, [entry(1)]), (4, [entry(1)])])
    await collect(watch, consul)
    assert [q[0] for q in consul.queries] == [0, 50, 0, 4]


async def test_fast_answers_are_rate_limited() -> None:
    watch, consul, clock = make(
        [(5, [entry(1)]), (6, [entry(2)]), (2.0, (7, [entry(3)]))], min_interval=0.25
    )
    await collect(watch, consul)
    # the two instant answers are followed by a pause; the slow (blocking) one is not
    assert clock.sleeps == [pytest.approx(0.25), pytest.approx(0.25)]


async def test_outage_keeps_last_set_and_backs_off() -> None:
    script: list[Any] = [(5, [entry(1), entry(2)])]
    script += [ConnectionError("refused")] * 4
    script += [(6, [entry(1), entry(2)])]
    backoff = ExponentialBackoff(0.5, 3.0)
    watch, consul, clock = make(script, backoff=backoff, min_interval=0.0)
    seen = await collect(watch, consul)
    assert [ports(s) for s in seen] == [{1, 2}], "nothing yielded during the outage"
    # rng() = 0.5 -> half of each ceiling: 0.5, 1.0, 2.0, 3.0 (capped)
    assert clock.sleeps == [0.25, 0.5, 1.0, 1.5]
    assert [q[0] for q in consul.queries] == [0, 5, 5, 5, 5, 5, 6]


async def test_empty_answer_after_outage_is_distrusted_for_grace_period() -> None:
    script: list[Any] = [
        (100, [entry(1)]),
        ConnectionError("agent restarting"),
        (4, []),  # restarted dev agent: nothing registered yet
        (5.0, (5, [])),  # still nothing, 5 s later
        (6, [entry(1)]),  # re-registered
        (20.0, (9, [])),  # the service really goes away
        (40.0, (10, [])),
    ]
    watch, consul, _ = make(script, empty_grace=30.0, min_interval=0.0)
    seen = await collect(watch, consul)
    assert [ports(s) for s in seen] == [{1}, set()]
    # during the grace period the blocking wait is shortened to what is left of it
    waits = [w for _, w in consul.queries]
    assert waits[3] == pytest.approx(30.0)
    assert waits[4] == pytest.approx(30.0 - 5.0)


async def test_genuinely_empty_service_is_reported_after_grace() -> None:
    script: list[Any] = [(10, [entry(1)]), (5, []), (31.0, (6, []))]
    watch, consul, _ = make(script, empty_grace=30.0, min_interval=0.0)
    seen = await collect(watch, consul)
    assert [ports(s) for s in seen] == [{1}, set()]


async def test_empty_without_reset_is_reported_at_once() -> None:
    watch, consul, _ = make([(10, [entry(1)]), (11, [])], empty_grace=30.0)
    seen = await collect(watch, consul)
    assert [ports(s) for s in seen] == [{1}, set()]


def test_invalid_settings_are_refused() -> None:
    async def never(service: str, index: int, wait: float) -> tuple[int, list[Any]]:
        raise AssertionError

    with pytest.raises(ValueError):
        ConsulWatch("x", never, wait=0)
    with pytest.raises(ValueError):
        ExponentialBackoff(base=0)
