"""The saga building blocks: StepRetry's delays and limits, and SagaRunner over an in-memory
journal (StringValue events folded into a small frozen state), scripted participants that
deduplicate by idempotency key, and real Leases on a SQLite file.

Time is a fake clock: only the saga task's own sleeps (its retry delays) move it, and a sleep
in any other task (the lease renewal timer) waits until time reaches it, so nothing here waits
for real time; only SQLite's worker threads are real concurrency, and what waits for them
does so with a deadline."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh.core.deadline import Deadline, current_deadline, inbound_deadline
from meshkit.events import StaleStream
from meshkit.saga import (
    NON_RETRYABLE,
    Fence,
    LeaseLost,
    Leases,
    Progress,
    SagaRunner,
    Step,
    StepContext,
    StepRetry,
)
from meshkit.storage import lease as saga_lease
from meshkit.storage.database import Database, open_database
from tests.conftest import Locate

TTL = 30.0
START = 1_000_000.0
DEADLINE_S = 10.0
"""The most real time a test waits for a saga's task (SQLite runs on worker threads)."""

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def rpc_error(code: grpc.StatusCode, details: str = "") -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


# -- StepRetry ---------------------------------------------------------------------------


def test_the_default_delays_double_from_one_second_up_to_a_hundred() -> None:
    retry = StepRetry()
    delays = [retry.delay(attempt) for attempt in range(1, 11)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 100, 100, 100]
    assert (retry.maximum_attempts, retry.non_retryable) == (0, NON_RETRYABLE)


def test_delays_follow_the_policy_and_never_overflow() -> None:
    retry = StepRetry(initial_interval=0.5, backoff_coefficient=3, maximum_interval=10)
    assert [retry.delay(a) for a in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 10]
    # A compensation retries without end: attempt 5000 still has a delay, the cap.
    assert StepRetry().delay(5000) == 100
    assert StepRetry(backoff_coefficient=1).delay(5000) == 1


def test_retryable_codes_retry_without_limit_by_default() -> None:
    retry = StepRetry()
    assert retry.retries(UNAVAILABLE, 1) and retry.retries(UNAVAILABLE, 10_000)
    assert retry.retries(grpc.StatusCode.DEADLINE_EXCEEDED, 3)


@pytest.mark.parametrize("code", sorted(NON_RETRYABLE, key=lambda c: c.name))
def test_a_non_retryable_code_ends_the_step_at_once(code: grpc.StatusCode) -> None:
    assert not StepRetry().retries(code, 1)


def test_non_retryable_codes_are_the_policys() -> None:
    retry = StepRetry(non_retryable=frozenset({UNAVAILABLE}))
    assert not retry.retries(UNAVAILABLE, 1)
    assert retry.retries(FAILED_PRECONDITION, 1)


def test_maximum_attempts_counts_the_first_attempt() -> None:
    retry = StepRetry(maximum_attempts=3)
    assert [retry.retries(UNAVAILABLE, a) for a in (1, 2, 3, 4)] == [True, True, False, False]
    assert not StepRetry(maximum_attempts=1).retries(UNAVAILABLE, 1)


@pytest.mark.parametrize(
    ("arguments", "field_name"),
    [
        ({"initial_interval": 0}, "initial_interval"),
        ({"initial_interval": -1}, "initial_interval"),
        ({"initial_interval": math.nan}, "initial_interval"),
        ({"backoff_coefficient": 0.5}, "backoff_coefficient"),
        ({"backoff_coefficient": math.nan}, "backoff_coefficient"),
        ({"maximum_interval": 0.5}, "maximum_interval"),
        ({"maximum_interval": math.nan}, "maximum_interval"),
        ({"initial_interval": 5, "maximum_interval": 4}, "maximum_interval"),
        ({"maximum_attempts": -1}, "maximum_attempts"),
    ],
)
def test_an_invalid_policy_is_refused_naming_the_field(
    arguments: dict[str, Any], field_name: str
) -> None:
    with pytest.raises(ValueError, match=f"^{field_name}: "):
        StepRetry(**arguments)


# -- StepContext -------------------------------------------------------------------------


def test_idempotency_keys_name_the_saga_the_step_and_the_direction() -> None:
    first = StepContext("order-1", "pay", attempt=1, timeout=5)
    again = StepContext("order-1", "pay", attempt=7, timeout=1)
    undo = StepContext("order-1", "pay", attempt=1, timeout=5, compensating=True)
    assert first.idempotency_key() == again.idempotency_key() == "order-1/pay/do"
    assert undo.idempotency_key() == "order-1/pay/undo"
    assert first.idempotency_key("p-9") == "order-1/pay/do/p-9"
    assert StepContext("order-2", "pay", 1, 5).idempotency_key() != first.idempotency_key()


