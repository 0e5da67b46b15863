"""Retries: the policy (whether and when), the budget (how many, service-wide), server
pushback, and hedging's policy. The attempt loops that ask them are the call path's
(mesh/client/unary_call.py, stream_call.py, hedging.py): mechanism apart from policy, as in
tower's retry module."""

from mesh.resilience.retry.budget import BudgetPolicy, RetryBudget
from mesh.resilience.retry.hedge import HedgePolicy
from mesh.resilience.retry.policy import (
    MAX_ATTEMPTS_CAP,
    RetryPolicy,
    RetryState,
    idempotent_from_descriptor,
    method_descriptor_for,
    method_is_idempotent,
)
from mesh.resilience.retry.pushback import NO_RETRY, PUSHBACK_KEY, NoRetry, Pushback, parse_pushback

__all__ = [
    "MAX_ATTEMPTS_CAP",
    "NO_RETRY",
    "PUSHBACK_KEY",
    "BudgetPolicy",
    "HedgePolicy",
    "NoRetry",
    "Pushback",
    "RetryBudget",
    "RetryPolicy",
    "RetryState",
    "idempotent_from_descriptor",
    "method_descriptor_for",
    "method_is_idempotent",
    "parse_pushback",
]
