"""`python -m meshctl ARGS` is `meshctl ARGS`, for when the console script is not on PATH."""

from __future__ import annotations

import sys

from meshctl.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