# -- the test saga -----------------------------------------------------------------------


def event(value: str) -> StringValue:
    return StringValue(value=value)


@dataclass(frozen=True)
class Saga:
    """The test saga's state: its progress and the events that made it."""

    progress: Progress = field(default_factory=Progress)
    history: tuple[str, ...] = ()


def apply(state: Saga, value: str) -> Saga:
    """done:STEP, failed:STEP:REASON, cancel:REASON, undone:STEP, note:..., completed, aborted."""
    p = state.progress
    kind, _, rest = value.partition(":")
    if kind == "done":
        p = replace(p, done=p.done | {rest})
    elif kind == "failed":
        step, _, reason = rest.partition(":")
        p = replace(p, failure=reason, failed_step=step)
    elif kind == "cancel":
        p = replace(p, failure=rest)
    elif kind == "undone":
        p = replace(p, compensated=p.compensated | {rest})
    elif kind in ("completed", "aborted"):
        p = replace(p, ended=True)
    elif kind != "note":
        raise ValueError(value)
    return Saga(p, (*state.history, value))


def fold(events: Sequence[Message]) -> Saga:
    state = Saga()
    for message in events:
        assert isinstance(message, StringValue)
        state = apply(state, message.value)
    return state


class Journal:
    """A dict of event lists, with the version check of an event store."""

    def __init__(self) -> None:
        self.streams: dict[str, list[StringValue]] = {}
        self.intrusions: dict[str, str] = {}
        """Before recording events starting with KEY, another writer appends VALUE."""
        self.stale = 0
        self.database: Database | None = None
        """Where a record's fence runs (the leases' file; any connection to it will do)."""

    async def load(self, saga_id: str) -> tuple[Saga, int]:
        stream = self.streams.get(saga_id, [])
        return fold(stream), len(stream)

    async def record(
        self, saga_id: str, version: int, events: Sequence[Message], fence: Fence | None = None
    ) -> tuple[Saga, int]:
        if fence is None:
            return self._append(saga_id, version, events)
        assert self.database is not None
        async with self.database.transaction() as transaction:
            await fence(transaction)
            return self._append(saga_id, version, events)

    def _append(self, saga_id: str, version: int, events: Sequence[Message]) -> tuple[Saga, int]:
        assert all(isinstance(e, StringValue) for e in events)
        events = cast(Sequence[StringValue], events)
        stream = self.streams.setdefault(saga_id, [])
        first = events[0] if events else None
        intrusion = self.intrusions.pop(first.value, None) if first is not None else None
        if intrusion is not None:  # another writer got there first
            stream.append(event(intrusion))
        if version != len(stream):
            self.stale += 1
            raise StaleStream(saga_id, version)
        stream.extend(events)
        return fold(stream), len(stream)

    def append(self, saga_id: str, value: str) -> None:
        """Another writer's event."""
        self.streams.setdefault(saga_id, []).append(event(value))

    def values(self, saga_id: str) -> list[str]:
        return list(fold(self.streams.get(saga_id, [])).history)


@dataclass(frozen=True)
class AfterEffect:
    """The participant applies the step, then its answer is lost (`then` is raised) or slow
    (`then` is awaited before answering)."""

    then: BaseException | Callable[[], Awaitable[None]]


Outcome = BaseException | AfterEffect | Callable[[], Awaitable[None]]
"""An exception is raised before the effect; a coroutine function is awaited before it (a
slow call, or another writer acting meanwhile); an AfterEffect acts after it."""


