"""foodmesh.orderhistory.v1: OrderHistoryService, generated from orderhistory.proto
(scripts/gen_protos.py)."""
