"""The PostgreSQL database: two asyncpg pools, what "cannot serve now" means, migrations.

Reads and writes have a pool each, so long reads (replays, lists) never hold the
connections a commit needs; long reads may also hold at most half of the read pool, as on
SQLite, so small reads (logins, GETs, subscribes) always find one.

A pool reconnects by itself: a connection that broke (server restarted, connection lost
mid-query) is closed for good, and the pool replaces it at the next `acquire()`; one
returned in a transaction is rolled back, and one that cannot be reset is terminated
(asyncpg `PoolConnectionHolder.release`). So every query goes through `async with
pool.acquire()`, never through a connection kept aside, and no broken connection is ever
used twice.

Every failure that says the database cannot serve now, rather than that a request is
wrong, becomes `StoreUnavailable` (the web layer answers 503): `is_unavailable` lists them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import asyncpg

from .records import StoreUnavailable
from .sqlite_db import DatabaseError as _StoreError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to open a connection before giving up (asyncpg's default is 60).
CONNECT_TIMEOUT = 5.0
#: Seconds a statement may run before it is cancelled (StoreUnavailable).
COMMAND_TIMEOUT = 30.0
#: Seconds to wait for a free pooled connection before StoreUnavailable.
ACQUIRE_TIMEOUT = 10.0
#: Connections per pool at most.
READ_POOL, WRITE_POOL = 8, 4
#: Attempts of a transaction that PostgreSQL aborted as a deadlock or serialization
#: failure (nothing of it happened, so it is safe to run again).
ATTEMPTS = 5
#: Per-session settings, sent when connecting. A node that dies or hangs inside a
#: transaction frees its row locks within a minute, and a lock wait that long means the
#: database cannot serve now: 503, not a hung request.
SERVER_SETTINGS = {
    "application_name": "progress-server",
    "idle_in_transaction_session_timeout": "60000",
    "lock_timeout": "10000",
}
#: SQLSTATE classes and codes that belong to the database, not to a request: connection
#: (08), authorization (28, the password changed), no such database (3D), resources (53:
#: disk full, out of memory, too many connections), operator intervention (57: shutdown,
#: starting up, statement cancelled), system I/O (58), read-only (25006: a standby after a
#: failover), lock timeout (55P03), and deadlocks and serialization failures (40001,
#: 40P01) once retried.
UNAVAILABLE_CLASSES = frozenset({"08", "28", "3D", "53", "57", "58"})
UNAVAILABLE_CODES = frozenset({"25006", "55P03", "40001", "40P01"})
RETRIED_CODES = frozenset({"40001", "40P01"})
#: Advisory lock key (pg_advisory_lock's one-bigint form) held while migrating.
MIGRATION_LOCK = 0x70726F6772657373  # "progress"

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(_StoreError):
    """The database cannot be used by this version (e.g. its schema is newer).

    A kind of the SQLite backend's DatabaseError, which the entry points (`__main__`,
    `admin`) already report as a startup error."""


def is_unavailable(exc: BaseException) -> bool:
    """True for errors that say the database cannot serve now, whatever the request."""
    if is_broken(exc):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        code = str(getattr(exc, "sqlstate", "") or "")
        return code[:2] in UNAVAILABLE_CLASSES or code in UNAVAILABLE_CODES
    return False


def is_broken(exc: BaseException) -> bool:
    """True when the connection itself may be unusable after `exc` (lost, timed out, or
    asyncpg's protocol confused, as when the server kills an idle connection), as opposed
    to an error the server answered on a healthy connection."""
    if isinstance(exc, OSError | TimeoutError):  # refused, reset, unreachable, timed out
        return True
    if isinstance(exc, asyncpg.PostgresConnectionError | asyncpg.InternalClientError):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # "connection is closed", "…the underlying connection is closed", "pool is closing".
        text = str(exc)
        return "closed" in text or "closing" in text
    return False


def _retried(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") in (
        RETRIED_CODES
    )


def where(url: str) -> str:
    """host:port/db of a URL, for messages (never the password)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    return f"{host}:{parts.port or 5432}{parts.path or '/'}"


def unavailable(exc: BaseException, url: str | None = None) -> StoreUnavailable:
    """The StoreUnavailable for `exc`, with what happened and (if given) where."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError) and not str(exc):
        text = "timed out"
    prefix = f"PostgreSQL at {where(url)}: " if url else "PostgreSQL: "
    return StoreUnavailable(f"{prefix}{text}")


def lock_key(name: str) -> int:
    """A stable signed 64-bit advisory lock key for a name."""
    digest = hashlib.sha256(f"progress:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def connect(
    url: str, *, command_timeout: float | None = COMMAND_TIMEOUT, lock_timeout: bool = True
) -> asyncpg.Connection:
    """One connection of its own (migrations, advisory locks held for a while).

    `command_timeout=None` and `lock_timeout=False` let statements wait as long as they
    need (migrating: another node may be migrating first).
    """
    settings = dict(SERVER_SETTINGS)
    if not lock_timeout:
        settings["lock_timeout"] = "0"
    try:
        return await asyncpg.connect(
            url,
            timeout=CONNECT_TIMEOUT,
            command_timeout=command_timeout,
            server_settings=settings,
        )
    except Exception as exc:
        if is_unavailable(exc):
            raise unavailable(exc, url) from exc
        raise


class _OutageInOneLine(logging.Filter):
    """asyncpg logs each failed refill of a pool's floor (retried every 1 s, doubling to
    60 s, while the server is down) as a WARNING with its whole traceback. An outage is
    expected and the rest of the server reports it in one line: keep asyncpg's message and
    put the error in place of the traceback. Unexpected errors keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_unavailable(exc):
            record.msg = f"{record.getMessage()} error={type(exc).__name__}: {exc}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


