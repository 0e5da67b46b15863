"""The catalog service: restaurants' menu items and their current prices."""
