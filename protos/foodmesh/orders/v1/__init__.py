"""foodmesh.orders.v1: OrderService, generated from orders.proto (run scripts/gen_protos.py)."""
