"""foodmesh.notifications.v1: NotificationService, generated from notifications.proto
(scripts/gen_protos.py)."""
