"""A real PostgreSQL server for the tests: started once per session, a database per test.

Import the fixtures into a test module (or a conftest) to use them::

    from .pg import pg_server, pg_template, pg_url  # noqa: F401

- `pg_server` (session): a `PostgresServer` on 127.0.0.1 and a free port, with its data in
  a temporary folder; `url(db)` makes a URL for the `progress` role, and `stop()`,
  `start()`, `crash()` (`pg_ctl -m immediate stop`) serve outage tests. A test that leaves
  it stopped does not break the next one: `pg_url` starts it again.
- `pg_template` (session): the name of a database with our migrations applied once.
- `pg_url` (function): the URL of a fresh database copied from the template
  (`CREATE DATABASE … TEMPLATE`, about 0.1 s), dropped after the test.

Without PostgreSQL's binaries (Debian's `postgresql` package) the tests that use them are
skipped, unless `CI=true`: then they fail. PostgreSQL refuses to run as root, so as root
`initdb`/`pg_ctl` run as the `postgres` user through `runuser`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import PROJECT_ROOT

#: The application's role and password (host connections use scram-sha-256).
ROLE, PASSWORD = "progress", "progress-test-pw"
#: The database every test database is copied from.
TEMPLATE = "progress_template"
MIGRATIONS = PROJECT_ROOT / "migrations" / "postgres"


def find_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin that has initdb, or $PG_BIN; None if absent."""
    explicit = os.environ.get("PG_BIN")
    candidates = [Path(explicit)] if explicit else []
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = [p for p in root.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def require_bin() -> Path:
    """The binaries, or skip the test (fail it when CI=true)."""
    found = find_bin()
    if found is None:
        message = "PostgreSQL binaries not found (apt-get install postgresql)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_async(coro: object) -> object:
    """Run a coroutine to its end on a loop of its own, in a thread: safe from sync fixtures
    whatever loop pytest-asyncio has set up for the test."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()  # type: ignore[arg-type]


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, owned by whoever may run it."""

    def __init__(self, bin_dir: Path, root: Path, port: int) -> None:
        self.bin = bin_dir
        #: Holds `data/` (the cluster), the unix socket and `pg.log`.
        self.root = root
        self.data = root / "data"
        self.log = root / "pg.log"
        self.port = port
        self.host = "127.0.0.1"
        #: As root, PostgreSQL's tools run as this user.
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    # -- lifecycle ---------------------------------------------------------------------

    def _tool(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._as, str(self.bin / name), *args],
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def init(self) -> None:
        """initdb: local (socket) connections trusted, TCP ones need a password."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        self._tool(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-instructions",
        )
        # Durable as in production (fsync, synchronous_commit and full_page_writes stay
        # on); only what a test server does not need is off.
        settings = {
            "listen_addresses": f"'{self.host}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "wal_level": "minimal",
            "max_wal_senders": "0",
            "shared_buffers": "32MB",
            "max_connections": "100",
            "fsync": "on",
            # Deadlock tests wait this long for PostgreSQL to notice (default 1 s).
            "deadlock_timeout": "100ms",
            "logging_collector": "off",
        }
        with (self.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("".join(f"{key} = {value}\n" for key, value in settings.items()))

    @property
    def running(self) -> bool:
        return self._tool("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        result = self._tool(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "start", check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop (`fast`: roll back open transactions, close connections)."""
        self._tool("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def crash(self) -> None:
        """Stop without a shutdown checkpoint, as a crash would (recovery at next start)."""
        self.stop("immediate")

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- databases ---------------------------------------------------------------------

    def url(self, database: str, *, user: str = ROLE, password: str = PASSWORD) -> str:
        """A postgresql:// URL over TCP for `database`."""
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{database}"

    def psql(self, *statements: str, database: str = "postgres") -> str:
        """Run SQL as the superuser over the unix socket; returns psql's output."""
        args = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p", str(self.port)]
        args += ["-U", "postgres", "-d", database, "-At"]
        for sql in statements:
            args += ["-c", sql]
        result = subprocess.run(
            [str(self.bin / "psql"), *args], capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str, *, template: str | None = None) -> None:
        clause = f" TEMPLATE {template}" if template else ""
        self.psql(f"CREATE DATABASE {name} OWNER {ROLE}{clause}")

    def drop_database(self, name: str) -> None:
        self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_server() -> PostgresServer:
    """A new, started server with the application role (the caller stops it)."""
    bin_dir = require_bin()
    # Not under pytest's tmp_path: its base folder is private to root, and PostgreSQL runs
    # as another user.
    root = Path(tempfile.mkdtemp(prefix="progress-pg-"))
    server = PostgresServer(bin_dir, root, free_port())
    try:
        server.init()
        server.start()
        server.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
    except BaseException:
        remove_server(server)
        raise
    return server


def remove_server(server: PostgresServer) -> None:
    if server.data.exists() and server.running:
        server.stop("immediate")
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server."""
    server = start_server()
    try:
        yield server
    finally:
        remove_server(server)


@pytest.fixture(scope="session")
def pg_template(pg_server: PostgresServer) -> str:
    """A database with the migrations applied, to copy per test."""
    from server.store.postgres_db import migrate

    pg_server.create_database(TEMPLATE)
    run_async(migrate(pg_server.url(TEMPLATE), MIGRATIONS))
    return TEMPLATE


@pytest.fixture
def pg_url(pg_server: PostgresServer, pg_template: str) -> Iterator[str]:
    """The URL of a fresh, migrated database of its own for one test."""
    pg_server.ensure_running()  # an outage test may have left it stopped
    name = f"t_{uuid.uuid4().hex[:16]}"
    pg_server.create_database(name, template=pg_template)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.ensure_running()
        pg_server.drop_database(name)
