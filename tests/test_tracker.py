"""The tracker: transitions, seq allocation, group commit, fairness, quotas, failures."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from server.config import PROJECT_ROOT
from server.errors import NotFound, QuotaExceeded, TaskFinished, Unavailable
from server.lifecycle import Cancel, Complete, Fail, Progress, Quotas, transition
from server.models import EventType, TaskState, TaskStatus
from server.store.sqlite import SQLiteStore as Store
from server.store.sqlite_accounts import SQLiteAccounts as AccountStore
from server.store.sqlite_db import open_database
from server.store.sqlite_writes import TaskWriter
from server.tracker import Tracker


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


async def started(store, **kwargs) -> Tracker:
    tracker = Tracker(store, **kwargs)
    tracker.start()
    return tracker


async def test_first_progress_starts_the_task(tracker, store):
    """The first progress of a pending task is a `started` event, then the `progress` event."""
    task = await tracker.create_task(1, "external", "{}")
    assert (task.status, task.seq) == (TaskStatus.PENDING, 1)
    events = await tracker.report_progress(task.id, Progress(25, step="a", message="m"))
    assert [(e.seq, e.event) for e in events] == [(2, EventType.STARTED), (3, EventType.PROGRESS)]
    stored = await store.get_task(task.id)
    assert (stored.status, stored.progress, stored.step, stored.message, stored.seq) == (
        TaskStatus.RUNNING,
        25,
        "a",
        "m",
        3,
    )
    assert stored.started_at is not None


@pytest.mark.parametrize(
    ("change", "status", "event"),
    [
        (Complete('{"x":1}'), TaskStatus.COMPLETED, EventType.COMPLETED),
        (Fail("boom"), TaskStatus.FAILED, EventType.FAILED),
        (Cancel(), TaskStatus.CANCELLED, EventType.CANCELLED),
    ],
)
async def test_terminal_states_are_final(tracker, store, change, status, event):
    """After completed/failed/cancelled every update is refused and nothing is stored."""
    task = await tracker.create_task(1, "external", "{}")
    await tracker.report_progress(task.id, Progress(10))
    events = await tracker._change(task.id, change, None, None)
    assert events[-1].event is event
    final = await store.get_task(task.id)
    assert final.status is status and final.finished_at is not None
    for later in (Progress(50), Complete(None), Fail("x"), Cancel()):
        with pytest.raises(TaskFinished):
            await tracker._change(task.id, later, None, None)
    assert len((await store.list_events(task.id, 0, 100)).events) == final.seq == 4


async def test_complete_from_pending_passes_through_running(tracker, store):
    """Completing a pending task still records `started` before `completed`."""
    task = await tracker.create_task(1, "external", "{}")
    events = await tracker.complete(task.id, None)
    assert [e.event for e in events] == [EventType.STARTED, EventType.COMPLETED]
    assert events[-1].progress == 100 and events[-1].result == "{}"
    assert (await store.get_task(task.id)).result == "{}"


async def test_foreign_or_missing_task_is_not_found(tracker):
    """An owner check that fails looks exactly like a missing task."""
    task = await tracker.create_task(1, "external", "{}")
    with pytest.raises(NotFound):
        await tracker.report_progress(task.id, Progress(1), owner_id=2)
    with pytest.raises(NotFound):
        await tracker.report_progress("nope", Progress(1), owner_id=1)


async def test_concurrent_updates_get_consecutive_seqs_in_few_commits(tracker, store):
    """200 concurrent updates to one task get seqs 4..203 with no gap, in batched commits."""
    task = await tracker.create_task(1, "external", "{}")
    await tracker.report_progress(task.id, Progress(0))
    results = await asyncio.gather(
        *(tracker.report_progress(task.id, Progress(i % 101)) for i in range(200))
    )
    seqs = sorted(e.seq for events in results for e in events)
    assert seqs == list(range(4, 204))
    stored = await store.list_events(task.id, 0, 1000)
    assert [e.seq for e in stored.events] == list(range(1, 204))
    assert tracker.commits < 100  # group commit folded requests together


async def test_listeners_hear_committed_events_in_order(tracker, store):
    """Listeners are called after commit, in seq order."""
    heard = []
    tracker.add_listener(heard.append)
    task = await tracker.create_task(1, "external", "{}")
    await asyncio.gather(*(tracker.report_progress(task.id, Progress(i)) for i in range(20)))
    assert [e.seq for e in heard] == list(range(1, 23))


async def test_a_database_that_cannot_commit_fails_the_batch_fast(tracker, store, monkeypatch):
    """Busy/full/I-O errors: every caller of the batch gets 503, nothing is stored or heard,
    and the next update gets the next real seq (no cache ran ahead)."""
    heard = []
    tracker.add_listener(heard.append)
    task = await tracker.create_task(1, "external", "{}")
    heard.clear()
    real = TaskWriter._write

    def broken(conn, writes, bytes_delta):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(TaskWriter, "_write", staticmethod(broken))
    results = await asyncio.gather(
        *(tracker.report_progress(task.id, Progress(i)) for i in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(r, Unavailable) and r.status == 503 for r in results)
    assert tracker.commits == 1  # the create; the failed batch was not retried per request
    monkeypatch.setattr(TaskWriter, "_write", staticmethod(real))
    assert heard == []
    assert len((await store.list_events(task.id, 0, 10)).events) == 1
    events = await tracker.report_progress(task.id, Progress(6))
    assert [e.seq for e in events] == [2, 3]


async def test_a_failing_request_does_not_fail_its_batch(tracker, store, monkeypatch):
    """An error that may belong to one request: each is retried alone; only the bad one fails,
    and one refused only because of what the bad one staged is accepted on its own."""
    good = await tracker.create_task(1, "external", "{}")
    bad = await tracker.create_task(1, "external", "{}")
    real = TaskWriter._write

    def write(conn, writes, bytes_delta):
        writes = list(writes)
        if any(w.state.id == bad.id for w in writes):
            raise sqlite3.IntegrityError("bad row")
        real(conn, writes, bytes_delta)

    monkeypatch.setattr(TaskWriter, "_write", staticmethod(write))
    results = await asyncio.gather(
        tracker.report_progress(good.id, Progress(1)),
        tracker.complete(bad.id, None),
        tracker.report_progress(bad.id, Progress(2)),  # refused in the batch: "finished"
        tracker.report_progress(good.id, Progress(2)),
        return_exceptions=True,
    )
    monkeypatch.setattr(TaskWriter, "_write", staticmethod(real))
    assert [e.seq for e in results[0]] == [2, 3] and [e.seq for e in results[3]] == [4]
    assert isinstance(results[1], Unavailable) and isinstance(results[2], Unavailable)
    assert results[1].headers["Retry-After"] == "1"  # a 503 always says when to come back
    assert (await store.get_task(good.id)).seq == 4
    assert (await store.get_task(bad.id)).seq == 1
    # Nothing of the bad batch stuck: the task is still pending and takes a post.
    assert [e.seq for e in await tracker.report_progress(bad.id, Progress(3))] == [2, 3]


async def test_refusals_against_a_rolled_back_change_are_not_kept(tracker, store, monkeypatch):
    """A post refused because an earlier request of its batch completed the task is planned
    again on its own when that completion fails, and accepted."""
    task = await tracker.create_task(1, "external", "{}")
    real = TaskWriter._write

    def write(conn, writes, bytes_delta):
        writes = list(writes)
        if any(w.state.status is TaskStatus.COMPLETED for w in writes):
            raise sqlite3.IntegrityError("the completion cannot be stored")
        real(conn, writes, bytes_delta)

    monkeypatch.setattr(TaskWriter, "_write", staticmethod(write))
    done, post = await asyncio.gather(
        tracker.complete(task.id, None),
        tracker.report_progress(task.id, Progress(50)),
        return_exceptions=True,
    )
    assert isinstance(done, Unavailable)
    assert [e.event for e in post] == [EventType.STARTED, EventType.PROGRESS]


async def test_stop_commits_what_was_accepted(store):
    """Stopping the tracker commits the queued requests before the loop ends."""
    tracker = await started(store)
    task = await tracker.create_task(1, "external", "{}")
    pending = [
        asyncio.ensure_future(tracker.report_progress(task.id, Progress(i))) for i in range(30)
    ]
    await asyncio.sleep(0)
    await tracker.stop()
    results = await asyncio.wait_for(asyncio.gather(*pending), 5)
    assert len(results) == 30
    assert len((await store.list_events(task.id, 0, 100)).events) == 32


def test_transition_is_pure():
    """transition returns a new state and leaves the old one untouched."""
    state = TaskState(
        id="t",
        user_id=1,
        kind="k",
        status=TaskStatus.RUNNING,
        progress=5,
        step="s",
        seq=3,
        created_at="c",
        updated_at="c",
    )
    ts = "2026-12-01T10:00:00.000Z"
    new, events = transition(state, Progress(10, message="hi"), ts)
    assert (state.seq, state.progress, state.meter) == (3, 5, None)
    assert (new.seq, new.progress, new.step) == (4, 10, "s")
    assert (events[0].ts, events[0].seq, events[0].message) == (ts, 4, "hi")


async def test_one_users_burst_does_not_delay_another_by_more_than_a_batch(store):
    """Lanes are served round-robin: a single post of user 2 lands in the first batches,
    however many posts user 1 queued before it."""
    tracker = await started(store, max_batch=16)
    try:
        busy = await tracker.create_task(1, "external", "{}")
        quiet = await tracker.create_task(2, "external", "{}")
        heard: list[str] = []
        tracker.add_listener(lambda e: heard.append(e.task_id))
        burst = [tracker.report_progress(busy.id, Progress(i % 100)) for i in range(300)]
        single = tracker.report_progress(quiet.id, Progress(1), owner_id=2)
        await asyncio.gather(*burst, single)
        assert heard.index(quiet.id) < 2 * 16
    finally:
        await tracker.stop()


async def test_the_queue_is_bounded_per_user_and_in_all(store):
    """Beyond its share of the queue a user's writes get 503 `overloaded`; others still fit."""
    tracker = await started(store, queue_max=64)  # a lane holds 64 / 8 = 8
    try:
        task = await tracker.create_task(1, "external", "{}")
        other = await tracker.create_task(2, "external", "{}")
        results = await asyncio.gather(
            *(tracker.report_progress(task.id, Progress(i)) for i in range(20)),
            tracker.report_progress(other.id, Progress(1), owner_id=2),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, Unavailable)]
        assert len(refused) == 12 and all(r.code == "overloaded" for r in refused)
        assert all(r.headers["Retry-After"] == "1" for r in refused)
        assert not isinstance(results[-1], Exception)
    finally:
        await tracker.stop()


