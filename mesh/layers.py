"""The layers of the call path and their order: the one place they are written down.

Every other description of the order (module docstrings, the README, the design guide)
points here, and the code that builds the path reads it:

- the client side: a call on a MeshChannel passes CLIENT_LAYERS outermost first. The per-
  method plan (mesh/client/upstream.py) builds the call's admission from the layers that may
  refuse a call before any attempt, in this order (mesh/client/admission.py): a call with no
  time left is refused before a fault is drawn, an open breaker before a full bulkhead; the
  retry layer counts the admitted call for its budget. The rest of the order is the loop's
  (mesh/client/unary_call.py, stream_call.py, hedging.py): attempts, each on an endpoint the
  balancer picks among those ejection left, on that endpoint's sub-channel.
- the server side: MeshServer (mesh/server/mesh_server.py) installs its interceptors in the
  order of SERVER_LAYERS, outermost first: metrics first, so that it also counts the calls a
  later layer refuses; tracing before deadline and faults, so that a refused call is a span.

`meshctl layers` prints both lists; the README's picture is that output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Layer:
    """One layer: its name, the module (or package) that implements it, what it does."""

    name: str
    where: str
    does: str
    admission: bool = False
    """A client layer that acts before any attempt is made (mesh/client/admission.py)."""


TRACING: Final = "tracing"
DEADLINE: Final = "deadline"
FAULTS: Final = "faults"
BREAKER: Final = "breaker"
BULKHEAD: Final = "bulkhead"
RETRY: Final = "retry | hedge"
BALANCER: Final = "balancer"
EJECTION: Final = "ejection"
SUBCHANNEL: Final = "sub-channel"
METRICS: Final = "metrics"

CLIENT_LAYERS: Final[tuple[Layer, ...]] = (
    Layer(TRACING, "mesh/telemetry/call_spans.py", "a span per call, a CLIENT span per attempt"),
    Layer(
        DEADLINE,
        "mesh/core/deadline.py",
        "caller's, inbound call's remaining, or default",
        admission=True,
    ),
    Layer(
        FAULTS,
        "mesh/resilience/faults.py",
        "client-side delays and aborts; off by default",
        admission=True,
    ),
    Layer(
        BREAKER,
        "mesh/resilience/breaker.py",
        "per service, rolling window; open: refuse",
        admission=True,
    ),
    Layer(
        BULKHEAD,
        "mesh/resilience/bulkhead.py",
        "per service, calls in flight; full: refuse",
        admission=True,
    ),
    Layer(
        RETRY,
        "mesh/resilience/retry/",
        "attempts within the budget, each in the time left",
        admission=True,
    ),
    Layer(BALANCER, "mesh/resilience/balance/", "P2C over peak-EWMA among endpoints not ejected"),
    Layer(
        EJECTION,
        "mesh/resilience/ejection.py",
        "per endpoint: out after failures, a probe back",
    ),
    Layer(SUBCHANNEL, "mesh/client/subchannels.py", "one long-lived grpc.aio channel per endpoint"),
)
"""The client call path, outermost first (below the generated stub and the MeshChannel)."""

ADMISSION: Final[tuple[str, ...]] = tuple(layer.name for layer in CLIENT_LAYERS if layer.admission)
"""The client layers that act before any attempt is made, in order: each may refuse the call
(the retry layer only counts it for the budget)."""

SERVER_LAYERS: Final[tuple[Layer, ...]] = (
    Layer(METRICS, "mesh/server/metrics.py", "counts and times every call, refused ones too"),
    Layer(TRACING, "mesh/telemetry/tracing.py", "the server span, continuing the caller's trace"),
    Layer(DEADLINE, "mesh/server/deadline.py", "refuses late calls; the deadline in context"),
    Layer(FAULTS, "mesh/server/faults.py", "server-side delays and aborts (--fault-*)"),
)
"""The server's interceptors, outermost first (above the servicer)."""


def render() -> str:
    """Both lists as text: the picture the README shows."""
    lines = ["client: stub -> MeshChannel (mesh/client/channel.py)"]
    lines += [f"  -> {layer.name:<13} {layer.where:<30} {layer.does}" for layer in CLIENT_LAYERS]
    lines += ["", "server: interceptors, outermost first, then the servicer"]
    lines += [f"  -> {layer.name:<13} {layer.where:<30} {layer.does}" for layer in SERVER_LAYERS]
    return "\n".join(lines)
