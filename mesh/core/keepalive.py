"""HTTP/2 keepalive settings that the client and the server side agree on.

A client that pings more often than the server permits gets GOAWAY(too_many_pings) and
loses its connection; gRPC servers allow one ping per 5 minutes by default. Both sides take
their numbers from here, so the server always permits what the client sends: the client
pings every 20 s (also while idle, so a dead peer behind a silent network is noticed within
keepalive_time + keepalive_timeout) and the server accepts pings every 10 s.
"""

from __future__ import annotations

from typing import Any

CLIENT_KEEPALIVE_TIME_MS = 20_000
CLIENT_KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000

ChannelOptions = tuple[tuple[str, Any], ...]


def client_options() -> ChannelOptions:
    """Options for every sub-channel the mesh opens."""
    return (
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", CLIENT_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    )


def server_options() -> ChannelOptions:
    """Options for every server the mesh starts: permit what client_options() sends."""
    return (
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
    )
