"""The balancer: peak-EWMA load, P2C and round robin, on a fake clock with scripted endpoints."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from mesh.resilience.balance import (
    Balancer,
    EndpointLoad,
    PowerOfTwoChoices,
    RecentLatencies,
    RoundRobin,
)
from mesh.testing import FakeClock


class ScriptedRng:
    """Returns the scripted values in turn, as random.random would return its draws."""

    def __init__(self, values: Sequence[float]) -> None:
        self._values: Iterator[float] = iter(values)

    def __call__(self) -> float:
        return next(self._values)


@dataclass(eq=False)
class Node:
    """A scripted endpoint: it answers after `latency`, shedding load if `sheds`."""

    name: str
    load: EndpointLoad
    latency: float = 0.01
    sheds: bool = False


def node(clock: FakeClock, name: str, latency: float = 0.01, **load: float) -> Node:
    load.setdefault("warmup", 0.0)
    return Node(name, EndpointLoad(clock, **load), latency)


def served(clock: FakeClock, n: Node, *latencies: float) -> Node:
    """Let `n` answer calls of the given latencies, one after another."""
    for latency in latencies:
        started = n.load.start()
        clock.now += latency
        n.load.finish(started)
    return n


@dataclass
class Simulation:
    """Calls arrive every `interval` on the fake clock; each takes its endpoint's latency."""

    clock: FakeClock
    balancer: Balancer[Node]
    nodes: list[Node]
    interval: float = 0.001
    _pending: list[tuple[float, int, Node, float]] = field(default_factory=list)
    _seq: int = 0

    def run(self, calls: int) -> Counter[str]:
        picked: Counter[str] = Counter()
        for _ in range(calls):
            arrival = self.clock.now + self.interval
            while self._pending and self._pending[0][0] <= arrival:
                done, _, n, started = heapq.heappop(self._pending)
                self.clock.now = done
                n.load.finish(started, penalty=n.sheds)
            self.clock.now = arrival
            chosen = self.balancer.pick(self.nodes, arrival)
            assert chosen is not None
            picked[chosen.name] += 1
            self._seq += 1
            latency = 0.001 if chosen.sheds else chosen.latency
            heapq.heappush(
                self._pending, (arrival + latency, self._seq, chosen, chosen.load.start())
            )
        return picked

    def run_for(self, seconds: float) -> Counter[str]:
        return self.run(round(seconds / self.interval))


# -- EndpointLoad -------------------------------------------------------------------------


def test_first_sample_replaces_the_initial_estimate() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a", initial_latency=0.5), 0.02)
    assert n.load.cost(clock.now) == pytest.approx(0.02)


def test_a_slower_sample_replaces_the_average_at_once() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a"), 0.01, 0.01, 0.3)
    assert n.load.cost(clock.now) == pytest.approx(0.3)


def test_a_faster_sample_is_blended_in_by_the_time_since_the_last() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a", decay=10.0), 0.1)
    clock.now += 9.95
    served(clock, n, 0.05)  # 10 s after the previous sample: the old one weighs e^-1
    expected = 0.1 * math.exp(-1) + 0.05 * (1 - math.exp(-1))
    assert n.load.cost(clock.now) == pytest.approx(expected)


def test_cost_grows_with_outstanding_calls_and_does_not_decay_meanwhile() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a"), 0.02)
    n.load.start()
    n.load.start()
    assert n.load.outstanding == 2
    assert n.load.cost(clock.now) == pytest.approx(0.06)
    assert n.load.cost(clock.now + 60) == pytest.approx(0.06)  # a hanging endpoint stays dear


def test_an_idle_endpoints_cost_decays_towards_zero() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a", decay=10.0), 0.5)
    assert n.load.cost(clock.now + 10) == pytest.approx(0.5 * math.exp(-1))


