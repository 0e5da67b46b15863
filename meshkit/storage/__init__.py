"""A service's own database, shared by its instances: the store helpers every service uses,
in one place. One interface (database.py) over two engines: a SQLite file per service in its
data directory (sqlite.py, the default) or a Postgres database per service (postgres.py); one
schema for both, with numbered migrations (schema.py); the idempotency-key convention
(idempotency.py) and leases on work only one instance may do (lease.py)."""
