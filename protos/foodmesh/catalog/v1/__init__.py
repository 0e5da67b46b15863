"""foodmesh.catalog.v1: CatalogService, generated from catalog.proto (run scripts/gen_protos.py)."""
