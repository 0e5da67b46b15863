"""A three-node NATS JetStream cluster (scripts/nats_server.py's NatsCluster) under the
project's own Broker: a replicated stream keeps every event when the node the client talks to
is killed, and publishing goes on through the others."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from nats.errors import Error as NatsError

from meshkit.events.broker import Broker, StreamSpec
from scripts.nats_server import NatsCluster

SPEC = StreamSpec("CLUSTERED", ("clustered.>",), replicas=3)


async def _published(broker: Broker, n: int, deadline: float) -> None:
    """Publish event `n` until JetStream acks it (a node's death makes some publishes fail
    until the client has moved to another node and the stream has a leader again)."""
    while True:
        try:
            js = await broker.ensure_stream(SPEC)
            await js.publish(f"clustered.e{n}", b"x", timeout=2, headers={"Nats-Msg-Id": str(n)})
            return
        except (NatsError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            broker.forget_streams()
            await asyncio.sleep(0.1)


async def test_a_replicated_stream_keeps_every_event_when_a_node_dies(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, size=3) as cluster:
        broker = Broker(cluster.url, "cluster-test")
        try:
            deadline = time.monotonic() + 60
            for n in range(50):
                await _published(broker, n, deadline)
            assert broker._client is not None
            connected = broker._client.connected_url
            assert connected is not None
            victim = next(node for node in cluster.nodes if node.port == connected.port)
            victim.kill()  # the node this client is connected to
            for n in range(50, 100):
                await _published(broker, n, deadline)
            assert broker._client.connected_url.port != victim.port
            js = await broker.ensure_stream(SPEC)
            info = await js.stream_info(SPEC.name)
            assert info.state.messages == 100  # none lost, none doubled (Nats-Msg-Id)
            assert info.config.num_replicas == 3
        finally:
            await broker.close()