def test_penalty_records_at_least_the_penalty_latency() -> None:
    clock = FakeClock(100.0)
    n = served(clock, node(clock, "a", penalty=1.0), 0.01)
    started = n.load.start()
    clock.now += 0.001
    n.load.finish(started, penalty=True)
    assert n.load.cost(clock.now) == pytest.approx(1.0)
    slow = served(clock, node(clock, "b", penalty=1.0), 3.0)
    started = slow.load.start()
    clock.now += 0.001
    slow.load.finish(started, penalty=True)  # never below what it already costs
    assert slow.load.cost(clock.now) == pytest.approx(3.0)


def test_first_answer_measures_a_new_endpoint_before_it_gets_a_second_call() -> None:
    clock = FakeClock(100.0)
    busy = served(clock, node(clock, "busy"), 5.0)
    new = node(clock, "new", initial_latency=0.001)
    for _ in range(50):
        busy.load.start()
    assert new.load.cost(clock.now) == pytest.approx(0.001)  # idle: the placeholder
    new.load.start()
    assert new.load.cost(clock.now) > busy.load.cost(clock.now)  # no answer yet: dearest
    clock.now += 0.02
    new.load.finish(clock.now - 0.02)
    assert new.load.cost(clock.now) == pytest.approx(0.02)


def test_warmup_counts_outstanding_calls_one_over_weight_times() -> None:
    clock = FakeClock(100.0)
    load = served(clock, node(clock, "a", warmup=5.0, min_weight=0.1), 0.02).load
    appeared = clock.now - 0.02
    load.start()
    assert load.cost(clock.now) == pytest.approx(0.02 * (1 / 0.1 + 1))  # floored at min_weight
    assert load.cost(appeared + 2.5) == pytest.approx(0.02 * (1 / 0.5 + 1))
    assert load.cost(appeared + 5.0) == pytest.approx(0.02 * 2)
    load.finish(clock.now)
    assert load.cost(clock.now) == pytest.approx(0.02)  # idle: nothing to weigh


def test_finish_without_start_raises() -> None:
    clock = FakeClock(100.0)
    load = EndpointLoad(clock)
    with pytest.raises(RuntimeError):
        load.finish(clock.now)


@pytest.mark.parametrize(
    "kwargs",
    [{"initial_latency": 0}, {"decay": 0}, {"warmup": -1}, {"min_weight": 0}, {"penalty": 0}],
)
def test_load_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EndpointLoad(FakeClock(100.0), **kwargs)


# -- PowerOfTwoChoices --------------------------------------------------------------------


def test_p2c_returns_the_cheaper_of_the_two_it_draws() -> None:
    clock = FakeClock(100.0)
    a = served(clock, node(clock, "a"), 0.05)
    b = served(clock, node(clock, "b"), 0.001)  # the cheapest, but never drawn below
    c = served(clock, node(clock, "c"), 0.02)
    # n=3: the first draw 0.0 -> index 0; the second 0.5 -> 1 of the 2 others -> index 2.
    assert PowerOfTwoChoices(ScriptedRng([0.0, 0.5])).pick([a, b, c], clock.now) is c
    assert PowerOfTwoChoices(ScriptedRng([0.0, 0.5])).pick([c, b, a], clock.now) is c


def test_p2c_draws_two_distinct_candidates_uniformly() -> None:
    clock = FakeClock(100.0)
    nodes = [served(clock, node(clock, f"n{i}"), 0.01 * (i + 1)) for i in range(4)]
    p2c = PowerOfTwoChoices(random.Random(7).random)
    picked = Counter(p2c.pick(nodes, clock.now).name for _ in range(12_000))  # type: ignore[union-attr]
    # Of the 6 equally likely pairs, the cheapest is in 3, the 2nd cheapest wins 2, the 3rd 1,
    # and the dearest never wins: it is never paired with itself.
    assert picked["n3"] == 0
    assert picked["n0"] / 12_000 == pytest.approx(3 / 6, abs=0.02)
    assert picked["n1"] / 12_000 == pytest.approx(2 / 6, abs=0.02)
    assert picked["n2"] / 12_000 == pytest.approx(1 / 6, abs=0.02)


