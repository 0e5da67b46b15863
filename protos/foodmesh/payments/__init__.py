"""The payments API: a simulated payment provider for orders."""
