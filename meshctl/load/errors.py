"""The one error the load tester raises for bad input found before any load is sent.

`meshctl load` prints its message and exits with status 2, as argparse does for bad flags.
"""

from __future__ import annotations


class BadInput(Exception):
    """Input that cannot work (unknown service or method, a request that does not fit the
    message, a bad flag value); the message says which and why, naming the field."""