@dataclass
class Participant:
    """One side of one step on a remote service: a script of outcomes (then success), the
    contexts it was called with, and its effects, applied once per idempotency key."""

    label: str
    log: list[str]
    returns: tuple[str, ...] = ()
    script: list[Outcome] = field(default_factory=list)
    calls: list[StepContext] = field(default_factory=list)
    effects: list[str] = field(default_factory=list)
    cancelled: int = 0

    async def __call__(self, state: Saga, context: StepContext) -> Sequence[Message]:
        self.calls.append(context)
        self.log.append(self.label)
        outcome = self.script.pop(0) if self.script else None
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            await self._wait(outcome)
        key = context.idempotency_key()
        if key not in self.effects:
            self.effects.append(key)
        if isinstance(outcome, AfterEffect):
            if isinstance(outcome.then, BaseException):
                raise outcome.then
            await self._wait(outcome.then)
        return [event(value) for value in self.returns]

    async def _wait(self, outcome: Callable[[], Awaitable[None]]) -> None:
        try:
            await outcome()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    def fail(self, code: grpc.StatusCode, times: int, details: str = "down") -> None:
        self.script.extend(rpc_error(code, details) for _ in range(times))

    @property
    def attempts(self) -> list[int]:
        return [c.attempt for c in self.calls]

    @property
    def keys(self) -> list[str]:
        return [c.idempotency_key() for c in self.calls]


class Participants:
    """Each step's action ("a") and compensation ("undo a"), logging calls in one list."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.actions: dict[str, Participant] = {}
        self.undos: dict[str, Participant] = {}

    def do(self, name: str) -> Participant:
        if name not in self.actions:
            self.actions[name] = Participant(name, self.log, returns=(f"done:{name}",))
        return self.actions[name]

    def undo(self, name: str) -> Participant:
        if name not in self.undos:
            self.undos[name] = Participant(f"undo {name}", self.log)
        return self.undos[name]

    def steps(
        self, *names: str, retry: StepRetry | None = None, timeout: float = 5.0
    ) -> list[Step[Saga]]:
        return [Step(n, self.do(n), self.undo(n), retry or StepRetry(), timeout) for n in names]


@dataclass
class Definition:
    """The test saga's definition: its steps, a fixed deadline, and one event per outcome."""

    steps: Sequence[Step[Saga]]
    deadline_at: float = math.inf
    name: str = "test-saga"

    def progress(self, state: Saga) -> Progress:
        return state.progress

    def deadline(self, state: Saga) -> float:
        return self.deadline_at

    def failed(self, state: Saga, step: str, reason: str) -> Sequence[Message]:
        return [event(f"failed:{step}:{reason}")]

    def compensated(self, state: Saga, step: str) -> Sequence[Message]:
        return [event(f"undone:{step}")]

    def completed(self, state: Saga) -> Sequence[Message]:
        return [event("completed")]

    def aborted(self, state: Saga) -> Sequence[Message]:
        return [event("aborted")]


