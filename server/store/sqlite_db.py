"""The SQLite database: one writer thread, a small pool of readers, PRAGMAs and migrations.

Writes: one dedicated thread owns the only write connection (stdlib sqlite3, as datasette's
write thread does). A caller hands it a whole transaction as a function; the thread runs
`BEGIN IMMEDIATE`, the function, `COMMIT` (or `ROLLBACK`), and hands the result back: one
thread hand-off per transaction however many statements it has, and transactions never
interleave because one thread runs them one after another.

Reads: a few aiosqlite connections. In WAL mode each sees every committed transaction and
none blocks the writer, provided every read is executed and fetched in one call
(`execute_fetchall`): a statement left active keeps its snapshot for every later read on
that connection. Long reads (replays, large lists) may hold at most half of the readers
at once, so they cannot starve everybody's small reads (logins, GETs, subscribes).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

log = logging.getLogger(__name__)

T = TypeVar("T")
Transaction = Callable[[sqlite3.Connection], T]

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SQLITE_HEADER = b"SQLite format 3\x00"
#: How long a connection waits for another one's lock before "database is locked", in ms.
BUSY_TIMEOUT_MS = 10_000
#: Seconds between two background (PASSIVE) WAL checkpoints.
CHECKPOINT_INTERVAL = 1.0
#: Mode of the database file and its -wal/-shm companions: the owner only.
FILE_MODE = 0o600


class DatabaseError(RuntimeError):
    """The database file cannot be used; the message says why, for the operator."""


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away (cancelled); the transaction ran regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WriterThread:
    """The one thread that writes; runs transactions handed to it, in order."""

    def __init__(self, path: Path, synchronous: str) -> None:
        self._path = path
        self._synchronous = synchronous
        #: (function, in a transaction?, after commit, future, loop); None stops the thread.
        self._jobs: queue.SimpleQueue[
            tuple[Callable[..., Any], bool, Callable[[Any], None] | None, Any, Any] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._started = False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    async def run(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        transaction: bool = True,
        after_commit: Callable[[T], None] | None = None,
    ) -> T:
        """Run `fn(conn)` on the writer thread, inside BEGIN IMMEDIATE ... COMMIT by default.

        An exception from `fn` (or from COMMIT) rolls the transaction back and is raised
        here. `after_commit(result)` runs on the writer thread once COMMIT succeeded, before
        the next transaction starts: the place to update state that must follow exactly
        what is committed. If the caller is cancelled the transaction still runs to its end
        (it cannot be stopped half-way); only its result is dropped.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((fn, transaction, after_commit, future, loop))
        return await future

    async def stop(self) -> None:
        """Finish what is queued, close the connection, end the thread."""
        if not self._started:
            return
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)
        self._started = False

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            isolation_level=None,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # No checkpoint inside a commit: by default the commit that passes 1000 WAL pages
        # copies them all into the database and fsyncs it, and every producer waits behind
        # it. `Database.run_checkpoints` does that on a connection of its own instead.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, transaction, after_commit, future, loop = job
            result: Any = None
            error: BaseException | None = None
            try:
                if self._conn is None:
                    self._conn = self._open()
                conn = self._conn
                if transaction:
                    conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(conn)
                    if transaction:
                        conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        try:
                            conn.execute("ROLLBACK")
                        except sqlite3.Error:
                            pass
                    raise
            except BaseException as exc:  # handed to the caller, never lost in the thread
                error = exc
            else:
                if after_commit is not None:
                    try:
                        after_commit(result)
                    except Exception:  # committed is committed: report it, answer anyway
                        log.exception("db.after_commit_failed")
            try:
                loop.call_soon_threadsafe(_resolve, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ReaderPool:
    """A few read connections; long reads may hold at most `bulk_max` of them at once."""

    def __init__(self, conns: Sequence[aiosqlite.Connection]) -> None:
        self._conns = list(conns)
        self._idle: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in self._conns:
            self._idle.put_nowait(conn)
        #: Long reads at once: half the pool, so small reads always have the other half.
        self.bulk_max = max(1, len(self._conns) // 2)
        self._bulk = asyncio.Semaphore(self.bulk_max)

    @property
    def size(self) -> int:
        return len(self._conns)

    async def fetch(
        self, sql: str, args: Sequence[Any] | dict[str, Any] = (), *, bulk: bool = False
    ) -> list[sqlite3.Row]:
        """Execute and fetch all rows in one call on one reader (see the module docstring)."""
        if bulk:
            async with self._bulk:
                return await self._fetch(sql, args)
        return await self._fetch(sql, args)

    async def _fetch(self, sql: str, args: Sequence[Any] | dict[str, Any]) -> list[sqlite3.Row]:
        conn = await self._idle.get()
        try:
            return list(await conn.execute_fetchall(sql, args))
        finally:
            self._idle.put_nowait(conn)

    async def close(self) -> None:
        for conn in self._conns:
            await conn.close()


class Database:
    """The writer thread, the reader pool and the checkpointer of one SQLite file."""

    def __init__(
        self,
        path: Path,
        writer: WriterThread,
        readers: ReaderPool,
        checkpointer: aiosqlite.Connection,
    ) -> None:
        self.path = path
        self.writer = writer
        self.readers = readers
        #: Copies the WAL into the database in the background (PASSIVE: never blocks the
        #: writer or the readers), so commits never do it themselves.
        self._checkpointer = checkpointer
        #: WAL frames copied by background checkpoints (tests, metrics).
        self.frames_checkpointed = 0

    async def close(self) -> None:
        await self._checkpointer.close()
        await self.readers.close()
        await self.writer.stop()

    async def run_checkpoints(self, interval: float = CHECKPOINT_INTERVAL) -> None:
        """Checkpoint the WAL every `interval` seconds, PASSIVE, until cancelled.

        A PASSIVE checkpoint copies what no reader still needs and returns; the writer keeps
        appending meanwhile. The WAL is then reused from its start (and truncated by the
        retention job's TRUNCATE checkpoints), so it stays small however busy the writer.
        """
        while True:
            await asyncio.sleep(interval)
            try:
                rows = await self._checkpointer.execute_fetchall("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("db.checkpoint_failed error=%s", exc)
                continue
            if rows and rows[0][2] > 0:
                self.frames_checkpointed += int(rows[0][2])

    async def write(self, fn: Transaction[T]) -> T:
        """Run `fn(conn)` as one write transaction on the writer thread."""
        return await self.writer.run(fn)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """One write statement in its own transaction; returns the rows it changed."""
        return await self.writer.run(lambda conn: conn.execute(sql, args).rowcount)

    async def fetch(
        self, sql: str, args: Sequence[Any] | dict[str, Any] = (), *, bulk: bool = False
    ) -> list[sqlite3.Row]:
        """A read on the reader pool, fetched in one call."""
        return await self.readers.fetch(sql, args, bulk=bulk)

    async def auto_vacuum_mode(self) -> int:
        """SQLite's auto_vacuum setting: 0 none, 1 full, 2 incremental."""
        rows = await self.fetch("PRAGMA auto_vacuum")
        return int(rows[0][0]) if rows else 0

    async def free_pages(self) -> int:
        """Pages on SQLite's freelist: space deletes left inside the file."""
        rows = await self.fetch("PRAGMA freelist_count")
        return int(rows[0][0]) if rows else 0

    async def incremental_vacuum(self, pages: int) -> None:
        """Give back up to `pages` free pages to the file system (auto_vacuum=INCREMENTAL only).

        One short write on the writer thread; the file shrinks at the next checkpoint. A
        no-op on a database created without incremental auto-vacuum.
        """

        def vacuum(conn: sqlite3.Connection) -> None:
            # executescript steps the pragma to the end: execute() frees one page only.
            conn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")

        await self.writer.run(vacuum, transaction=False)

    async def checkpoint(self, busy_timeout_ms: int = 100) -> tuple[int, int, int]:
        """Copy the WAL into the database and truncate it to zero bytes.

        Returns SQLite's (busy, wal_pages, checkpointed_pages); busy=1 when a reader kept it
        from finishing, which is harmless: the next checkpoint catches up. The wait for
        readers is bounded by `busy_timeout_ms` because producers wait behind the writer.
        """

        def checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            try:
                row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))

        return await self.writer.run(checkpoint, transaction=False)


def _check_file(path: Path) -> None:
    """Refuse a file that exists but is not an SQLite database, before SQLite touches it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise DatabaseError(f"{path} exists but is not an SQLite database; refusing to touch it")


def _create_private(path: Path) -> None:
    """Create the database file readable by its owner only (SQLite would use the umask)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        os.close(fd)


def _prepare(conn: sqlite3.Connection, path: Path, is_new: bool, migrations_dir: Path) -> None:
    """On the writer thread: integrity, WAL, auto-vacuum, migrations."""
    if is_new:
        # Only possible before the first table exists; lets retention give space back to
        # the file system with PRAGMA incremental_vacuum instead of a full VACUUM.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    row = conn.execute("PRAGMA quick_check").fetchone()
    if row is None or row[0] != "ok":
        raise DatabaseError(f"{path} failed SQLite's integrity check: {row[0] if row else '?'}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise DatabaseError(f"{path}: could not switch to WAL mode (got {mode})")
    try:
        apply_migrations(conn, migrations_dir)
    except DatabaseError as exc:
        raise DatabaseError(f"{path}: {exc}") from exc
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:  # 2 = INCREMENTAL
        log.warning(
            "db.auto_vacuum_off path=%s hint=freed_space_is_reused_but_the_file_never_shrinks",
            path,
        )
    for companion in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            os.chmod(companion, FILE_MODE)
        except OSError:
            pass


async def _connect_reader(
    path: Path, *, read_only: bool = True, synchronous: str = "FULL"
) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        await conn.execute(f"PRAGMA synchronous = {synchronous}")
        if read_only:
            await conn.execute("PRAGMA query_only = ON")
    except BaseException:
        # An unclosed aiosqlite thread would hang exit.
        await conn.close()
        raise
    return conn


async def open_database(
    path: Path, migrations_dir: Path, synchronous: str = "FULL", readers: int = 4
) -> Database:
    """Create the folder and file if needed, apply pending migrations, start writer and readers.

    Raises:
        DatabaseError: the file is not SQLite, is corrupt, or its schema is newer than ours.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_file(path)
    is_new = not path.exists() or path.stat().st_size == 0
    _create_private(path)
    writer = WriterThread(path, synchronous)
    writer.start()
    conns: list[aiosqlite.Connection] = []
    try:
        await writer.run(
            lambda conn: _prepare(conn, path, is_new, migrations_dir), transaction=False
        )
        for _ in range(readers):
            conns.append(await _connect_reader(path))
        checkpointer = await _connect_reader(path, read_only=False, synchronous=synchronous)
        conns.append(checkpointer)
    except sqlite3.DatabaseError as exc:
        await _close_all(conns, writer)
        raise DatabaseError(f"{path} cannot be opened as a database: {exc}") from exc
    except BaseException:
        await _close_all(conns, writer)
        raise
    return Database(path, writer, ReaderPool(conns[:-1]), checkpointer)


async def _close_all(conns: Iterable[aiosqlite.Connection], writer: WriterThread) -> None:
    for conn in conns:
        await conn.close()
    await writer.stop()


def _migration_files(migrations_dir: Path) -> list[tuple[int, str, Path]]:
    found = []
    for file in sorted(migrations_dir.glob("*.sql")):
        match = _MIGRATION_NAME.match(file.name)
        if not match:
            raise DatabaseError(f"migration {file.name} is not named NNNN_name.sql")
        found.append((int(match.group(1)), match.group(2), file))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError("two migrations share a number")
    return found


def apply_migrations(conn: sqlite3.Connection, migrations_dir: Path) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction; return those applied.

    Safe to re-run: applied versions are recorded in schema_migrations.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    files = _migration_files(migrations_dir)
    known = {v for v, _, _ in files}
    if done - known:
        raise DatabaseError(
            f"database has migrations {sorted(done - known)} that this version does not know"
        )
    applied = []
    for version, name, file in files:
        if version in done:
            continue
        sql = file.read_text(encoding="utf-8")
        # executescript runs the file and the bookkeeping row as one transaction.
        try:
            conn.executescript(
                "BEGIN IMMEDIATE;\n"
                f"{sql}\n;"
                "INSERT INTO schema_migrations (version, name, applied_at)"
                f" VALUES ({version}, '{name}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));\n"
                "COMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        log.info("migration.applied version=%04d name=%s", version, name)
        applied.append(version)
    return applied
