"""Opening the SQLite database: PRAGMAs, migrations, one writer and one reader connection.

Writes go through the single writer connection, one transaction at a time (guarded by
`write_lock`): aiosqlite runs a connection's calls on one thread, and two tasks sharing
a connection would share its transaction. Reads use a second connection; in WAL mode
it sees every committed transaction and never blocks the writer, provided every read is
executed and fetched in one call (`execute_fetchall`): a statement left active on the
shared reader keeps its snapshot for every later read (see `Store._query`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SQLITE_HEADER = b"SQLite format 3\x00"
#: How long a connection waits for another one's lock before "database is locked", in ms.
BUSY_TIMEOUT_MS = 10_000


class DatabaseError(RuntimeError):
    """The database file cannot be used; the message says why, for the operator."""


@dataclass
class Database:
    writer: aiosqlite.Connection
    reader: aiosqlite.Connection
    #: Held for the whole of every write transaction on `writer`.
    write_lock: asyncio.Lock

    async def close(self) -> None:
        await self.reader.close()
        await self.writer.close()

    async def auto_vacuum_mode(self) -> int:
        """SQLite's auto_vacuum setting: 0 none, 1 full, 2 incremental."""
        rows = await self.reader.execute_fetchall("PRAGMA auto_vacuum")
        return int(rows[0][0]) if rows else 0

    async def free_pages(self) -> int:
        """Pages on SQLite's freelist: space deletes left inside the file."""
        rows = await self.reader.execute_fetchall("PRAGMA freelist_count")
        return int(rows[0][0]) if rows else 0

    async def incremental_vacuum(self, pages: int) -> None:
        """Give back up to `pages` free pages to the file system (auto_vacuum=INCREMENTAL only).

        One short write transaction under the write lock; the file shrinks at the next
        checkpoint. A no-op on a database created without incremental auto-vacuum.
        """
        async with self.write_lock:
            # executescript steps the pragma to the end: execute() frees one page only.
            await self.writer.executescript(f"PRAGMA incremental_vacuum({int(pages)})")

    async def checkpoint(self, busy_timeout_ms: int = 100) -> tuple[int, int, int]:
        """Copy the WAL into the database and truncate it to zero bytes.

        Returns SQLite's (busy, wal_pages, checkpointed_pages); busy=1 when a reader kept it
        from finishing, which is harmless: the next checkpoint catches up. The wait for
        readers is bounded by `busy_timeout_ms` because producers wait on the write lock.
        """
        async with self.write_lock:
            await self.writer.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            try:
                async with self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cur:
                    row = await cur.fetchone()
            finally:
                await self.writer.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        return (0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]))


def _check_file(path: Path) -> None:
    """Refuse a file that exists but is not an SQLite database, before SQLite touches it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as fh:
        header = fh.read(len(_SQLITE_HEADER))
    if header != _SQLITE_HEADER:
        raise DatabaseError(f"{path} exists but is not an SQLite database; refusing to touch it")


async def _connect(path: Path, synchronous: str) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=10)
    try:
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute(f"PRAGMA synchronous = {synchronous}")
        await conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    except BaseException:
        # A corrupt file fails here already; an unclosed aiosqlite thread would hang exit.
        await conn.close()
        raise
    return conn


async def open_database(path: Path, migrations_dir: Path, synchronous: str = "FULL") -> Database:
    """Create the folder and file if needed, apply pending migrations, return both connections.

    Raises:
        DatabaseError: the file is not SQLite, is corrupt, or its schema is newer than ours.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_file(path)
    is_new = not path.exists() or path.stat().st_size == 0
    writer = reader = None
    try:
        writer = await _connect(path, synchronous)
        if is_new:
            # Only possible before the first table exists; lets retention give space back
            # to the file system with PRAGMA incremental_vacuum instead of a full VACUUM.
            await writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
        async with writer.execute("PRAGMA quick_check") as cur:
            row = await cur.fetchone()
        if row is None or row[0] != "ok":
            raise DatabaseError(f"{path} failed SQLite's integrity check: {row[0] if row else '?'}")
        async with writer.execute("PRAGMA journal_mode = WAL") as cur:
            mode = (await cur.fetchone())[0]
        if mode.lower() != "wal":
            raise DatabaseError(f"{path}: could not switch to WAL mode (got {mode})")
        try:
            await apply_migrations(writer, migrations_dir)
        except DatabaseError as exc:
            raise DatabaseError(f"{path}: {exc}") from exc
        async with writer.execute("PRAGMA auto_vacuum") as cur:
            auto_vacuum = (await cur.fetchone())[0]
        if auto_vacuum != 2:  # 2 = INCREMENTAL; older files: see README, "Retention"
            log.warning(
                "db.auto_vacuum_off path=%s hint=freed_space_is_reused_but_the_file_never_shrinks",
                path,
            )
        reader = await _connect(path, synchronous)
    except sqlite3.DatabaseError as exc:
        for conn in (reader, writer):
            if conn is not None:
                await conn.close()
        raise DatabaseError(f"{path} cannot be opened as a database: {exc}") from exc
    except BaseException:
        for conn in (reader, writer):
            if conn is not None:
                await conn.close()
        raise
    return Database(writer=writer, reader=reader, write_lock=asyncio.Lock())


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


async def apply_migrations(conn: aiosqlite.Connection, migrations_dir: Path) -> list[int]:
    """Apply every migration not yet recorded, each in its own transaction; return those applied.

    Safe to re-run: applied versions are recorded in schema_migrations.
    """
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
    )
    async with conn.execute("SELECT version FROM schema_migrations") as cur:
        done = {row[0] for row in await cur.fetchall()}
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
            await conn.executescript(
                "BEGIN IMMEDIATE;\n"
                f"{sql}\n;"
                "INSERT INTO schema_migrations (version, name, applied_at)"
                f" VALUES ({version}, '{name}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));\n"
                "COMMIT;"
            )
        except sqlite3.Error:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise
        log.info("migration.applied version=%04d name=%s", version, name)
        applied.append(version)
    return applied
