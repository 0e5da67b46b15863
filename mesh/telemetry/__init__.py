"""Observability: traces the mesh exports over OTLP, and local tools to receive and read them."""