class FakeClock:
    """Epoch seconds that move only when a mover task sleeps (the saga's retry delays) or
    the test advances them; other tasks' sleeps (the lease renewal timer) wait for time to
    reach their wake-up."""

    def __init__(self, now: float = START) -> None:
        self.now = now
        self.delays: list[float] = []
        self.movers: set[asyncio.Task[Any]] = set()
        self._waiting: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time on, and wake the sleepers whose time came."""
        self.now += seconds
        for wake, sleeper in self._waiting:
            if wake <= self.now and not sleeper.done():
                sleeper.set_result(None)
        self._waiting = [(w, s) for w, s in self._waiting if not s.done()]

    def pause(self, seconds: float) -> None:
        """Move time on with no timer firing: the process was paused (GC, a stopped VM)."""
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        if asyncio.current_task() in self.movers:
            self.delays.append(seconds)
            self.advance(seconds)
            await asyncio.sleep(0)
            return
        sleeper = asyncio.get_running_loop().create_future()
        self._waiting.append((self.now + seconds, sleeper))
        try:
            await sleeper
        finally:
            sleeper.cancel()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def database(locate: Locate) -> AsyncIterator[Database]:
    async with await open_database(locate("sagas"), schema=(saga_lease.SCHEMA,)) as db:
        yield db


@pytest.fixture
async def other_database(database: Database, locate: Locate) -> AsyncIterator[Database]:
    """A second connection to the same database: another instance of the service."""
    async with await open_database(locate("sagas")) as db:
        yield db


def runner(
    definition: Definition,
    journal: Journal,
    database: Database,
    clock: FakeClock,
    owner: str = "instance-a",
    **options: Any,
) -> SagaRunner[Saga]:
    leases = Leases(database, owner, ttl=TTL, clock=clock)
    journal.database = journal.database or database
    return SagaRunner(definition, journal, leases, clock=clock, sleep=clock.sleep, **options)


async def started(
    saga_runner: SagaRunner[Saga], clock: FakeClock, saga_id: str
) -> asyncio.Task[Saga | None]:
    task = await saga_runner.start(saga_id)
    assert task is not None, "the lease was not free"
    clock.movers.add(task)
    return task


async def finished(task: asyncio.Task[Saga | None]) -> asyncio.Task[Saga | None]:
    """The task once it has ended (it waits on SQLite's threads, not on time)."""
    await asyncio.wait({task}, timeout=DEADLINE_S)
    assert task.done(), "the saga did not end"
    return task


async def expires_at(database: Database, saga_id: str) -> float | None:
    row = await database.fetch_one("SELECT expires_at FROM leases WHERE name = ?", (saga_id,))
    return None if row is None else float(row[0])


async def eventually(read: Callable[[], Awaitable[object]], expected: object) -> None:
    """Poll until `read` gives `expected` (another task's SQLite write), with a deadline."""
    give_up = asyncio.get_running_loop().time() + DEADLINE_S
    while (found := await read()) != expected:
        assert asyncio.get_running_loop().time() < give_up, f"{found} != {expected}"
        await asyncio.sleep(0.001)


async def run(saga_runner: SagaRunner[Saga], clock: FakeClock, saga_id: str) -> Saga | None:
    task = await finished(await started(saga_runner, clock, saga_id))
    return task.result()


# -- driving -----------------------------------------------------------------------------


async def test_the_steps_run_in_order_once_each_and_the_saga_completes(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    saga_runner = runner(Definition(parts.steps("a", "b", "c")), journal, database, clock)

    final = await run(saga_runner, clock, "saga-1")

    assert parts.log == ["a", "b", "c"]
    assert journal.values("saga-1") == ["done:a", "done:b", "done:c", "completed"]
    assert final == (await journal.load("saga-1"))[0]
    assert final is not None and final.progress.ended and final.progress.failure is None
    assert clock.delays == [] and saga_runner.driving() == frozenset()
    assert await saga_runner.leases.holder("saga-1") is None
    other = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    assert await other.take("saga-1"), "the lease was released: another can take it at once"


async def test_a_saga_started_while_serving_a_call_outlives_its_deadline(
    database: Database, clock: FakeClock
) -> None:
    """The steps' calls are not bounded by the deadline of the call that started the saga
    (PlaceOrder's caller may give up after 2 s; the saga goes on)."""
    parts, journal = Participants(), Journal()
    seen: list[Deadline | None] = []
    action = parts.do("a")

    async def step(state: Saga, context: StepContext) -> Sequence[Message]:
        seen.append(current_deadline())
        return await action(state, context)

    steps = [Step("a", step, parts.undo("a"))]
    saga_runner = runner(Definition(steps), journal, database, clock)
    with inbound_deadline(Deadline.after(2.0)):
        assert current_deadline() is not None
        final = await run(saga_runner, clock, "saga-1")
    assert final is not None and final.progress.ended
    assert seen == [None]


async def test_an_ended_saga_is_not_driven_again(database: Database, clock: FakeClock) -> None:
    parts, journal = Participants(), Journal()
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)
    await run(saga_runner, clock, "saga-1")
    again = await run(saga_runner, clock, "saga-1")
    assert again is not None and again.progress.ended
    assert parts.log == ["a"] and journal.values("saga-1") == ["done:a", "completed"]


async def test_a_retryable_failure_is_retried_with_the_policys_delays(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("b").fail(UNAVAILABLE, 4)
    saga_runner = runner(Definition(parts.steps("a", "b")), journal, database, clock)

    await run(saga_runner, clock, "saga-1")

    assert clock.delays == [1, 2, 4, 8]
    assert parts.do("b").attempts == [1, 2, 3, 4, 5]
    assert parts.log == ["a", "b", "b", "b", "b", "b"]
    assert journal.values("saga-1") == ["done:a", "done:b", "completed"]


async def test_maximum_attempts_ends_a_step_and_the_saga_compensates(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("a").fail(UNAVAILABLE, 10, "still down")
    steps = parts.steps("a", retry=StepRetry(maximum_attempts=3))
    saga_runner = runner(Definition(steps), journal, database, clock)

    await run(saga_runner, clock, "saga-1")

    assert parts.do("a").attempts == [1, 2, 3] and clock.delays == [1, 2]
    assert journal.values("saga-1") == [
        "failed:a:a: UNAVAILABLE: still down",
        "undone:a",
        "aborted",
    ]


async def test_a_non_retryable_failure_compensates_at_once_last_first(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("c").fail(FAILED_PRECONDITION, 1, "no courier")
    saga_runner = runner(Definition(parts.steps("a", "b", "c", "d")), journal, database, clock)

    final = await run(saga_runner, clock, "saga-1")

    assert clock.delays == []
    assert parts.log == ["a", "b", "c", "undo c", "undo b", "undo a"]
    assert journal.values("saga-1") == [
        "done:a",
        "done:b",
        "failed:c:c: FAILED_PRECONDITION: no courier",
        "undone:c",
        "undone:b",
        "undone:a",
        "aborted",
    ]
    assert final is not None and final.progress.failed_step == "c"
    assert [parts.undo(n).calls[0].compensating for n in "abc"] == [True] * 3
    assert parts.undo("d").calls == []
    assert parts.undo("c").keys == ["saga-1/c/undo"]


async def test_steps_without_a_compensation_are_skipped_when_undoing(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("c").fail(FAILED_PRECONDITION, 1)
    a, b, c = parts.steps("a", "b", "c")
    definition = Definition([a, replace(b, compensation=None), c])
    await run(runner(definition, journal, database, clock), clock, "saga-1")
    assert parts.log == ["a", "b", "c", "undo c", "undo a"]
    assert journal.values("saga-1")[-3:] == ["undone:c", "undone:a", "aborted"]


async def test_a_step_still_failing_at_the_deadline_stops_and_compensates(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("b").fail(UNAVAILABLE, 100)
    definition = Definition(parts.steps("a", "b", timeout=5), deadline_at=START + 10)
    saga_runner = runner(definition, journal, database, clock)

    await run(saga_runner, clock, "saga-1")

    # Attempts at +0, +1, +3 and +7; the next delay (8 s) would end past the deadline.
    assert clock.delays == [1, 2, 4] and clock.now == START + 7
    assert parts.do("b").attempts == [1, 2, 3, 4]
    assert [c.timeout for c in parts.do("b").calls] == [5, 5, 5, 3]
    assert journal.values("saga-1") == [
        "done:a",
        "failed:b:b: UNAVAILABLE: down (no time left before the saga's deadline)",
        "undone:b",
        "undone:a",
        "aborted",
    ]


async def test_a_saga_recovered_past_its_deadline_compensates_without_trying(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    journal.append("saga-1", "done:a")
    definition = Definition(parts.steps("a", "b"), deadline_at=START)
    await run(runner(definition, journal, database, clock), clock, "saga-1")
    assert parts.log == ["undo b", "undo a"]
    assert journal.values("saga-1")[1:] == [
        "failed:b:b did not succeed before the saga's deadline",
        "undone:b",
        "undone:a",
        "aborted",
    ]


async def test_compensations_are_retried_until_they_succeed(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("b").fail(FAILED_PRECONDITION, 1)
    parts.undo("a").fail(UNAVAILABLE, 3)
    # maximum_attempts bounds the step, not its compensation.
    steps = parts.steps("a", "b", retry=StepRetry(maximum_attempts=1))
    await run(runner(Definition(steps), journal, database, clock), clock, "saga-1")

    assert parts.undo("a").attempts == [1, 2, 3, 4] and clock.delays == [1, 2, 4]
    assert len(set(parts.undo("a").keys)) == 1
    assert journal.values("saga-1")[-3:] == ["undone:b", "undone:a", "aborted"]


async def test_a_refused_compensation_is_logged_and_counted_as_done(
    database: Database, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("c").fail(FAILED_PRECONDITION, 1)
    parts.undo("b").fail(FAILED_PRECONDITION, 1, "already shipped")
    saga_runner = runner(Definition(parts.steps("a", "b", "c")), journal, database, clock)

    with caplog.at_level(logging.ERROR, logger="meshkit.saga.orchestrator"):
        await run(saga_runner, clock, "saga-1")

    assert parts.undo("b").attempts == [1] and clock.delays == []
    assert parts.log[-3:] == ["undo c", "undo b", "undo a"]
    assert journal.values("saga-1")[-4:] == ["undone:c", "undone:b", "undone:a", "aborted"]
    refused = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(refused) == 1
    assert "refused" in refused[0].getMessage()
    assert "already shipped" in refused[0].getMessage()


async def test_the_events_a_compensation_returns_are_recorded(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("b").fail(FAILED_PRECONDITION, 1)
    parts.undo("a").returns = ("note:voided p-1",)
    await run(runner(Definition(parts.steps("a", "b")), journal, database, clock), clock, "s")
    assert journal.values("s")[-3:] == ["note:voided p-1", "undone:a", "aborted"]


# -- idempotency keys --------------------------------------------------------------------


async def test_the_idempotency_key_is_the_same_on_every_attempt(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    parts.do("a").fail(UNAVAILABLE, 2)
    await run(runner(Definition(parts.steps("a")), journal, database, clock), clock, "saga-1")
    assert parts.do("a").attempts == [1, 2, 3]
    assert parts.do("a").keys == ["saga-1/a/do"] * 3
    assert parts.do("a").effects == ["saga-1/a/do"]


@pytest.mark.parametrize("crash", ["raises", "stops"])
async def test_a_step_run_again_after_a_crash_has_one_effect(
    database: Database, other_database: Database, clock: FakeClock, crash: str
) -> None:
    parts, journal = Participants(), Journal()
    definition = Definition(parts.steps("a", "b", "c"))
    first = runner(definition, journal, database, clock, owner="instance-a")
    if crash == "raises":
        # b's call had its effect, then the process died before recording the result.
        parts.do("b").script.append(AfterEffect(RuntimeError("the process died")))
        task = await finished(await started(first, clock, "saga-1"))
        assert task.result() is None, "logged; the lease lapses and recovery tries again"
    else:
        # b's effect happened, and the process stops while the answer is on its way.
        applied = asyncio.Event()

        async def applied_then_slow() -> None:
            applied.set()
            await asyncio.Event().wait()

        parts.do("b").script.append(AfterEffect(applied_then_slow))
        task = await started(first, clock, "saga-1")
        await asyncio.wait_for(applied.wait(), DEADLINE_S)
        await first.close()
        assert task.cancelled()
    # b's effect happened and its result was never recorded.
    assert parts.do("b").effects == ["saga-1/b/do"]
    assert journal.values("saga-1") == ["done:a"]

    second = runner(definition, journal, other_database, clock, owner="instance-b")
    if crash == "raises":
        assert await second.start("saga-1") is None, "the failed instance's lease still holds"
        clock.advance(TTL)
    # else: close() released the lease, so the other instance takes over at once.
    final = await run(second, clock, "saga-1")

    assert final is not None and final.progress.ended
    assert parts.log == ["a", "b", "b", "c"]
    assert parts.do("b").keys == ["saga-1/b/do", "saga-1/b/do"]
    assert parts.do("b").effects == ["saga-1/b/do"], "the participant applied b once"
    assert journal.values("saga-1") == ["done:a", "done:b", "done:c", "completed"]


# -- other writers -----------------------------------------------------------------------


async def test_a_cancellation_during_a_step_keeps_its_result_and_compensates_it(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()

    async def customer_cancels() -> None:
        journal.append("saga-1", "cancel:cancelled by the customer")

    parts.do("a").script.append(customer_cancels)
    saga_runner = runner(Definition(parts.steps("a", "b")), journal, database, clock)

    final = await run(saga_runner, clock, "saga-1")

    assert journal.stale == 1
    assert journal.values("saga-1") == [
        "cancel:cancelled by the customer",
        "done:a",
        "undone:a",
        "aborted",
    ]
    assert parts.log == ["a", "undo a"], "b never ran, a was undone"
    assert final is not None and final.progress.failure == "cancelled by the customer"


async def test_a_result_another_holder_recorded_first_is_not_recorded_twice(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()

    async def old_holder_records_a() -> None:
        journal.append("saga-1", "done:a")

    parts.do("a").script.append(old_holder_records_a)
    saga_runner = runner(Definition(parts.steps("a", "b")), journal, database, clock)
    await run(saga_runner, clock, "saga-1")
    assert journal.stale == 1
    assert journal.values("saga-1") == ["done:a", "done:b", "completed"]


async def test_a_cancellation_just_before_completing_turns_the_saga_around(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    journal.intrusions["completed"] = "cancel:cancelled by the customer"
    saga_runner = runner(Definition(parts.steps("a", "b")), journal, database, clock)

    final = await run(saga_runner, clock, "saga-1")

    assert journal.values("saga-1") == [
        "done:a",
        "done:b",
        "cancel:cancelled by the customer",
        "undone:b",
        "undone:a",
        "aborted",
    ]
    assert final is not None and final.progress.failure == "cancelled by the customer"


# -- leases ------------------------------------------------------------------------------


async def test_one_owner_holds_a_lease_until_it_lapses(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    a = Leases(database, "instance-a", ttl=TTL, clock=clock)
    b = Leases(other_database, "instance-b", ttl=TTL, clock=clock)

    assert await a.take("s") and not await b.take("s")
    assert await a.holder("s") == await b.holder("s") == "instance-a"
    clock.advance(TTL - 1)
    assert await a.take("s"), "renewed: the ttl counts from now"
    clock.advance(TTL - 1)
    assert not await b.take("s")
    assert not await b.release("s")
    assert await a.holder("s") == "instance-a", "only the owner releases"

    clock.advance(1)
    assert await a.holder("s") is None and await b.holder("s") is None
    assert await b.take("s") and not await a.take("s")
    assert await a.holder("s") == "instance-b"
    await a.release("s")
    assert await b.holder("s") == "instance-b"
    await b.release("s")
    assert await a.holder("s") is None
    assert await a.take("s")


async def test_a_fence_renews_or_releases_in_the_writes_transaction_and_rolls_back_with_it(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    a = Leases(database, "instance-a", ttl=TTL, clock=clock)
    b = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    assert await a.take("s")
    clock.advance(TTL / 2)
    commits = database.commits
    async with database.transaction() as transaction:
        await a.fence("s")(transaction)
    assert database.commits == commits + 1, "no transaction of its own"
    assert await expires_at(database, "s") == clock.now + TTL, "renewed"

    renewed_until = clock.now + TTL
    clock.advance(1)
    with pytest.raises(RuntimeError):
        async with database.transaction() as transaction:
            await a.fence("s", release=True)(transaction)
            raise RuntimeError("the write failed")
    assert await expires_at(database, "s") == renewed_until, "the release rolled back"

    clock.pause(TTL)
    assert await b.take("s"), "lapsed: taken over"
    for release in (False, True):
        with pytest.raises(LeaseLost):
            async with database.transaction() as transaction:
                await a.fence("s", release=release)(transaction)
    async with other_database.transaction() as transaction:
        await b.fence("s", release=True)(transaction)
    assert await a.holder("s") is None and await a.take("s")


async def test_leases_are_per_saga(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    a = Leases(database, "instance-a", ttl=TTL, clock=clock)
    b = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    assert await a.take("s1") and await b.take("s2")
    assert await a.holder("s2") == "instance-b" and await b.holder("s1") == "instance-a"


async def test_concurrent_takes_have_one_winner(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    a = Leases(database, "instance-a", ttl=TTL, clock=clock)
    b = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    taken = await asyncio.gather(a.take("s"), b.take("s"))
    assert sorted(taken) == [False, True]


@pytest.mark.parametrize("ttl", [0, -1, math.nan])
async def test_a_lease_ttl_must_be_positive(database: Database, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        Leases(database, "instance-a", ttl=ttl)


async def test_start_returns_none_while_another_instance_holds_the_lease(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    other = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    assert await other.take("saga-1")
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)
    assert await saga_runner.start("saga-1") is None
    assert saga_runner.driving() == frozenset() and parts.log == []
    assert await other.holder("saga-1") == "instance-b"


async def test_concurrent_starts_of_one_saga_drive_it_once(
    database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    gate = asyncio.Event()
    parts.do("a").script.append(gate.wait)
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)

    first, second = await asyncio.gather(saga_runner.start("s"), saga_runner.start("s"))

    assert first is not None and first is second
    assert saga_runner.driving() == {"s"}
    gate.set()
    await finished(first)
    assert parts.log == ["a"] and saga_runner.driving() == frozenset()


async def test_recover_starts_only_sagas_whose_lease_is_free_or_lapsed(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    gate = asyncio.Event()
    parts.do("a").script.extend([gate.wait, gate.wait])
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)
    short = Leases(other_database, "instance-b", ttl=5, clock=clock)
    long = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    assert await short.take("lapsed") and await long.take("held")
    clock.advance(5)

    ids = ["free", "held", "lapsed"]
    assert await saga_runner.recover(ids) == 2
    assert saga_runner.driving() == {"free", "lapsed"}
    assert await saga_runner.recover(ids) == 0, "the ones it drives are not started again"
    tasks = [await saga_runner.start(saga_id) for saga_id in ("free", "lapsed")]
    assert len({id(t) for t in tasks}) == 2 and None not in tasks, "the running tasks"
    gate.set()
    for task in tasks:
        assert task is not None and (await finished(task)).result() is not None
    assert journal.values("free") == journal.values("lapsed") == ["done:a", "completed"]
    assert journal.values("held") == []
    assert await long.holder("held") == "instance-b"


async def test_a_paused_holder_whose_lease_was_taken_records_nothing_more(
    database: Database,
    other_database: Database,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts, journal = Participants(), Journal()
    definition = Definition(parts.steps("a", "b"))
    takeover = Leases(other_database, "instance-b", ttl=TTL, clock=clock)

    async def paused_and_taken_over() -> None:
        clock.pause(TTL + 1)
        assert await takeover.take("saga-1")

    parts.do("b").script.append(paused_and_taken_over)
    first = runner(definition, journal, database, clock, owner="instance-a")

    assert await run(first, clock, "saga-1") is None
    assert "another instance took it over" in caplog.text, "found at the record, by LeaseLost"
    assert journal.values("saga-1") == ["done:a"], "b's result was not recorded"
    assert await takeover.holder("saga-1") == "instance-b"

    second = runner(definition, journal, other_database, clock, owner="instance-b")
    final = await run(second, clock, "saga-1")
    assert final is not None and final.progress.ended
    assert parts.do("b").keys == ["saga-1/b/do"] * 2 and parts.do("b").effects == ["saga-1/b/do"]
    assert journal.values("saga-1") == ["done:a", "done:b", "completed"]


async def test_drive_raises_lease_lost_when_the_lease_is_gone(
    database: Database, other_database: Database, clock: FakeClock
) -> None:
    parts, journal = Participants(), Journal()
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)
    assert await Leases(other_database, "instance-b", ttl=TTL, clock=clock).take("s")
    with pytest.raises(LeaseLost):
        await saga_runner.drive("s")
    assert parts.log == ["a"] and journal.values("s") == []


async def test_the_renewal_timer_stops_a_holder_whose_lease_was_taken(
    database: Database,
    other_database: Database,
    clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    parts, journal = Participants(), Journal()
    called = asyncio.Event()

    async def hang() -> None:
        called.set()
        await asyncio.Event().wait()

    parts.do("a").script.append(hang)
    saga_runner = runner(Definition(parts.steps("a")), journal, database, clock)
    task = await started(saga_runner, clock, "saga-1")
    await asyncio.wait_for(called.wait(), DEADLINE_S)

    # The renewal timer keeps the lease while the step hangs ...
    takeover = Leases(other_database, "instance-b", ttl=TTL, clock=clock)
    for _ in range(4):
        clock.advance(TTL / 3)
        await eventually(lambda: expires_at(database, "saga-1"), clock.now + TTL)
        assert not await takeover.take("saga-1")
    # ... until the instance is paused past the ttl and another takes the saga over.
    clock.pause(TTL)
    assert await takeover.take("saga-1")
    clock.advance(0)

    assert (await finished(task)).result() is None
    assert "lease lost; stopped" in caplog.text, "found by the renewal timer"
    assert parts.do("a").cancelled == 1, "the call in flight was cancelled"
    assert journal.values("saga-1") == []
    assert await takeover.holder("saga-1") == "instance-b"


# -- spans -------------------------------------------------------------------------------


async def test_one_span_per_step_attempt_and_per_compensation(
    database: Database, clock: FakeClock
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parts, journal = Participants(), Journal()
    parts.do("a").fail(UNAVAILABLE, 1)
    parts.do("b").fail(FAILED_PRECONDITION, 1)
    saga_runner = runner(
        Definition(parts.steps("a", "b")),
        journal,
        database,
        clock,
        tracer=provider.get_tracer("test"),
    )

    await run(saga_runner, clock, "saga-1")

    spans: Sequence[ReadableSpan] = exporter.get_finished_spans()
    assert [s.name for s in spans] == [
        "saga step a",
        "saga step a",
        "saga step b",
        "saga compensate b",
        "saga compensate a",
    ]
    assert [dict(s.attributes or {}) for s in spans] == [
        {
            "saga.name": "test-saga",
            "saga.id": "saga-1",
            "saga.step": step,
            "saga.attempt": attempt,
            "saga.compensation": compensating,
        }
        for step, attempt, compensating in [
            ("a", 1, False),
            ("a", 2, False),
            ("b", 1, False),
            ("b", 1, True),
            ("a", 1, True),
        ]
    ]
    assert [s.status.status_code for s in spans] == [
        StatusCode.ERROR,
        StatusCode.UNSET,
        StatusCode.ERROR,
        StatusCode.UNSET,
        StatusCode.UNSET,
    ]
    provider.shutdown()
