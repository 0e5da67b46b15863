"""The notifications API: what the platform tells customers about their orders."""
