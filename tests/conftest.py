"""Suite-wide guard: no test may leave a process behind; and where a store's database lives,
for the suites that run against both engines (SQLite and Postgres)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scripts.postgres_server import PostgresServer

_SESSION_SERVERS: list[PostgresServer] = []
"""Servers of session fixtures, started by whichever test first needs them (and restarted by
some) and stopped at the end of the run."""

Locate = Callable[[str], "Path | str"]
"""Where a service's database lives in this test: `locate("payments")`."""


def _live_children(parent: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        state, ppid = fields[0], int(fields[1])
        if ppid == parent and state != "Z":
            found.append(f"{stat.parent.name}: {cmdline.strip()}")
    return found


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fail the test that leaves a child process of the test run alive. Processes that were
    running when it began belong to a fixture shared by several tests (a module's stack),
    which stops them when its last test is done, and is checked by the test after it."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    before = set(_live_children(os.getpid()))
    yield
    leftovers = [
        child
        for child in _live_children(os.getpid())
        if child not in before
        and int(child.split(":", 1)[0]) not in {s.pid for s in _SESSION_SERVERS}
    ]
    assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway Postgres cluster for the whole run (started when a test first needs it);
    each test gets databases of its own in it."""
    with PostgresServer() as server:
        _SESSION_SERVERS.append(server)
        yield server


_STORES = frozenset(
    {"users", "catalog", "orders", "payments", "delivery", "notifications", "order-history"}
)
_EMPTIED: dict[str, list[str]] = {}
"""Databases of the services' stores that a test used and gave back emptied, by service."""


def _database_for(server: PostgresServer, service: str) -> str:
    """A database for one test: for a service's store, one an earlier test emptied (its
    schema migrated, no row in it; making a database costs a copy of a template through the
    WAL, emptying one a TRUNCATE), else a new one."""
    emptied = _EMPTIED.get(service)
    return emptied.pop() if emptied else server.fresh_database(service)


def _give_back(server: PostgresServer, service: str, url: str) -> None:
    if service in _STORES:
        server.empty_database(url)
        _EMPTIED.setdefault(service, []).append(url)
    else:  # a test's own schema: nobody else may share its tables
        server.drop_database(url)


@pytest.fixture(params=["sqlite", "postgres"])
def database_engine(request: pytest.FixtureRequest) -> str:
    """The engine a store test runs on: every such test runs once on each."""
    return str(request.param)


@pytest.fixture
def locate(
    database_engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Locate]:
    """A service's database for this test, on the test's engine: a SQLite file in tmp_path,
    or a Postgres database of its own owned by the service's role (emptied or dropped after
    the test). Asking
    twice for one service gives the same database (a second instance of the service)."""
    made: dict[str, Path | str] = {}

    def location(service: str) -> Path | str:
        if service not in made:
            if database_engine == "sqlite":
                made[service] = tmp_path / f"{service}.db"
            else:
                server: PostgresServer = request.getfixturevalue("postgres_server")
                made[service] = _database_for(server, service)
        return made[service]

    yield location
    if database_engine == "postgres":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        for service, url in made.items():
            _give_back(server, service, str(url))
