"""The delivery API: courier dispatch for orders."""