async def test_unfinished_task_quota(store):
    """A user at the unfinished-task quota gets 429 quota_exceeded; finishing one frees it."""
    tracker = await started(store, quotas=Quotas(max_unfinished_tasks=3))
    try:
        tasks = [await tracker.create_task(1, "external", "{}") for _ in range(3)]
        with pytest.raises(QuotaExceeded) as refused:
            await tracker.create_task(1, "external", "{}")
        assert refused.value.status == 429 and refused.value.fields == {"quota": "unfinished_tasks"}
        await tracker.create_task(2, "external", "{}")  # another user is not affected
        await tracker.cancel(tasks[0].id)
        await tracker.create_task(1, "external", "{}")
    finally:
        await tracker.stop()


async def test_stored_bytes_quota_refuses_progress_but_not_the_end(store):
    """Over the storage quota progress posts are refused, but a task can still finish."""
    tracker = await started(store, quotas=Quotas(max_stored_bytes=4000))
    try:
        task = await tracker.create_task(1, "external", "{}")
        with pytest.raises(QuotaExceeded) as refused:
            for _ in range(100):
                await tracker.report_progress(task.id, Progress(1, message="x" * 500))
        assert refused.value.fields == {"quota": "stored_bytes"}
        events = await tracker.complete(task.id, '{"ok":true}')
        assert events[-1].event is EventType.COMPLETED
        other = await tracker.create_task(2, "external", "{}")
        await tracker.report_progress(other.id, Progress(1, message="x" * 500), owner_id=2)
    finally:
        await tracker.stop()


async def test_a_token_for_an_unknown_user_cannot_create(tracker):
    """A create for a user the database does not have is refused alone (401)."""
    with pytest.raises(Exception) as refused:
        await tracker.create_task(99, "external", "{}")
    assert getattr(refused.value, "status", None) == 401
    await tracker.create_task(1, "external", "{}")


async def test_the_write_cache_holds_no_params(tracker, store):
    """What the tracker keeps of a task between writes is its small state, not its params."""
    task = await tracker.create_task(1, "external", '{"blob":"' + "x" * 60000 + '"}')
    await tracker.report_progress(task.id, Progress(5, message="m" * 60000))
    cached = store._writer.states[task.id]
    assert isinstance(cached, TaskState)
    assert sum(len(str(getattr(cached, f))) for f in cached.__slots__) < 1000
