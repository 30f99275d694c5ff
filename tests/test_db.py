"""open_database: folder and file creation, WAL, migrations applied once, refusing bad files."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from server.config import PROJECT_ROOT
from server.store.sqlite_db import DatabaseError, apply_migrations, open_database

PRAGMAS = ("journal_mode", "foreign_keys", "synchronous")
MIGRATIONS = PROJECT_ROOT / "migrations" / "sqlite"
#: (version, name) of every shipped migration, in order.
SHIPPED = [(int(f.name[:4]), f.stem[5:]) for f in sorted(MIGRATIONS.glob("*.sql"))]
SHIPPED_VERSIONS = [v for v, _ in SHIPPED]


def _sqlite_threads() -> set[threading.Thread]:
    """aiosqlite's per-connection worker threads that are still alive."""
    return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}


def _assert_no_leaked_connections(before: set[threading.Thread]) -> None:
    """Every connection opened since `before` was closed (its thread ends; bounded wait)."""
    for thread in _sqlite_threads() - before:
        thread.join(timeout=5)
        assert not thread.is_alive(), "an aiosqlite connection was left open"


def _versions(path: Path) -> list[tuple[int, str, str]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT version, name, applied_at FROM schema_migrations ORDER BY version"
        ).fetchall()
    conn.close()
    return rows


async def test_creates_folder_and_applies_migrations_once(tmp_path: Path) -> None:
    """A new path gets its folder, file and schema; re-opening applies nothing again."""
    path = tmp_path / "new" / "dir" / "app.db"
    db = await open_database(path, MIGRATIONS)
    try:
        rows = await db.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {row[0] for row in rows}
    finally:
        await db.close()
    assert {"users", "tasks", "task_events", "subscriptions", "schema_migrations"} <= tables
    first = _versions(path)
    assert [(v, n) for v, n, _ in first] == SHIPPED
    assert SHIPPED[0] == (1, "initial")

    db = await open_database(path, MIGRATIONS)
    try:
        assert (
            await db.writer.run(lambda c: apply_migrations(c, MIGRATIONS), transaction=False) == []
        )
    finally:
        await db.close()
    assert _versions(path) == first  # same row, same applied_at


async def test_new_migration_is_applied_on_next_open(tmp_path: Path) -> None:
    """Only the migrations not yet recorded run, in order."""
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, migrations)
    path = tmp_path / "app.db"
    db = await open_database(path, migrations)
    await db.close()
    (migrations / "0900_notes.sql").write_text("CREATE TABLE notes (id INTEGER PRIMARY KEY);\n")
    db = await open_database(path, migrations)
    try:
        assert (
            await db.writer.run(lambda c: apply_migrations(c, migrations), transaction=False) == []
        )
        assert (await db.fetch("SELECT count(*) FROM notes"))[0][0] == 0
    finally:
        await db.close()
    assert [v for v, _, _ in _versions(path)] == [*SHIPPED_VERSIONS, 900]


async def test_wal_mode_and_pragmas(tmp_path: Path) -> None:
    """The writer and the readers run in WAL mode with foreign keys on; the writer at the
    chosen synchronous level."""
    db = await open_database(tmp_path / "app.db", MIGRATIONS, synchronous="NORMAL")

    def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
        return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0] for name in PRAGMAS)

    try:
        assert await db.writer.run(pragmas, transaction=False) == ("wal", 1, 1)  # 1: NORMAL
        for _ in range(db.readers.size):
            got = [(await db.fetch(f"PRAGMA {name}"))[0][0] for name in PRAGMAS[:2]]
            assert got == ["wal", 1]
    finally:
        await db.close()


async def test_empty_file_is_treated_as_new(tmp_path: Path) -> None:
    """A zero-byte file (e.g. from `touch`) becomes a fresh database."""
    path = tmp_path / "empty.db"
    path.touch()
    db = await open_database(path, MIGRATIONS)
    await db.close()
    assert [v for v, _, _ in _versions(path)] == SHIPPED_VERSIONS


async def test_refuses_junk_file_without_touching_it(tmp_path: Path) -> None:
    """A file that is not SQLite raises DatabaseError naming it and is left as it was."""
    path = tmp_path / "notes.txt"
    junk = b"just some text, definitely not a database\n" * 20
    path.write_bytes(junk)
    with pytest.raises(DatabaseError, match="not an SQLite database") as exc_info:
        await open_database(path, MIGRATIONS)
    assert str(path) in str(exc_info.value)
    assert path.read_bytes() == junk
    assert not path.with_name("notes.txt-wal").exists()


