"""The order-history service: the query side of CQRS, built from events."""
