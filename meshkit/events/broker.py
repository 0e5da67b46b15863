"""One process's connection to NATS JetStream, and the streams it needs, declared as values.

A service must keep working while the broker is down (its events wait in its outbox), so the
connection is made in the background and never given up: nats-py retries the first connect
and every reconnect forever (`max_reconnect_attempts=-1`), every `reconnect_wait` seconds,
and whoever needs JetStream awaits `jetstream()`, or `ensure_stream(spec)`, which also
creates or updates the stream it uses (once per process). Streams are created idempotently
with explicit limits (file storage, limits retention, a maximum age and size, a duplicate
window), so that a fresh broker, or one that lost its store, gets them back from the first
instance that uses them, producer or consumer, whichever starts first.

Streams are per bounded context: `ORDERS` holds `orders.events.>`, `DELIVERY` holds
`delivery.events.>`, and `DEADLETTER` holds `deadletter.<consumer>`, where consumers put the
events they could not apply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

DAY_S = 24 * 3600.0
CONTEXT_MAX_AGE_S = 365 * DAY_S


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream with its limits. A context's stream is also what its read models
    are rebuilt from, so it keeps a year of events by default (`max_age_s`; 0 keeps them
    for ever), up to `max_bytes`, the oldest dropped first."""

    name: str
    subjects: tuple[str, ...]
    max_age_s: float = CONTEXT_MAX_AGE_S
    max_bytes: int = 4 << 30
    duplicate_window_s: float = 120.0
    """How long JetStream remembers a `Nats-Msg-Id`: a relay that republishes after a crash
    (published, not yet marked) must do so within it, which its lease period (seconds) does
    with a wide margin."""
    replicas: int = 1
    """Copies JetStream keeps, on as many nodes of a cluster (3 survives the loss of one)."""

    def config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=self.max_age_s,
            max_bytes=self.max_bytes,
            duplicate_window=self.duplicate_window_s,
            num_replicas=self.replicas,
        )


KEPT_FOR_EVER = frozenset({"catalog"})
"""Contexts whose events describe what is (a menu), not what happened: a rebuild needs the
first ItemChanged of an item however old, so their streams have no age limit."""


def context_stream(context: str) -> StreamSpec:
    """The stream of a bounded context's events: `ORDERS` for `orders.events.>`. Its limits
    come from here alone, so that every process that declares it (its relay, its consumers)
    declares the same."""
    return StreamSpec(
        context.upper().replace("-", "_"),
        (f"{context}.events.>",),
        max_age_s=0.0 if context in KEPT_FOR_EVER else CONTEXT_MAX_AGE_S,
    )


DEAD_LETTERS = StreamSpec("DEADLETTER", ("deadletter.>",), max_age_s=30 * DAY_S)


def dead_letter_subject(consumer: str) -> str:
    return f"deadletter.{consumer}"


def servers(url: str) -> list[str]:
    """The servers of a NATS_URL, which may name several, comma-separated, as the nats CLI
    reads it (nats-py takes a list): the client fails over among them by itself."""
    return [part.strip() for part in url.split(",") if part.strip()]


class Broker:
    """A NATS connection made in the background, and the streams declared on it."""

    def __init__(
        self,
        url: str,
        name: str,
        *,
        reconnect_wait: float = 0.5,
        connect_timeout: float = 2.0,
        stream_replicas: int | None = None,
    ) -> None:
        """`stream_replicas`: the copies every stream this broker declares keeps (3 on a
        JetStream cluster of three, so that a stream survives the loss of a node), whatever
        its spec says; None keeps each spec's."""
        if stream_replicas is not None and not 1 <= stream_replicas <= 5:
            raise ValueError(f"stream replicas: 1 to 5 (JetStream's limit), got {stream_replicas}")
        self.url = url
        self._replicas = stream_replicas
        self.name = name
        self._reconnect_wait = reconnect_wait
        self._connect_timeout = connect_timeout
        self._client: Client | None = None
        self._ready: asyncio.Task[JetStreamContext] | None = None
        self._declared: set[str] = set()

    def start(self) -> None:
        """Begin connecting (in the background)."""
        if self._ready is None:
            self._ready = asyncio.get_running_loop().create_task(
                self._connect(), name=f"nats connect {self.url}"
            )

    async def jetstream(self) -> JetStreamContext:
        """The JetStream context, once connected."""
        self.start()
        assert self._ready is not None
        return await asyncio.shield(self._ready)

    async def ensure_stream(self, spec: StreamSpec) -> JetStreamContext:
        """The JetStream context, with `spec`'s stream created or updated to its limits
        (once per process, or again after forget_streams())."""
        js = await self.jetstream()
        if spec.name not in self._declared:
            if self._replicas is not None:
                spec = dataclasses.replace(spec, replicas=self._replicas)
            try:
                await js.stream_info(spec.name)
            except NotFoundError:
                await js.add_stream(spec.config())
            else:
                await js.update_stream(spec.config())
            self._declared.add(spec.name)
            log.info("NATS at %s: stream %s declared", self.url, spec.name)
        return js

    def forget_streams(self) -> None:
        """Declare streams again on their next use: the broker lost them (a publish found no
        stream: a fresh store)."""
        self._declared.clear()

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    async def _connect(self) -> JetStreamContext:
        async def disconnected() -> None:
            log.warning("NATS at %s: disconnected; events wait in the outbox", self.url)

        async def reconnected() -> None:
            log.info("NATS at %s: reconnected", self.url)

        async def error(exc: Exception) -> None:
            log.debug("NATS at %s: %s", self.url, exc)

        self._client = await nats.connect(
            servers(self.url),
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=self._reconnect_wait,
            connect_timeout=self._connect_timeout,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=error,
        )
        log.info("NATS at %s: connected", self.url)
        return self._client.jetstream()

    async def close(self) -> None:
        """Stop connecting, or close the connection. Not a drain: nothing is left to flush
        (a relay waits for each PubAck) and a delivery not acked comes again to another
        consumer, whereas a drain waits for the subscriptions' pending fetches."""
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
            await asyncio.gather(self._ready, return_exceptions=True)
        if self._client is not None and not self._client.is_closed:
            await self._client.close()