def test_p2c_with_zero_or_one_candidate() -> None:
    clock = FakeClock(100.0)
    p2c = PowerOfTwoChoices(ScriptedRng([]))
    only = node(clock, "only")
    assert p2c.pick([], clock.now) is None
    assert p2c.pick([only], clock.now) is only
    assert p2c.pick([only], clock.now, exclude=only) is only  # nowhere else to go


def test_p2c_sends_far_less_to_an_endpoint_ten_times_slower() -> None:
    clock = FakeClock(100.0)
    nodes = [node(clock, "fast1", 0.01), node(clock, "fast2", 0.01), node(clock, "slow", 0.1)]
    sim = Simulation(clock, PowerOfTwoChoices(random.Random(1).random), nodes)
    picked = sim.run(10_000)
    assert picked["slow"] / 10_000 < 0.05
    rr = Simulation(FakeClock(100.0), RoundRobin(), nodes).run(9_999)
    assert rr["slow"] == 3_333  # what round robin would have sent it


def test_p2c_avoids_the_endpoint_with_calls_piling_up() -> None:
    clock = FakeClock(100.0)
    a = served(clock, node(clock, "a"), 0.01)
    b = served(clock, node(clock, "b"), 0.01)
    for _ in range(3):
        a.load.start()
    p2c = PowerOfTwoChoices(random.Random(3).random)
    assert {p2c.pick([a, b], clock.now) for _ in range(100)} == {b}


def test_a_fast_shedding_endpoint_is_penalised_not_rewarded() -> None:
    clock = FakeClock(100.0)
    nodes = [node(clock, "shedder", 0.02), node(clock, "b", 0.02), node(clock, "c", 0.02)]
    nodes[0].sheds = True  # answers RESOURCE_EXHAUSTED in 1 ms
    picked = Simulation(clock, PowerOfTwoChoices(random.Random(5).random), nodes).run(10_000)
    assert picked["shedder"] / 10_000 < 0.02


def test_without_the_penalty_a_fast_failing_endpoint_would_win() -> None:
    clock = FakeClock(100.0)
    shedder = served(clock, node(clock, "shedder"), 0.02, 0.001)
    healthy = served(clock, node(clock, "b"), 0.02)
    assert PowerOfTwoChoices(random.Random(0).random).pick([shedder, healthy], clock.now) is shedder
    penalised = served(clock, node(clock, "shedder"), 0.02)
    started = penalised.load.start()
    clock.now += 0.001
    penalised.load.finish(started, penalty=True)
    assert PowerOfTwoChoices(random.Random(0).random).pick([penalised, healthy], clock.now) is (
        healthy
    )


def share_of_newcomer_per_second(warmup: float) -> list[float]:
    """Three endpoints with ~7 calls in flight each; a fourth appears; its share per second."""
    clock = FakeClock(100.0)
    nodes = [node(clock, f"old{i}", 0.01) for i in range(3)]
    sim = Simulation(clock, PowerOfTwoChoices(random.Random(11).random), nodes, interval=0.0005)
    sim.run_for(6.0)
    nodes.append(Node("new", EndpointLoad(clock, warmup=warmup), 0.01))
    return [sim.run_for(1.0)["new"] / 2000 for _ in range(7)]


def test_a_new_endpoints_share_grows_over_its_warmup() -> None:
    shares = share_of_newcomer_per_second(warmup=5.0)
    # Envoy's weight semantics: weight w gets w / (3 + w) of the calls; w grows 0.1 -> 1.
    assert shares[0] < 0.1
    assert all(later > earlier for earlier, later in itertools.pairwise(shares[:5]))
    assert shares[2] == pytest.approx(0.5 / 3.5, abs=0.03)
    assert shares[5] == pytest.approx(0.25, abs=0.02)  # warm: a fair share
    cold = share_of_newcomer_per_second(warmup=0.0)
    assert cold[0] == pytest.approx(0.25, abs=0.02)  # without slow start: all of it at once


