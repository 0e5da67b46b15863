"""Where services keep their SQLite files.

The default is one directory per user, not per process or per run: two instances of a service
started by hand without flags then open the same database file and serve the same data, which
is what running several instances behind the mesh's balancer needs.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP_NAME = "foodmesh"


def default_data_dir() -> Path:
    """The per-user data directory (e.g. ~/.local/share/foodmesh on Linux); not created here."""
    return Path(platformdirs.user_data_dir(APP_NAME))


def database_path(data_dir: Path | str, service: str) -> Path:
    """`<data_dir>/<service>.db`, creating data_dir (and its parents) when missing."""
    if not service:
        raise ValueError("service name must not be empty")
    directory = Path(data_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{service}.db"
