"""Subscription history survives a store outage: rows are kept and written once it is back."""

from __future__ import annotations

import logging
import sqlite3
from typing import Any

import pytest

from server import subscription_log
from server.config import PROJECT_ROOT
from server.store.sqlite import SQLiteStore
from server.store.sqlite_accounts import SQLiteAccounts
from server.store.sqlite_db import open_database
from server.subscription_log import SubscriptionHistory
from server.tracker import Tracker


@pytest.fixture
async def store(tmp_path):
    db = await open_database(tmp_path / "t.db", PROJECT_ROOT / "migrations" / "sqlite")
    await SQLiteAccounts(db).create_user("owner", "x", "2026-01-01T00:00:00.000Z")
    yield SQLiteStore(db)
    await db.close()


async def new_task(store: SQLiteStore) -> str:
    tracker = Tracker(store)
    tracker.start()
    try:
        return (await tracker.create_task(1, "job", "{}")).id
    finally:
        await tracker.stop()


def failing_writes(store: SQLiteStore, monkeypatch: Any, error: Exception, times: int) -> None:
    """The next `times` writes of the store's database raise `error`, as the disk would."""
    db = store._db
    real = db.write
    left = [times]

    async def write(fn: Any, **kwargs: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            raise error
        return await real(fn, **kwargs)

    monkeypatch.setattr(db, "write", write)


async def test_rows_wait_out_an_outage_and_are_written_after_it(store, monkeypatch, caplog):
    """A disk that cannot take writes for two flushes loses none of the rows; the failure
    is logged once for the outage, and its end once."""
    caplog.set_level(logging.INFO, logger="server.subscription_log")
    task_id = await new_task(store)
    history = SubscriptionHistory(store)
    failing_writes(store, monkeypatch, sqlite3.OperationalError("disk I/O error"), times=2)
    history.opened("c1", 1, task_id)
    await history.flush()
    history.opened("c2", 1, task_id)
    history.closed("c1", task_id)
    await history.flush()
    assert await store.list_subscriptions(1, 10) == []  # nothing yet: the disk is failing
    await history.flush()
    rows = {r.connection_id: r.unsubscribed_at for r in await store.list_subscriptions(1, 10)}
    assert set(rows) == {"c1", "c2"}
    assert rows["c1"] is not None and rows["c2"] is None  # c1's close came after its open
    messages = [r.getMessage() for r in caplog.records]
    assert sum("history.flush_failed" in m for m in messages) == 1
    assert sum("history.flush_recovered after_failures=2" in m for m in messages) == 1


async def test_an_error_that_is_not_an_outage_drops_that_flush(store, monkeypatch, caplog):
    """A refusal that would repeat (not busy, full or I/O) is not retried forever: its rows
    are dropped and logged, and later rows are written."""
    task_id = await new_task(store)
    history = SubscriptionHistory(store)
    failing_writes(store, monkeypatch, sqlite3.IntegrityError("constraint failed"), times=1)
    history.opened("c1", 1, task_id)
    await history.flush()
    history.opened("c2", 1, task_id)
    await history.flush()
    assert [r.connection_id for r in await store.list_subscriptions(1, 10)] == ["c2"]
    assert any("(dropped)" in r.getMessage() for r in caplog.records)


async def test_a_long_outage_keeps_the_newest_rows_only(store, monkeypatch):
    """While the store is down at most MAX_PENDING rows wait; the oldest go first."""
    monkeypatch.setattr(subscription_log, "MAX_PENDING", 3)
    task_id = await new_task(store)
    history = SubscriptionHistory(store)
    failing_writes(store, monkeypatch, sqlite3.OperationalError("database is locked"), times=5)
    for i in range(5):
        history.opened(f"c{i}", 1, task_id)
        await history.flush()
    await history.flush()
    kept = sorted(r.connection_id for r in await store.list_subscriptions(1, 10))
    assert kept == ["c2", "c3", "c4"]
