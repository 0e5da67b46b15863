"""foodmesh.users.v1: UserService, generated from users.proto (run scripts/gen_protos.py)."""