async def test_refuses_corrupt_sqlite_file(tmp_path: Path) -> None:
    """A file with an SQLite header but a wrecked body raises DatabaseError (and leaks nothing)."""
    path = tmp_path / "broken.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 50)
    conn.close()
    data = bytearray(path.read_bytes())
    data[100:4000] = b"\xa5" * 3900
    path.write_bytes(bytes(data))
    before = _sqlite_threads()
    with pytest.raises(DatabaseError) as exc_info:
        await open_database(path, MIGRATIONS)
    assert str(path) in str(exc_info.value)
    _assert_no_leaked_connections(before)  # a leaked thread would hang interpreter exit


async def test_refuses_schema_from_a_newer_version(tmp_path: Path) -> None:
    """A database recording a migration we do not have raises DatabaseError naming it."""
    path = tmp_path / "future.db"
    db = await open_database(path, MIGRATIONS)
    await db.close()
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (42, 'future', 'x')")
    conn.close()
    before = _sqlite_threads()
    with pytest.raises(DatabaseError, match=r"\[42\]") as exc_info:
        await open_database(path, MIGRATIONS)
    assert str(path) in str(exc_info.value)
    _assert_no_leaked_connections(before)


async def test_failed_migration_is_rolled_back(tmp_path: Path) -> None:
    """A migration that fails halfway leaves neither its tables nor its record behind."""
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, migrations)
    (migrations / "0900_broken.sql").write_text(
        "CREATE TABLE half (id INTEGER);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    path = tmp_path / "app.db"
    with pytest.raises(DatabaseError):
        await open_database(path, migrations)
    assert [v for v, _, _ in _versions(path)] == SHIPPED_VERSIONS
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    conn.close()
    assert "half" not in names


async def test_refuses_badly_named_migration(tmp_path: Path) -> None:
    """Migration files must be named NNNN_name.sql."""
    migrations = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, migrations)
    (migrations / "2_oops.sql").write_text("SELECT 1;\n")
    with pytest.raises(DatabaseError, match="2_oops.sql"):
        await open_database(tmp_path / "app.db", migrations)


async def test_new_database_uses_incremental_auto_vacuum(tmp_path: Path) -> None:
    """A new file is created with auto_vacuum=INCREMENTAL, so retention can shrink it."""
    path = tmp_path / "app.db"
    db = await open_database(path, MIGRATIONS)
    try:
        assert await db.auto_vacuum_mode() == 2
        assert (await db.fetch("PRAGMA freelist_count"))[0][0] == await db.free_pages() == 0
    finally:
        await db.close()


async def test_older_database_without_auto_vacuum_opens_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file created without incremental auto-vacuum still works; the log says so once."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE leftover (x)")
    conn.close()
    db = await open_database(path, MIGRATIONS)
    try:
        assert await db.auto_vacuum_mode() == 0
        await db.incremental_vacuum(10)  # harmless no-op
        assert (await db.checkpoint())[0] == 0
    finally:
        await db.close()
    assert [r.getMessage().split()[0] for r in caplog.records].count("db.auto_vacuum_off") == 1


async def test_long_reads_cannot_take_every_reader(tmp_path: Path) -> None:
    """While long reads hold the bulk half of the pool, a small read still runs at once."""
    db = await open_database(tmp_path / "app.db", MIGRATIONS, readers=4)
    slow = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000)"
        " SELECT count(*) FROM n"
    )
    try:
        long_reads = [asyncio.create_task(db.fetch(slow, bulk=True)) for _ in range(4)]
        await asyncio.sleep(0.05)  # the first two have a reader each, two more wait
        small = asyncio.create_task(db.fetch("SELECT 1"))
        done, _ = await asyncio.wait([small, *long_reads], return_when=asyncio.FIRST_COMPLETED)
        assert small in done
        await asyncio.gather(*long_reads)
    finally:
        await db.close()


async def test_a_write_locked_file_is_refused_without_leaking_connections(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_sqlite behind another process's write lock (migrate-store): DatabaseError, closed."""
    from server.store import sqlite_db
    from server.store.sqlite import open_sqlite

    path = tmp_path / "app.db"
    db = await open_database(path, MIGRATIONS)
    await db.close()
    monkeypatch.setattr(sqlite_db, "BUSY_TIMEOUT_MS", 50)  # the wait, not the outcome
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    before = _sqlite_threads()
    try:
        with pytest.raises(DatabaseError, match="database is locked"):
            await open_sqlite(path, MIGRATIONS, "FULL", 2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _assert_no_leaked_connections(before)