def test_p2c_avoids_the_excluded_endpoint() -> None:
    clock = FakeClock(100.0)
    nodes = [served(clock, node(clock, f"n{i}"), 0.01 * (i + 1)) for i in range(4)]
    p2c = PowerOfTwoChoices(random.Random(9).random)
    for excluded in nodes:
        picked = Counter(p2c.pick(nodes, clock.now, exclude=excluded) for _ in range(3_000))
        assert excluded not in picked
        # Two distinct draws among the 3 others: the dearest of them never wins.
        others = [n for n in nodes if n is not excluded]
        assert set(picked) == set(others[:2])
    assert p2c.pick(nodes[:2], clock.now, exclude=nodes[0]) is nodes[1]
    assert p2c.pick(nodes[:2], clock.now, exclude=nodes[1]) is nodes[0]
    stranger = node(clock, "not a candidate")
    assert p2c.pick(nodes[:2], clock.now, exclude=stranger) is nodes[0]


# -- RoundRobin ---------------------------------------------------------------------------


def test_round_robin_cycles() -> None:
    a, b, c = object(), object(), object()
    rr = RoundRobin()
    assert [rr.pick([a, b, c], 0.0) for _ in range(7)] == [a, b, c, a, b, c, a]
    assert rr.pick([], 0.0) is None


def test_round_robin_skips_the_excluded_one_when_it_can() -> None:
    a, b, c = object(), object(), object()
    rr = RoundRobin()
    assert [rr.pick([a, b, c], 0.0, exclude=b) for _ in range(4)] == [a, c, a, c]
    assert rr.pick([a], 0.0, exclude=a) is a


# -- RecentLatencies ----------------------------------------------------------------------


def test_recent_latencies_quantiles() -> None:
    recent = RecentLatencies(capacity=256)
    assert recent.quantile(0.95) is None
    for ms in range(1, 101):
        recent.add(ms / 1000)
    assert len(recent) == 100
    assert recent.quantile(0.5) == 0.05
    assert recent.quantile(0.95) == 0.095
    assert recent.quantile(0.07) == 0.007
    assert recent.quantile(0.0) == 0.001
    assert recent.quantile(1.0) == 0.1
    with pytest.raises(ValueError):
        recent.quantile(1.5)


def test_recent_latencies_keep_only_the_last_capacity_samples() -> None:
    recent = RecentLatencies(capacity=4, resort_every=1)
    for seconds in (9.0, 9.0, 1.0, 2.0, 3.0, 4.0):
        recent.add(seconds)
    assert len(recent) == 4
    assert recent.quantile(1.0) == 4.0
    assert recent.quantile(0.0) == 1.0


def test_recent_latencies_resort_lazily() -> None:
    clock = FakeClock(100.0)
    recent = RecentLatencies(capacity=256, clock=clock, resort_every=32, max_age=1.0)
    for _ in range(64):
        recent.add(0.01)
    assert recent.quantile(1.0) == 0.01
    for _ in range(31):
        recent.add(5.0)
    assert recent.quantile(1.0) == 0.01  # 31 new samples, under a second: the cached copy
    recent.add(5.0)
    assert recent.quantile(1.0) == 5.0  # the 32nd makes it stale
    recent.add(7.0)
    assert recent.quantile(1.0) == 5.0
    clock.now += 1.0
    assert recent.quantile(1.0) == 7.0  # a second later, one new sample is enough


def test_recent_latencies_with_few_samples_always_resort() -> None:
    recent = RecentLatencies(resort_every=32)
    recent.add(1.0)
    assert recent.quantile(1.0) == 1.0
    recent.add(2.0)
    assert recent.quantile(1.0) == 2.0
