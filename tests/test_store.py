"""Store reads: each query is fetched in one call, so the reader never serves an old snapshot."""

from __future__ import annotations

import aiosqlite
import pytest

from server.config import PROJECT_ROOT
from server.store.sqlite import SQLiteStore as Store
from server.store.sqlite_accounts import SQLiteAccounts as AccountStore
from server.store.sqlite_db import open_database
from server.tracker import Progress, Tracker


@pytest.fixture
async def db(tmp_path):
    db = await open_database(tmp_path / "s.db", PROJECT_ROOT / "migrations" / "sqlite")
    yield db
    await db.close()


async def test_an_active_statement_freezes_a_readers_snapshot(tmp_path, db):
    """Why reads must not leave statements open: SQLite keeps the snapshot while one is active."""
    store = Store(db)
    accounts = AccountStore(db)
    await accounts.create_user("u", "x", "t")
    tracker = Tracker(store)
    tracker.start()
    reader = await aiosqlite.connect(tmp_path / "s.db")
    try:
        task = await tracker.create_task(1, "k", "{}")
        held = await reader.execute("SELECT seq FROM task_events")  # left active
        await tracker.report_progress(task.id, Progress(5))
        sql = "SELECT seq FROM tasks WHERE id = ?"
        assert (await reader.execute_fetchall(sql, (task.id,)))[0][0] == 1  # the old snapshot
        await held.close()
        assert (await reader.execute_fetchall(sql, (task.id,)))[0][0] == 3
        assert (await store.get_task(task.id)).seq == 3
    finally:
        await reader.close()
        await tracker.stop()


async def test_reads_never_leave_a_statement_open(db, monkeypatch):
    """Every Store read fetches in one call; a reader cursor kept across awaits is refused."""
    store = Store(db)
    accounts = AccountStore(db)
    await accounts.create_user("u", "x", "t")
    tracker = Tracker(store)
    tracker.start()
    try:
        task = await tracker.create_task(1, "k", "{}")

        def no_cursor(*args, **kwargs):
            raise AssertionError("reader query not fetched in one call")

        for reader in db.readers._conns:
            monkeypatch.setattr(reader, "execute", no_cursor)
            monkeypatch.setattr(reader, "cursor", no_cursor)
        assert (await store.get_task(task.id)).seq == 1
        assert await accounts.get_user(1) is not None
        assert await accounts.find_credentials("u") is not None
        assert await accounts.instance_id()
        assert await accounts.get_session("s") is None
        assert await accounts.live_sessions(["s"], 0.0) == set()
        assert (await accounts.list_users())[0].username == "u"
        assert len((await store.list_tasks(1, None, 10)).tasks) == 1
        assert len((await store.list_events(task.id, 0, 10)).events) == 1
        assert await store.first_kept_seq(task.id) == 1
        assert await store.count_tasks_by_status() == {"pending": 1}
        assert await store.tasks_to_resume(["k"]) != []
        assert await store.list_subscriptions(1, 10) == []
        assert await store.task_spans([task.id]) != []
        await store.tasks_with_seq_over(0, 0, 10)
        await store.finished_task_spans("9999", None, 10)
        await db.auto_vacuum_mode()
        await db.free_pages()
    finally:
        monkeypatch.undo()
        await tracker.stop()
