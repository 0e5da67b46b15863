"""A service's own database, shared by its instances: the store helpers every service uses,
in one place. Today SQLite (sqlite.py: one file per service in its data directory, WAL, a
write lock held from a transaction's first read); the idempotency-key convention and Postgres
behind the same interface are what this package grows into."""
