"""A test-only crash switch for the events' two boundaries that matter: the process kills
itself with SIGKILL at the N-th event it reaches there, so that the crash tests can crash it
exactly between two effects that only make sense together.

    FOODMESH_EVENTS_CRASH_AT=after-publish:<N>   the relay has the N-th PubAck; its cursor
                                                 has not moved past that event
    FOODMESH_EVENTS_CRASH_AT=before-ack:<N>      a consumer committed the N-th effect (and
                                                 its inbox row); the message is not acked

SIGKILL, not an exception: a crash runs no `finally` and flushes nothing, and the outbox and
the inbox have to cope with exactly that (services/orders/crashpoints.py does the same for the
checkout saga). Unset (always, outside tests), nothing changes.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

CRASH_ENV = "FOODMESH_EVENTS_CRASH_AT"
WHERE = ("after-publish", "before-ack")


def crash_switch(where: str) -> Callable[[object], None] | None:
    """A hook that SIGKILLs the process the N-th time it is called, when the variable names
    `where`; None when it names another boundary or is unset. ValueError (naming the
    variable) for a value that names none."""
    value = os.environ.get(CRASH_ENV, "")
    if not value:
        return None
    point, _, count = value.partition(":")
    if point not in WHERE or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"{CRASH_ENV}={value!r}: expected <where>:<N> with where one of {', '.join(WHERE)} "
            "and N >= 1"
        )
    if point != where:
        return None
    left = int(count)

    def reached(event: object) -> None:
        nonlocal left
        left -= 1
        if left == 0:
            print(f"{CRASH_ENV}: {value} reached at {event}; SIGKILL", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return reached
