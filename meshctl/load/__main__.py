"""`python -m meshctl.load ARGS` is `meshctl load ARGS`, for when the console script is not on
PATH (the documented name is `meshctl load`)."""

from __future__ import annotations

import sys

from meshctl.cli import main

if __name__ == "__main__":
    sys.exit(main(["load", *sys.argv[1:]]))