_POOL_LOG = logging.getLogger("asyncpg.pool")
if not any(isinstance(f, _OutageInOneLine) for f in _POOL_LOG.filters):
    _POOL_LOG.addFilter(_OutageInOneLine())


class PostgresDatabase:
    """The read and write pools of one database, and the one transaction helper."""

    def __init__(self, url: str, reads: asyncpg.Pool, writes: asyncpg.Pool) -> None:
        self.url = url
        self._reads = reads
        self._writes = writes
        #: Long reads at once: half the read pool, so small reads always have the rest.
        self._bulk = asyncio.Semaphore(max(1, READ_POOL // 2))

    async def close(self) -> None:
        await asyncio.gather(self._reads.close(), self._writes.close())

    # -- reads ----------------------------------------------------------------------------

    async def fetch(self, sql: str, *args: Any, bulk: bool = False) -> list[asyncpg.Record]:
        """Rows of one read statement (on the read pool)."""
        if bulk:
            async with self._bulk:
                return await self._read(lambda c: c.fetch(sql, *args))
        return await self._read(lambda c: c.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._read(lambda c: c.fetchrow(sql, *args))

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda c: c.fetchval(sql, *args))

    async def _read(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        for attempt in (1, 2):
            try:
                async with self._reads.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                    return await _guarded(conn, fn(conn))
            except Exception as exc:
                # A pooled connection that died while idle (the server restarted) fails
                # its first use; a read is safe to run again, on a new connection.
                if attempt == 1 and _stale(exc):
                    continue
                if is_unavailable(exc):
                    raise unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")

    # -- writes ---------------------------------------------------------------------------

    async def write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn(conn)` in one transaction on the write pool, and commit.

        A deadlock or serialization failure rolled everything back: `fn` runs again (up to
        ATTEMPTS times, so it must not have effects outside the database). Raises
        StoreUnavailable when the database cannot commit now; other errors as they are.
        """
        for attempt in range(1, ATTEMPTS + 1):
            try:
                async with self._writes.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                    return await _guarded(conn, _in_transaction(conn, fn))
            except _NotBegun as not_begun:
                # BEGIN failed on a connection that died while idle: nothing was sent,
                # so running the transaction again on a new connection is safe (once).
                exc = not_begun.error
                if attempt == 1 and _stale(exc):
                    continue
                raise unavailable(exc) from exc
            except Exception as exc:
                if _retried(exc) and attempt < ATTEMPTS:
                    log.info("pg.retry attempt=%d error=%s", attempt, exc)
                    # Jittered, so the two transactions that collided do not collide again.
                    await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
                    continue
                if is_unavailable(exc):
                    raise unavailable(exc) from exc
                raise
        raise AssertionError("unreachable")

    async def execute(self, sql: str, *args: Any) -> int:
        """One write statement in its own transaction; returns the rows it changed."""
        return await self.write(lambda conn: _changed(conn.execute(sql, *args)))

    async def connect(self) -> asyncpg.Connection:
        """A connection outside the pools (closed by the caller)."""
        return await connect(self.url)


class _NotBegun(Exception):
    """BEGIN itself failed because the connection is broken: nothing was written."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _is_closed(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection is closed, without raising.

    When the server side of a checked-out connection goes away, asyncpg gives the holder
    back to its pool at once (`PoolConnectionHolder._release_on_close`) and detaches the
    proxy we still hold: any call on it then raises InterfaceError ("connection has been
    released back to the pool"), which would hide the error that told us why.
    """
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True


def _terminate(conn: asyncpg.Connection) -> None:
    """Close a broken connection for good (nothing to do if asyncpg already let it go)."""
    if not _is_closed(conn):
        try:
            conn.terminate()
        except asyncpg.InterfaceError:
            pass


def _stale(exc: BaseException) -> bool:
    """A broken connection that is worth one more try on a new one (not a timeout, which
    would only double the wait)."""
    return is_broken(exc) and not isinstance(exc, TimeoutError)


async def _in_transaction(
    conn: asyncpg.Connection, fn: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    transaction = conn.transaction()
    try:
        await transaction.start()
    except Exception as exc:
        if is_broken(exc):
            _terminate(conn)
            raise _NotBegun(exc) from exc
        raise
    try:
        result = await fn(conn)
    except BaseException:
        if not _is_closed(conn):
            try:
                await transaction.rollback()
            except Exception:  # the original error matters; this connection is done
                _terminate(conn)
        raise
    await transaction.commit()
    return result


async def _guarded(conn: asyncpg.Connection, work: Awaitable[T]) -> T:
    """Await `work` on a pooled connection; if the connection broke, terminate it so the
    pool opens a new one instead of handing this one out again."""
    try:
        return await work
    except Exception as exc:
        if is_broken(exc):
            _terminate(conn)
        raise


def changed_rows(tag: str) -> int:
    """Rows changed, from a command tag such as "UPDATE 3" or "INSERT 0 1"."""
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


async def _changed(status: Awaitable[str]) -> int:
    return changed_rows(await status)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pools' reset: nothing beyond asyncpg's own (which rolls back an open
    transaction). The default also runs RESET ALL, UNLISTEN *, CLOSE ALL and releases
    advisory locks, a round trip per release (0.2 ms of a 2 ms batch here), for session
    state no pooled connection of ours ever has: LISTEN and session-level advisory locks
    live on dedicated connections (`connect`), and settings are fixed at connect time."""


async def open_database(url: str, migrations_dir: Path) -> PostgresDatabase:
    """Migrate the database at `url` if needed, then open the pools.

    Raises:
        StoreUnavailable: the server cannot be reached or refuses us (the message says
            where and why, never the password).
        DatabaseError: the database has migrations this version does not know.
    """
    await migrate(url, migrations_dir)
    pools: list[asyncpg.Pool] = []
    try:
        for size in (READ_POOL, WRITE_POOL):
            pools.append(
                await asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=size,
                    timeout=CONNECT_TIMEOUT,
                    command_timeout=COMMAND_TIMEOUT,
                    server_settings=SERVER_SETTINGS,
                    reset=_keep_session,
                )
            )
    except Exception as exc:
        for pool in pools:
            await pool.close()
        if is_unavailable(exc):
            raise unavailable(exc, url) from exc
        raise
    return PostgresDatabase(url, pools[0], pools[1])


# -- migrations ---------------------------------------------------------------------------


def migration_files(migrations_dir: Path) -> list[tuple[int, str, Path]]:
    found = []
    for file in sorted(migrations_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(file.name)
        if not match:
            raise DatabaseError(f"migration {file.name} is not named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), file))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError("two migrations share a number")
    if not found:
        raise DatabaseError(f"no migrations in {migrations_dir}")
    return found


async def migrate(url: str, migrations_dir: Path) -> list[int]:
    """Connect and apply pending migrations (see `apply_migrations`); returns those applied."""
    # No time limits: a node starting while another migrates waits for its turn.
    conn = await connect(url, command_timeout=None, lock_timeout=False)
    try:
        return await apply_migrations(conn, migrations_dir)
    except DatabaseError as exc:
        raise DatabaseError(f"PostgreSQL at {where(url)}: {exc}") from exc
    except Exception as exc:
        if is_unavailable(exc):
            raise unavailable(exc, url) from exc
        raise
    finally:
        await conn.close(timeout=CONNECT_TIMEOUT)


async def apply_migrations(conn: asyncpg.Connection, migrations_dir: Path) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction.

    Holds an advisory lock meanwhile, so nodes starting together migrate one at a time
    (the second finds nothing left to do). Refuses a database with migrations this version
    does not know (a newer server migrated it).
    """
    files = migration_files(migrations_dir)
    known = {version for version, _, _ in files}
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY,"
            " name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        if done - known:
            raise DatabaseError(
                f"database has migrations {sorted(done - known)} that this version does not know"
            )
        applied = []
        for version, name, file in files:
            if version in done:
                continue
            sql = file.read_text(encoding="utf-8")
            async with conn.transaction():
                await conn.execute(sql)  # no arguments: the simple protocol, many statements
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("migration.applied version=%04d name=%s", version, name)
            applied.append(version)
        return applied
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
