"""The saga orchestrator (lands with the checkout saga): a saga as plain code, a sequence of
steps each with its compensation, retry policies as values, its progress in the orchestrating
service's own store (meshkit/storage) so that a crashed orchestrator resumes it, and step
idempotency keys derived from the saga id and the step name, so that a repeated step has one
effect. Temporal's Python SDK (workflows and activities as plain code) is the model."""
