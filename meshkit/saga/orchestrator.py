"""The orchestrator: drives one saga at a time per lease, from its recorded state.

    runner = SagaRunner(definition, journal, leases, tracer=tracer)
    task = await runner.start(order_id)    # drives it in the background, if the lease is ours
    ...
    await runner.recover(unfinished_ids)   # at start, and whenever a lease may have lapsed

The loop is the whole algorithm. Load the saga's state and read its progress. Going forward:
run the first step not done (retrying as its policy says, within the saga's deadline) and
record its events; when all are done, record the definition's `completed` events. A step
that fails for good, or the deadline, records the `failed` events, and from then on the saga
compensates: the done steps and the failed one, last first, each retried until it succeeds,
then the `aborted` events. Every record is an append at the version the state was read at:
when another writer got there first (a cancellation, or a lapsed lease's old holder), the
state is reloaded and the record made again only if it is still news. Each recorded result is
one transaction with the state it produces and the renewal of the saga's lease (the last one
gives the lease up), so a crash between any two lines loses at most the step in flight, which
runs again with the same idempotency key, and a saga of n steps that nothing interrupts
costs n + 1 transactions after the one that began it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from mesh.core.deadline import inbound_deadline
from meshkit.events.store import StaleStream
from meshkit.saga.steps import Progress, State, Step, StepContext
from meshkit.storage.lease import Fence, LeaseLost, Leases

log = logging.getLogger(__name__)
Recorded = TypeVar("Recorded", covariant=True)


class SagaJournal(Protocol[Recorded]):
    """Where a saga's state is recorded: load it, and append events at a version."""

    async def load(self, saga_id: str) -> tuple[Recorded, int]:
        """The saga's state and the version it was read at."""
        ...

    async def record(
        self, saga_id: str, version: int, events: Sequence[Message], fence: Fence | None = None
    ) -> tuple[Recorded, int]:
        """Append events after `version` and return the new state and version;
        StaleStream when the saga moved on since `version`. `fence` (the runner's lease
        check) runs first in the append's transaction; what it raises rolls it back."""
        ...


class SagaDefinition(Protocol[State]):
    """A saga type: its steps, how its state shows progress, and the events that record
    the saga-level outcomes."""

    @property
    def name(self) -> str: ...

    @property
    def steps(self) -> Sequence[Step[State]]: ...

    def progress(self, state: State) -> Progress: ...

    def deadline(self, state: State) -> float:
        """When (epoch seconds) the saga stops going forward and compensates."""
        ...

    def failed(self, state: State, step: str, reason: str) -> Sequence[Message]: ...

    def compensated(self, state: State, step: str) -> Sequence[Message]: ...

    def completed(self, state: State) -> Sequence[Message]: ...

    def aborted(self, state: State) -> Sequence[Message]: ...


