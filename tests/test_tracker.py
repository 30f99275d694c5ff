"""The tracker: transitions, seq allocation, group commit, listeners — without a server."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from server.config import PROJECT_ROOT
from server.errors import NotFound, TaskFinished
from server.models import EventType, TaskStatus
from server.store.sqlite import Store
from server.store.sqlite_accounts import AccountStore
from server.store.sqlite_db import open_database
from server.tracker import Cancel, Complete, Fail, Progress, Tracker, apply_change


@pytest.fixture
async def store(tmp_path):
    db = await open_database(tmp_path / "t.db", PROJECT_ROOT / "migrations" / "sqlite")
    store = Store(db)
    accounts = AccountStore(db)
    await accounts.create_user("owner", "x", "2026-01-01T00:00:00.000Z")
    await accounts.create_user("other", "x", "2026-01-01T00:00:00.000Z")
    yield store
    await db.close()


@pytest.fixture
async def tracker(store):
    tracker = Tracker(store)
    tracker.start()
    yield tracker
    await tracker.stop()


async def test_first_progress_starts_the_task(tracker, store):
    """The first progress of a pending task is a `started` event, then the `progress` event."""
    task = await tracker.create_task(1, "external", {})
    assert (task.status, task.seq) == (TaskStatus.PENDING, 1)
    events = await tracker.report_progress(task.id, Progress(25, step="a", message="m"))
    assert [(e.seq, e.event) for e in events] == [(2, EventType.STARTED), (3, EventType.PROGRESS)]
    stored = await store.get_task(task.id)
    assert (stored.status, stored.progress, stored.step, stored.seq) == (
        TaskStatus.RUNNING,
        25,
        "a",
        3,
    )
    assert stored.started_at is not None


@pytest.mark.parametrize(
    ("change", "status", "event"),
    [
        (Complete({"x": 1}), TaskStatus.COMPLETED, EventType.COMPLETED),
        (Fail("boom"), TaskStatus.FAILED, EventType.FAILED),
        (Cancel(), TaskStatus.CANCELLED, EventType.CANCELLED),
    ],
)
async def test_terminal_states_are_final(tracker, store, change, status, event):
    """After completed/failed/cancelled every update is refused and nothing is stored."""
    task = await tracker.create_task(1, "external", {})
    await tracker.report_progress(task.id, Progress(10))
    events = await tracker._submit(task.id, None, change)
    assert events[-1].event is event
    final = await store.get_task(task.id)
    assert final.status is status and final.finished_at is not None
    for later in (Progress(50), Complete(None), Fail("x"), Cancel()):
        with pytest.raises(TaskFinished):
            await tracker._submit(task.id, None, later)
    assert len(await store.list_events(task.id, 0, 100)) == final.seq == 4


async def test_complete_from_pending_passes_through_running(tracker):
    """Completing a pending task still records `started` before `completed`."""
    task = await tracker.create_task(1, "external", {})
    events = await tracker.complete(task.id, None)
    assert [e.event for e in events] == [EventType.STARTED, EventType.COMPLETED]
    assert events[-1].progress == 100 and events[-1].result == {}


async def test_foreign_or_missing_task_is_not_found(tracker):
    """An owner check that fails looks exactly like a missing task."""
    task = await tracker.create_task(1, "external", {})
    with pytest.raises(NotFound):
        await tracker.report_progress(task.id, Progress(1), owner_id=2)
    with pytest.raises(NotFound):
        await tracker.report_progress("nope", Progress(1), owner_id=1)


async def test_concurrent_updates_get_consecutive_seqs_in_few_commits(tracker, store):
    """200 concurrent updates to one task get seqs 3..202 with no gap, in batched commits."""
    task = await tracker.create_task(1, "external", {})
    await tracker.report_progress(task.id, Progress(0))
    results = await asyncio.gather(
        *(tracker.report_progress(task.id, Progress(i % 101)) for i in range(200))
    )
    seqs = sorted(e.seq for events in results for e in events)
    assert seqs == list(range(4, 204))
    stored = await store.list_events(task.id, 0, 1000)
    assert [e.seq for e in stored] == list(range(1, 204))
    assert tracker.commits < 100  # group commit folded requests together


async def test_listeners_hear_committed_events_in_order(tracker, store):
    """Listeners are called after commit, in seq order, and see the stored row."""
    heard = []
    tracker.add_listener(heard.append)
    task = await tracker.create_task(1, "external", {})
    await asyncio.gather(*(tracker.report_progress(task.id, Progress(i)) for i in range(20)))
    assert [e.seq for e in heard] == list(range(1, 23))


async def test_failed_commit_acknowledges_nothing(tracker, store, monkeypatch):
    """When the transaction fails, callers get an error and nothing is stored or published."""
    heard = []
    tracker.add_listener(heard.append)
    task = await tracker.create_task(1, "external", {})
    heard.clear()

    async def broken(writes):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "commit", broken)
    with pytest.raises(Exception, match="could not store"):
        await tracker.report_progress(task.id, Progress(5))
    monkeypatch.undo()
    assert heard == []
    assert len(await store.list_events(task.id, 0, 10)) == 1
    # The cache was not advanced: the next update gets the next real seq.
    events = await tracker.report_progress(task.id, Progress(6))
    assert [e.seq for e in events] == [2, 3]


async def test_stop_commits_what_was_accepted(store):
    """Stopping the tracker commits the queued requests before the loop ends."""
    tracker = Tracker(store)
    tracker.start()
    task = await tracker.create_task(1, "external", {})
    pending = [
        asyncio.ensure_future(tracker.report_progress(task.id, Progress(i))) for i in range(30)
    ]
    await asyncio.sleep(0)
    await tracker.stop()
    results = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert len(results) == 30
    assert len(await store.list_events(task.id, 0, 100)) == 32


def test_apply_change_is_pure():
    """apply_change returns a new task and leaves the old one untouched."""
    from server.models import Task

    task = Task(
        id="t",
        user_id=1,
        kind="k",
        params={},
        status=TaskStatus.RUNNING,
        progress=5,
        step="s",
        message=None,
        result=None,
        error=None,
        seq=3,
        created_at="c",
        updated_at="c",
    )
    new, events = apply_change(task, Progress(10, message="hi"), "ts")
    assert (task.seq, task.progress) == (3, 5)
    assert (new.seq, new.progress, new.step, new.message) == (4, 10, "s", "hi")
    assert events[0].ts == "ts" and events[0].seq == 4


async def test_a_failing_request_does_not_fail_its_batch(tracker, store, monkeypatch):
    """When a shared transaction fails, the requests are retried alone: only the bad one fails."""
    good = await tracker.create_task(1, "external", {})
    bad = await tracker.create_task(1, "external", {})
    real_commit = store.commit

    async def commit(writes):
        if any(w.task.id == bad.id for w in writes):
            raise sqlite3.IntegrityError("bad row")
        await real_commit(writes)

    monkeypatch.setattr(store, "commit", commit)
    results = await asyncio.gather(
        tracker.report_progress(good.id, Progress(1)),
        tracker.report_progress(bad.id, Progress(1)),
        tracker.report_progress(good.id, Progress(2)),
        return_exceptions=True,
    )
    assert [e.seq for e in results[0]] == [2, 3] and [e.seq for e in results[2]] == [4]
    assert "could not store" in str(results[1])
    monkeypatch.undo()
    assert (await store.get_task(good.id)).seq == 4
    assert (await store.get_task(bad.id)).seq == 1
