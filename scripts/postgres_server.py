"""A throwaway Postgres cluster on a free loopback port, with a database and a role per
service, for the tests (and, later, the cluster mode of the dev stack).

Why: "database per service" is only believable when the database says no: each service gets
a role of its own that owns a database of its own, and no other role may connect to it
(`REVOKE CONNECT ... FROM PUBLIC`), as a production cluster would be set up. The server is
Debian's `postgresql` package (15), which scripts/bootstrap.sh installs when it is missing.
`initdb` refuses to run as root, so as root the cluster is made and run as the `postgres`
user the package creates (`runuser`), in a directory that user owns; its socket lives there
too, so nothing touches the system's own cluster or port 5432.
"""

from __future__ import annotations

import asyncio
import glob
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from scripts.processes import Running, free_tcp_port, log_tail, spawn, stop_process, wait_until

HOST = "127.0.0.1"
SUPERUSER = "postgres"


def find_pg_bin() -> Path:
    """The directory of initdb and pg_ctl: Debian's /usr/lib/postgresql/<version>/bin."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("initdb not found: scripts/bootstrap.sh installs Debian's postgresql")
    return Path(initdb).parent


class PostgresServer(Running):
    """One Postgres cluster in a temporary directory, listening on 127.0.0.1:`port`."""

    def __init__(self, *, port: int | None = None, durable: bool = False) -> None:
        """`durable`: fsync on, as a production server runs (benchmarks); the tests' servers
        skip it (a crash of the machine loses a throwaway cluster)."""
        self._durable = durable
        self.port = port if port is not None else free_tcp_port(HOST)
        self._root = Path(tempfile.mkdtemp(prefix="foodmesh-pg-"))
        self.data_dir = self._root / "data"
        self.log_path = self._root / "postgres.log"
        self._bin = find_pg_bin()
        self._as_postgres = os.geteuid() == 0
        self.passwords: dict[str, str] = {}
        self._databases = 0
        self._admin: _Admin | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        args = [str(self._bin / command[0]), *command[1:]]
        if self._as_postgres:
            args = ["runuser", "-u", SUPERUSER, "--", *args]
        return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> None:
        """Make the cluster (trust for the superuser on its socket, passwords over TCP) and
        start it; return once it accepts connections."""
        if self._as_postgres:
            shutil.chown(self._root, SUPERUSER)
        made = self._run(
            "initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth-local=trust",
            "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8",
        )  # fmt: skip
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{made.stderr}")
        self._launch()

    def _launch(self) -> None:
        command = [
            str(self._bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
            "-k", str(self._root), "-c", f"listen_addresses={HOST}",
            "-c", f"fsync={'on' if self._durable else 'off'}",
        ]  # fmt: skip
        if self._as_postgres:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        # In the foreground, in a process group of its own that dies with us (spawn): a
        # crashed test run leaves no server behind, as pg_ctl's daemon would.
        self._proc = spawn(command, log_path=self.log_path)
        wait_until(
            self._ready,
            timeout=60,
            interval=0.1,
            message=f"postgres on {HOST}:{self.port} not ready",
        )

    @property
    def pid(self) -> int | None:
        """The server's process id (of `runuser` when run as the postgres user); None while
        it is not running."""
        return None if self._proc is None else self._proc.pid

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"postgres exited while starting:\n{log_tail(self.log_path)}")
        try:
            return self.sql("SELECT 1").strip() == "1"
        except RuntimeError:
            return False

    def sql(self, *statements: str, database: str = "postgres") -> str:
        """Run `statements` as the superuser (over the cluster's own socket), each on its
        own; their rows as psql -At prints them (columns joined by |, a line per row)."""
        if self._admin is None:
            self._admin = _Admin(self._root, self.port)
        return self._admin.run(database, statements)

    def service_database(self, service: str) -> str:
        """A role and a database named for `service` (order-history: order_history), the
        role owning it and no other role allowed to connect; its URL (DATABASE_URL)."""
        name = service.replace("-", "_")
        password = self.passwords.get(name) or secrets.token_urlsafe(16)
        if name not in self.passwords:
            self.sql(
                f"CREATE ROLE {name} LOGIN PASSWORD '{password}'",
                f"CREATE DATABASE {name} OWNER {name}",
                f"REVOKE ALL ON DATABASE {name} FROM PUBLIC",
            )
            self.passwords[name] = password
        return self.url(name, password, name)

    def fresh_database(self, service: str) -> str:
        """A new, empty database owned by `service`'s role (made by service_database), for
        one test; its URL."""
        self.service_database(service)
        name = service.replace("-", "_")
        self._databases += 1
        database = f"{name}_{self._databases}"
        self.sql(
            f"CREATE DATABASE {database} OWNER {name}",
            f"REVOKE ALL ON DATABASE {database} FROM PUBLIC",
        )
        return self.url(name, self.passwords[name], database)

    def empty_database(self, url: str) -> None:
        """Delete every row of the database of `url` but its migrations' record (numbered
        rows start at 1 again), ending its connections first: as fresh as a new database
        with the same schema."""
        database = url.rsplit("/", 1)[1]
        self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE datname = '{database}' AND pid <> pg_backend_pid()"
        )
        tables = self.sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            " AND tablename <> 'schema_migrations'",
            database=database,
        ).split()
        if tables:
            self.sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE", database=database)

    def drop_database(self, url: str) -> None:
        """Drop the database of `url` (made by fresh_database), ending its connections."""
        database = url.rsplit("/", 1)[1]
        self.sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")

    def url(self, role: str, password: str, database: str) -> str:
        return f"postgresql://{role}:{password}@{HOST}:{self.port}/{database}"

    def halt(self, sig: int = signal.SIGINT) -> None:
        """Stop the server and keep its cluster (SIGINT: a fast shutdown that ends every
        connection; SIGKILL of the postmaster: a crash, recovered from the WAL at the next
        start); `resume()` starts it again on the same port."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if sig == signal.SIGKILL:
            # runuser's child is the postmaster: kill the whole group, as a crash would.
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        else:
            stop_process(proc, sig=sig, timeout=30)

    def resume(self) -> None:
        """Start the halted server again on its port and cluster."""
        assert self._proc is None, "already running"
        self._launch()

    def stop(self) -> None:
        """Stop the server (SIGINT: Postgres's fast shutdown) and remove the cluster."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, sig=signal.SIGINT, timeout=30)
        shutil.rmtree(self._root, ignore_errors=True)


class _Admin:
    """The superuser's connection, kept for the server's life on a thread and an event loop
    of its own: the callers are synchronous (fixtures, often inside a test's running loop),
    and a psql process per statement costs a fork of the whole test process (about 0.25 s
    inside a test run, against about 10 ms for a statement on a kept connection)."""

    def __init__(self, socket_dir: Path, port: int) -> None:
        self._socket_dir = str(socket_dir)
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="postgres admin", daemon=True
        )
        self._thread.start()
        self._kept: asyncpg.Connection | None = None

    def run(self, database: str, statements: Sequence[str]) -> str:
        future = asyncio.run_coroutine_threadsafe(self._run(database, statements), self._loop)
        return future.result(timeout=120)

    async def _run(self, database: str, statements: Sequence[str]) -> str:
        try:
            if database != SUPERUSER:  # another database: a connection for this call
                connection = await self._connect(database)
                try:
                    return await self._statements(connection, statements)
                finally:
                    await connection.close()
            if self._kept is None or self._kept.is_closed():
                self._kept = await self._connect(SUPERUSER)
            try:
                return await self._statements(self._kept, statements)
            except (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError):
                self._kept = None  # the server went away meanwhile (halted, restarted)
                raise
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise RuntimeError(f"postgres: {type(exc).__name__}: {exc}") from exc

    async def _connect(self, database: str) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=self._socket_dir, port=self._port, user=SUPERUSER, database=database, timeout=10
        )

    @staticmethod
    async def _statements(connection: asyncpg.Connection, statements: Sequence[str]) -> str:
        lines = []
        for statement in statements:
            for row in await connection.fetch(statement):
                lines.append("|".join("" if v is None else str(v) for v in row.values()))
        return "".join(f"{line}\n" for line in lines)

    def close(self) -> None:
        async def closed() -> None:
            if self._kept is not None and not self._kept.is_closed():
                self._kept.terminate()

        asyncio.run_coroutine_threadsafe(closed(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
