"""The orders service: places customers' orders at the catalog's current prices."""
