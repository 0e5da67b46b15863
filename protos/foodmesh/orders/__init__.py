"""The orders API: placing orders and reading them back."""
