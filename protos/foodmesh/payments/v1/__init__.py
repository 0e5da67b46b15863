"""foodmesh.payments.v1: PaymentService, generated from payments.proto (scripts/gen_protos.py)."""