class SagaRunner(Generic[State]):
    """Drives sagas of one definition, each while holding its lease."""

    def __init__(
        self,
        definition: SagaDefinition[State],
        journal: SagaJournal[State],
        leases: Leases,
        *,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.definition = definition
        self._journal = journal
        self.leases = leases
        self._tracer = tracer
        self._clock = clock
        self._sleep = sleep
        self._driving: dict[str, asyncio.Task[State | None]] = {}

    # -- starting -----------------------------------------------------------------------

    async def start(
        self, saga_id: str, *, leased: bool = False
    ) -> asyncio.Task[State | None] | None:
        """Drive the saga in the background if this process gets its lease (the task ends
        with the final state, or None when the lease was lost); None if another holds it.
        `leased`: the caller took it already, in the transaction that began the saga
        (`leases.take(saga_id, transaction)`), which saves a transaction per saga."""
        running = self.running(saga_id)
        if running is not None:
            return running
        if not leased and not await self.leases.take(saga_id):
            return None
        # Taking the lease awaited: another start() of this saga (PlaceOrder's and the
        # recovery loop's) may have started it meanwhile, and one process drives it once.
        running = self.running(saga_id)
        if running is not None:
            return running
        # The saga outlives the call that starts it: its task keeps the caller's trace (one
        # trace from PlaceOrder to every step) but not the inbound call's deadline, which
        # would otherwise bound every step's call (mesh/core/deadline.py).
        with inbound_deadline(None):
            task = asyncio.get_running_loop().create_task(
                self._drive_leased(saga_id), name=f"saga {saga_id}"
            )
        self._driving[saga_id] = task
        task.add_done_callback(lambda _: self._forget(saga_id, task))
        return task

    async def recover(self, saga_ids: Iterable[str]) -> int:
        """Start every unfinished saga whose lease is free or lapsed; how many started."""
        started = 0
        for saga_id in saga_ids:
            if saga_id not in self._driving and await self.start(saga_id) is not None:
                started += 1
        return started

    def driving(self) -> frozenset[str]:
        """The sagas this process drives now."""
        return frozenset(self._driving)

    def running(self, saga_id: str) -> asyncio.Task[State | None] | None:
        """The task driving the saga, unless it has ended (its done callback may not have
        run yet: a saga started again then, after a cancellation, needs a new task)."""
        running = self._driving.get(saga_id)
        return None if running is None or running.done() else running

    def _forget(self, saga_id: str, task: asyncio.Task[State | None]) -> None:
        """Drop an ended task, but not the one that replaced it."""
        if self._driving.get(saga_id) is task:
            del self._driving[saga_id]

    async def close(self) -> None:
        """Stop driving and release the leases, so that another instance resumes the sagas
        at its next recovery instead of after a lease period."""
        driving = dict(self._driving)
        for task in driving.values():
            task.cancel()
        await asyncio.gather(*driving.values(), return_exceptions=True)
        for saga_id in driving:
            try:
                await self.leases.release(saga_id)
            except Exception:  # the lease lapses by itself
                log.warning("%s %s: lease not released", self.definition.name, saga_id)

    # -- driving ------------------------------------------------------------------------

    async def _drive_leased(self, saga_id: str) -> State | None:
        renewing = asyncio.get_running_loop().create_task(self._keep_lease(saga_id))
        driving = asyncio.current_task()
        assert driving is not None

        def lost(renewal: asyncio.Task[None]) -> None:
            if not renewal.cancelled() and renewal.exception() is not None:
                driving.cancel()

        renewing.add_done_callback(lost)
        try:
            state = await self.drive(saga_id)
        except LeaseLost:
            log.warning("%s %s: another instance took it over", self.definition.name, saga_id)
            return None
        except Exception:
            # A bug or a broken store: the lease lapses and recovery tries again later.
            log.exception("%s %s: driving failed", self.definition.name, saga_id)
            return None
        except asyncio.CancelledError:
            if renewing.done() and not renewing.cancelled():
                log.warning("%s %s: lease lost; stopped", self.definition.name, saga_id)
                return None
            raise
        finally:
            renewing.cancel()
        return state

    async def _keep_lease(self, saga_id: str) -> None:
        while True:
            await self._sleep(self.leases.ttl / 3)
            if not await self.leases.take(saga_id):
                raise LeaseLost(saga_id)

    async def drive(self, saga_id: str) -> State:
        """Run the saga to its end from its recorded state (the caller holds its lease, and
        this gives it up at the end)."""
        definition = self.definition
        state, version = await self._journal.load(saga_id)
        released = False
        while True:
            progress = definition.progress(state)
            if progress.ended:
                if not released:  # another writer ended it, or it had ended already
                    await self.leases.release(saga_id)
                return state
            news: Callable[[Progress], bool]
            final = False
            if progress.failure is None:
                step = next((s for s in definition.steps if s.name not in progress.done), None)
                if step is None:
                    events, news = definition.completed(state), _completion_news
                    final = True
                else:
                    events = await self._forward(saga_id, state, step)
                    news = _forward_news(step.name)
            else:
                step = self._next_compensation(progress)
                if step is None:
                    events, news = definition.aborted(state), _not_ended
                    final = True
                else:
                    undone = await self._compensate(saga_id, state, step)
                    events = [*undone, *definition.compensated(state, step.name)]
                    news = _compensation_news(step.name)
            fence = self.leases.fence(saga_id, release=final)
            state, version, recorded = await self._record(saga_id, version, events, news, fence)
            released = final and recorded

    def _next_compensation(self, progress: Progress) -> Step[State] | None:
        for step in reversed(self.definition.steps):
            touched = step.name in progress.done or step.name == progress.failed_step
            if touched and step.name not in progress.compensated:
                if step.compensation is None:
                    continue
                return step
        return None

    async def _record(
        self,
        saga_id: str,
        version: int,
        events: Sequence[Message],
        still_news: Callable[[Progress], bool],
        fence: Fence,
    ) -> tuple[State, int, bool]:
        """The state and version after recording `events` (True), or after another writer
        made them old news (False)."""
        while True:
            try:
                return (*await self._journal.record(saga_id, version, events, fence), True)
            except StaleStream:
                state, version = await self._journal.load(saga_id)
                if not still_news(self.definition.progress(state)):
                    return state, version, False

    async def _forward(self, saga_id: str, state: State, step: Step[State]) -> Sequence[Message]:
        """The step's result events, or the saga's `failed` events."""
        deadline = self.definition.deadline(state)
        attempt = 1
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return self.definition.failed(
                    state, step.name, f"{step.name} did not succeed before the saga's deadline"
                )
            context = StepContext(saga_id, step.name, attempt, min(remaining, step.timeout))
            try:
                with self._span(step.name, context):
                    return await step.action(state, context)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                reason = f"{step.name}: {code.name}: {error.details()}"
                if not step.retry.retries(code, attempt):
                    return self.definition.failed(state, step.name, reason)
                delay = step.retry.delay(attempt)
                if self._clock() + delay >= deadline:
                    return self.definition.failed(
                        state, step.name, f"{reason} (no time left before the saga's deadline)"
                    )
                log.info(
                    "%s %s: %s; retrying in %.1fs", self.definition.name, saga_id, reason, delay
                )
                await self._sleep(delay)
                attempt += 1

    async def _compensate(self, saga_id: str, state: State, step: Step[State]) -> Sequence[Message]:
        """Run the step's compensation until it succeeds (or is refused for good); the
        events it returns (none when refused)."""
        assert step.compensation is not None
        attempt = 1
        while True:
            context = StepContext(saga_id, step.name, attempt, step.timeout, compensating=True)
            try:
                with self._span(step.name, context):
                    return await step.compensation(state, context)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code in step.retry.non_retryable:
                    log.error(
                        "%s %s: the compensation of %s was refused (%s: %s); it cannot be "
                        "undone by retrying",
                        self.definition.name,
                        saga_id,
                        step.name,
                        code.name,
                        error.details(),
                    )
                    return ()
                delay = step.retry.delay(attempt)
                log.warning(
                    "%s %s: compensating %s failed (%s); retrying in %.1fs",
                    self.definition.name,
                    saga_id,
                    step.name,
                    code.name,
                    delay,
                )
                await self._sleep(delay)
                attempt += 1

    def _span(self, step: str, context: StepContext) -> AbstractContextManager[Any]:
        if self._tracer is None:
            return nullcontext()
        kind = "compensate" if context.compensating else "step"
        return self._tracer.start_as_current_span(
            f"saga {kind} {step}",
            attributes={
                "saga.name": self.definition.name,
                "saga.id": context.saga_id,
                "saga.step": step,
                "saga.attempt": context.attempt,
                "saga.compensation": context.compensating,
            },
        )


def _not_ended(progress: Progress) -> bool:
    return not progress.ended


def _completion_news(progress: Progress) -> bool:
    """Completing is decided on a state without a failure: a cancellation recorded meanwhile
    turns the saga to compensation instead of being overwritten by its confirmation."""
    return not progress.ended and progress.failure is None


def _forward_news(step: str) -> Callable[[Progress], bool]:
    return lambda progress: not progress.ended and step not in progress.done


def _compensation_news(step: str) -> Callable[[Progress], bool]:
    return lambda progress: not progress.ended and step not in progress.compensated
