"""The payments service: a simulated payment provider that authorizes, captures, voids and
refunds orders' payments."""
