"""foodmesh.delivery.v1: DeliveryService, generated from delivery.proto (scripts/gen_protos.py)."""
