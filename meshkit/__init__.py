"""Building blocks for services on the mesh: what a user's own services reuse, with no
food-delivery knowledge in them. Each package is one concern; they stand beside the mesh
(mesh/) and use it, and the demo services (services/) use them.

    storage/   a service's own database: one small store interface, SQLite in a data
               directory by default (Postgres joins it later, with the same schema)
    saga/      the saga orchestrator: steps with compensations, as plain code (next to land)

Where the next ones go (README, "Layout"): events/ (event store, outbox, relay and inbox
over NATS JetStream) and gateway/ (router, merged reflection, JWT verifier, GCRA limiter,
HTTP/JSON transcoder).
"""
