"""The catalog API: menu items and their prices."""
