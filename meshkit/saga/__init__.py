"""The saga orchestrator: a saga as plain code, a sequence of steps each with its
compensation (steps.py), retry policies as values with Temporal's activity defaults
(retry.py), its progress in the orchestrating service's own store so that a crashed
orchestrator is resumed by another instance (orchestrator.py, and meshkit.storage.lease), and step
idempotency keys derived from the saga id and the step name, so that a repeated step has one
effect. Temporal's Python SDK (workflows and activities as plain code) is the model; what
differs is that the history is the service's own domain events, not a separate server's."""

from meshkit.saga.orchestrator import SagaDefinition, SagaJournal, SagaRunner
from meshkit.saga.retry import NON_RETRYABLE, StepRetry
from meshkit.saga.steps import Progress, Step, StepContext
from meshkit.storage.lease import Fence, LeaseLost, Leases

__all__ = [
    "NON_RETRYABLE",
    "Fence",
    "LeaseLost",
    "Leases",
    "Progress",
    "SagaDefinition",
    "SagaJournal",
    "SagaRunner",
    "Step",
    "StepContext",
    "StepRetry",
]
