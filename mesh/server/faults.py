"""The server side of fault injection: one instance slow or failing for every call it serves.

The tests' way to give one endpoint of several a fault (`--fault-*` flags of every service).
Health and reflection are exempt by default: an instance that fails its own health check
leaves discovery, and the point is to see clients cope with an instance that stays in it.
The policy and the draws are mesh/resilience/faults.py's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

from grpc import aio

from mesh.core.plumbing import PLUMBING_METHOD_PREFIXES
from mesh.resilience.faults import FaultInjector, FaultPolicy, fault_message
from mesh.server.hooks import BehaviorInterceptor, Hook


class FaultInterceptor(BehaviorInterceptor):
    """Applies a FaultPolicy to every call a server serves: the delay, then the abort."""

    def __init__(
        self,
        policy: FaultPolicy,
        rng: Callable[[], float] = random.random,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        exempt: tuple[str, ...] = PLUMBING_METHOD_PREFIXES,
    ) -> None:
        super().__init__()
        self._injector = FaultInjector(policy, rng)
        self._sleep = sleep
        self._exempt = exempt

    def hook_for(self, method: str) -> Hook | None:
        if not self._injector.policy.active or method.startswith(self._exempt):
            return None
        decide, sleep = self._injector.decide, self._sleep

        async def inject(context: aio.ServicerContext[Any, Any]) -> None:
            fault = decide()
            if fault.delay:
                await sleep(fault.delay)
            if fault.abort is not None:
                await context.abort(fault.abort, fault_message(fault.abort, method))

        return inject
