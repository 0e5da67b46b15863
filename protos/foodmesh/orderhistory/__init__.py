"""The order-history API: a customer's orders as the events tell them (the query side of CQRS)."""
