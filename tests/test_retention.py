"""Retention: each rule against a fake clock, bounded transactions, resume after a trim,
deleted tasks, surviving errors, and a database file that shrinks after a purge."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from server.retention import Retention
from server.tracker import Progress
from server.web.keys import config_key, db_key, history_key, store_key, tracker_key

from .helpers import MS, auth_headers, create_task, eventually, receive_json, register, ws_connect

DAY = timedelta(days=1)


class FakeClock:
    """Stands in for the wall clock; starts at the real now, moves only when told."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def make_retention(app: web.Application, clock: FakeClock, **options: Any) -> Retention:
    """A retention job on the app's store and database (all rules off unless given)."""
    settings: dict[str, Any] = {
        "event_retention": 0,
        "task_retention": 0,
        "max_events_per_task": 0,
        "interval": 3600.0,
        "clock": clock,
    }
    settings.update(options)
    retention = Retention(app[store_key], **settings)
    app[tracker_key].add_listener(retention.on_event)
    return retention


async def user_id(client: TestClient, token: str) -> int:
    resp = await client.get("/api/v1/auth/me", headers=auth_headers(token))
    return (await resp.json())["id"]


async def new_task(client: TestClient, token: str, progress_events: int = 0, **extra: Any) -> str:
    """A task with `progress_events` progress posts (its seq is then progress_events + 2)."""
    task_id = (await create_task(client, token))["id"]
    await add_progress(client.app, task_id, progress_events, **extra)
    return task_id


async def add_progress(app: web.Application, task_id: str, count: int, **extra: Any) -> None:
    """`count` progress events, committed together (the tracker folds them into few commits)."""
    tracker = app[tracker_key]
    for start in range(0, count, 500):  # within one lane's share of the commit queue
        await asyncio.gather(
            *(
                tracker.report_progress(task_id, Progress(progress=i % 100, **extra))
                for i in range(start, min(count, start + 500))
            )
        )


async def stored_seqs(app: web.Application, task_id: str) -> list[int]:
    rows = await app[db_key].fetch(
        "SELECT seq FROM task_events WHERE task_id = ? ORDER BY seq", (task_id,)
    )
    return [row[0] for row in rows]


async def count_rows(app: web.Application, table: str, task_id: str) -> int:
    column = "id" if table == "tasks" else "task_id"
    rows = await app[db_key].fetch(f"SELECT COUNT(*) FROM {table} WHERE {column} = ?", (task_id,))
    return rows[0][0]


async def backdate(app: web.Application, task_id: str, age: timedelta) -> None:
    """Pretend a finished task finished `age` ago."""
    when = (datetime.now(UTC) - age).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    db = app[db_key]
    await db.execute("UPDATE tasks SET finished_at = ? WHERE id = ?", (when, task_id))


async def finish(client: TestClient, token: str, task_id: str, how: str = "complete") -> int:
    body = {"error": "boom"} if how == "fail" else {}
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/{how}", json=body, headers=auth_headers(token)
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["seq"]


async def event_seqs_over_http(client: TestClient, token: str, task_id: str) -> list[int]:
    resp = await client.get(
        f"/api/v1/tasks/{task_id}/events?after_seq=0", headers=auth_headers(token)
    )
    assert resp.status == 200, await resp.text()
    return [e["seq"] for e in (await resp.json())["events"]]


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing is queued for `ws`: a ping sent now is answered by the very next message."""
    await ws.send_json({"action": "ping", "id": "quiet?"})
    assert await receive_json(ws) == {"type": "pong", "id": "quiet?"}


# -- rule 2: history of finished tasks -------------------------------------------------


async def test_finished_tasks_keep_only_their_last_event_after_event_retention(client):
    """Past event_retention a finished task keeps its terminal event; others are untouched."""
    token = await register(client, "alice")
    running = await new_task(client, token, 3)
    pending = await new_task(client, token)
    done = await new_task(client, token, 3)
    failed = await new_task(client, token, 2)
    cancelled = await new_task(client, token, 1)
    ends = {
        done: await finish(client, token, done),
        failed: await finish(client, token, failed, "fail"),
        cancelled: await finish(client, token, cancelled, "cancel"),
    }
    clock = FakeClock()
    retention = make_retention(client.app, clock, event_retention=7 * 86400)

    clock.advance(7 * DAY - timedelta(minutes=1))
    assert (await retention.run_once()).events_deleted == 0

    clock.advance(timedelta(minutes=2))
    report = await retention.run_once()
    assert report.events_deleted == (ends[done] - 1) + (ends[failed] - 1) + (ends[cancelled] - 1)
    for task_id, last in ends.items():
        assert await stored_seqs(client.app, task_id) == [last]
        resp = await client.get(f"/api/v1/tasks/{task_id}", headers=auth_headers(token))
        assert resp.status == 200 and (await resp.json())["seq"] == last
    resp = await client.get(f"/api/v1/tasks/{done}/events", headers=auth_headers(token))
    assert [(e["seq"], e["event"]) for e in (await resp.json())["events"]] == [
        (ends[done], "completed")
    ]
    assert await stored_seqs(client.app, running) == [1, 2, 3, 4, 5]
    assert await stored_seqs(client.app, pending) == [1]
    assert (await retention.run_once()).events_deleted == 0  # nothing left to do


async def test_running_tasks_keep_all_events_whatever_their_age(client):
    """Age rules apply to finished tasks only: ten years later running tasks are whole."""
    token = await register(client, "alice")
    running = await new_task(client, token, 5)
    pending = await new_task(client, token)
    clock = FakeClock()
    retention = make_retention(client.app, clock, event_retention=1, task_retention=1)
    clock.advance(3650 * DAY)
    report = await retention.run_once()
    assert (report.events_deleted, report.tasks_deleted) == (0, 0)
    assert await stored_seqs(client.app, running) == list(range(1, 8))
    assert await stored_seqs(client.app, pending) == [1]
    for task_id in (running, pending):
        resp = await client.get(f"/api/v1/tasks/{task_id}", headers=auth_headers(token))
        assert resp.status == 200


async def test_task_finished_after_a_run_is_trimmed_by_a_later_run(client, monkeypatch):
    """Later runs read only the tasks that aged since the last run, and miss none of them."""
    token = await register(client, "alice")
    clock = FakeClock()
    retention = make_retention(client.app, clock, event_retention=7 * 86400)
    store = client.app[store_key]
    real = store.finished_task_spans
    windows: list[Any] = []

    async def spy(finished_before: str, after: Any, *args: Any, **kwargs: Any) -> Any:
        windows.append(after)
        return await real(finished_before, after, *args, **kwargs)

    monkeypatch.setattr(store, "finished_task_spans", spy)
    first = await new_task(client, token, 2)
    await finish(client, token, first)
    first_done = datetime.now(UTC)
    clock.now = first_done + 7 * DAY + timedelta(seconds=1)
    assert (await retention.run_once()).events_deleted == 4  # created, started, 2 progress
    assert windows == [None]  # the first run looks at every old task

    second = await new_task(client, token, 2)
    last = await finish(client, token, second)
    clock.now = datetime.now(UTC) + 7 * DAY + timedelta(seconds=1)
    assert (await retention.run_once()).events_deleted == 4
    assert await stored_seqs(client.app, second) == [last]
    assert windows[1] is not None  # only the recently aged were read

    clock.advance(2 * timedelta(hours=1))  # now and then every old task again
    await retention.run_once()
    assert windows[-1] is None


# -- rule 3: at most N events per task -------------------------------------------------


async def test_cap_keeps_the_newest_events_gapless_also_while_running(client):
    """max_events_per_task trims the oldest of a running task; the rest stays gapless."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 23)  # seq 25
    small = await new_task(client, token, 8)  # seq 10: exactly the cap
    clock = FakeClock()
    retention = make_retention(client.app, clock, max_events_per_task=10)

    report = await retention.run_once()
    assert report.events_deleted == 15
    assert await stored_seqs(client.app, task_id) == list(range(16, 26))
    assert await event_seqs_over_http(client, token, task_id) == list(range(16, 26))
    assert await stored_seqs(client.app, small) == list(range(1, 11))

    # New events reach the job through the tracker listener; the next run trims again.
    await add_progress(client.app, task_id, 5)
    last = await finish(client, token, task_id)
    assert last == 31
    await retention.run_once()
    assert await stored_seqs(client.app, task_id) == list(range(22, 32))
    resp = await client.get(f"/api/v1/tasks/{task_id}", headers=auth_headers(token))
    assert (await resp.json())["status"] == "completed"


async def test_cap_finds_old_tasks_at_its_first_run(client):
    """A task over the cap before the job existed (e.g. before a restart) is trimmed too."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 48)  # seq 50
    clock = FakeClock()
    retention = Retention(
        client.app[store_key],
        event_retention=0,
        task_retention=0,
        max_events_per_task=20,
        interval=3600,
        clock=clock,
    )  # not a tracker listener: only the first run's scan can find the task
    await retention.run_once()
    assert await stored_seqs(client.app, task_id) == list(range(31, 51))


# -- resuming after a trim ---------------------------------------------------------------


async def test_resubscribe_below_the_cut_gets_a_not_recovered_snapshot(client):
    """last_seq below the oldest kept event: snapshot "recovered": false; at the cut: events."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 23)  # seq 25
    retention = make_retention(client.app, FakeClock(), max_events_per_task=10)
    await retention.run_once()  # keeps 16..25

    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 3, "id": 1})
    reply = await receive_json(ws)
    assert (reply["type"], reply["recovered"], reply["task"]["seq"]) == ("snapshot", False, 25)
    await assert_quiet(ws)

    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 15})
    replayed = [await receive_json(ws) for _ in range(10)]
    assert [(m["type"], m["seq"]) for m in replayed] == [("event", s) for s in range(16, 26)]
    await assert_quiet(ws)

    await add_progress(client.app, task_id, 1)
    live = await receive_json(ws)
    assert (live["type"], live["seq"]) == ("event", 26)
    await ws.close()


async def test_per_task_socket_with_last_seq_below_the_cut(client):
    """The per-task endpoint answers ?last_seq below the cut the same way."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 13)  # seq 15
    await make_retention(client.app, FakeClock(), max_events_per_task=5).run_once()
    ws = await ws_connect(client, token, f"/api/v1/stock/ws/analyze/{task_id}?last_seq=1")
    reply = await receive_json(ws)
    assert (reply["type"], reply.get("recovered"), reply["task"]["seq"]) == ("snapshot", False, 15)
    await assert_quiet(ws)
    await ws.close()


async def test_trim_during_a_replay_gives_a_snapshot_not_a_gap(client, monkeypatch):
    """History trimmed between the check and the read: a snapshot, never a silent gap."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 23)  # seq 25
    await make_retention(client.app, FakeClock(), max_events_per_task=10).run_once()
    store = client.app[store_key]

    async def stale_first_kept(task_id: str) -> int:
        return 1  # what it was a moment before the trim

    monkeypatch.setattr(store, "first_kept_seq", stale_first_kept)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 3})
    reply = await receive_json(ws)
    assert (reply["type"], reply["recovered"], reply["task"]["seq"]) == ("snapshot", False, 25)
    await assert_quiet(ws)
    await add_progress(client.app, task_id, 1)
    assert (await receive_json(ws))["seq"] == 26
    await ws.close()


# -- rule 1: whole tasks -----------------------------------------------------------------


async def test_finished_task_past_task_retention_disappears(client):
    """Task, events and subscription rows go; GET says 404; a subscriber just hears nothing."""
    token = await register(client, "alice")
    old = await new_task(client, token, 4)
    recent = await new_task(client, token, 2)
    running = await new_task(client, token, 2)
    ws = await ws_connect(client, token)
    for task_id in (old, recent, running):
        await ws.send_json({"action": "subscribe", "task_id": task_id})
        assert (await receive_json(ws))["type"] == "snapshot"
    await client.app[history_key].flush()
    for task_id in (old, recent):
        await finish(client, token, task_id)
        assert (await receive_json(ws))["event"] == "completed"
    await client.app[history_key].flush()
    assert await count_rows(client.app, "subscriptions", old) == 1
    await backdate(client.app, old, 31 * DAY)
    await backdate(client.app, recent, 29 * DAY)

    retention = make_retention(client.app, FakeClock(), task_retention=30 * 86400)
    report = await retention.run_once()
    assert (report.tasks_deleted, report.events_deleted, report.subscriptions_deleted) == (1, 7, 1)
    for table in ("tasks", "task_events", "subscriptions"):
        assert await count_rows(client.app, table, old) == 0
    headers = auth_headers(token)
    for path in (f"/api/v1/tasks/{old}", f"/api/v1/tasks/{old}/events"):
        resp = await client.get(path, headers=headers)
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
    resp = await client.post(f"/api/v1/tasks/{old}/progress", json={"progress": 5}, headers=headers)
    assert resp.status == 404  # the tracker does not serve it from memory either
    resp = await client.get("/api/v1/tasks", headers=headers)
    assert {t["id"] for t in (await resp.json())["tasks"]} == {recent, running}
    resp = await client.get("/api/v1/subscriptions", headers=headers)
    assert old not in {s["task_id"] for s in (await resp.json())["subscriptions"]}

    # The socket still subscribed to the deleted task stays open and gets the others' events.
    await assert_quiet(ws)
    await add_progress(client.app, running, 1)
    assert (await receive_json(ws))["task_id"] == running
    await ws.send_json({"action": "subscribe", "task_id": old, "id": 9})
    assert (await receive_json(ws))["code"] == "not_found"
    await ws.close()
    await client.app[history_key].flush()  # closing the deleted task's row is harmless
    assert await count_rows(client.app, "subscriptions", old) == 0


# -- bounded transactions --------------------------------------------------------------


def spy_transactions(monkeypatch: Any, app: web.Application) -> list[int]:
    """Rows deleted by each delete transaction of the store, in order."""
    store = app[store_key]
    sizes: list[int] = []

    def wrap(name: str, rows: Any) -> None:
        real = getattr(store, name)

        async def spy(*args: Any, **kwargs: Any) -> Any:
            result = await real(*args, **kwargs)
            sizes.append(rows(result))
            return result

        monkeypatch.setattr(store, name, spy)

    wrap("delete_event_ranges", lambda n: n)
    wrap("delete_subscriptions_of", lambda n: n)
    wrap("delete_finished_tasks", sum)
    return sizes


async def test_big_purge_runs_in_several_small_transactions(client, monkeypatch):
    """A purge of thousands of rows commits at most batch_rows rows at a time."""
    token = await register(client, "alice")
    big = await new_task(client, token, 400)
    await finish(client, token, big)
    small = [await new_task(client, token, 3) for _ in range(30)]
    for task_id in small:
        await finish(client, token, task_id)
    trimmed = await new_task(client, token, 300)
    await finish(client, token, trimmed)
    await backdate(client.app, trimmed, 10 * DAY)
    for task_id in (big, *small):
        await backdate(client.app, task_id, 40 * DAY)
    sizes = spy_transactions(monkeypatch, client.app)
    retention = make_retention(
        client.app,
        FakeClock(),
        event_retention=7 * 86400,
        task_retention=30 * 86400,
        batch_rows=50,
    )
    report = await retention.run_once()
    assert report.tasks_deleted == 31
    assert report.events_deleted == 403 + 30 * 6 + 302
    assert report.transactions == len(sizes) >= (31 + 403 + 180 + 302) // 50
    assert max(sizes) <= 50 and min(sizes) > 0
    assert await count_rows(client.app, "tasks", big) == 0
    assert await stored_seqs(client.app, trimmed) == [303]


async def test_producers_are_not_blocked_by_a_purge(client, monkeypatch):
    """While a purge runs, a producer's event commits between its transactions."""
    token = await register(client, "alice")
    victim = await new_task(client, token, 600)
    await finish(client, token, victim)
    producer = await new_task(client, token, 1)
    clock = FakeClock()
    retention = make_retention(client.app, clock, event_retention=1, batch_rows=10)
    clock.advance(DAY)
    store = client.app[store_key]
    real = store.delete_event_ranges
    first_commit = asyncio.Event()

    async def spy(ranges: Any) -> int:
        deleted = await real(ranges)
        first_commit.set()
        return deleted

    monkeypatch.setattr(store, "delete_event_ranges", spy)
    purge = asyncio.create_task(retention.run_once())
    await asyncio.wait_for(first_commit.wait(), 5)
    events = await client.app[tracker_key].report_progress(producer, Progress(progress=50))
    assert events[-1].seq == 4
    assert not purge.done()  # the event did not wait for the whole purge
    report = await purge
    assert report.events_deleted == 602 and report.transactions == 61


# -- the loop ------------------------------------------------------------------------------


async def test_job_survives_an_error_and_keeps_running(client, monkeypatch, caplog):
    """A failing run is logged; the loop goes on and the next run does the work."""
    caplog.set_level(logging.INFO, logger="server")
    token = await register(client, "alice")
    task_id = await new_task(client, token, 3)
    last = await finish(client, token, task_id)
    clock = FakeClock()
    clock.advance(8 * DAY)
    retention = make_retention(client.app, clock, event_retention=7 * 86400, interval=10 * MS)
    store = client.app[store_key]
    real = store.finished_task_spans
    calls = 0

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "finished_task_spans", flaky)
    retention.start()
    try:

        async def trimmed() -> bool:
            return retention.runs >= 1 and await stored_seqs(client.app, task_id) == [last]

        await eventually(trimmed)
        assert retention.failures == 1 and retention.runs >= 1
    finally:
        await retention.stop()
    failed = [r for r in caplog.records if r.getMessage() == "retention.failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None


async def test_stop_mid_purge_ends_between_transactions(client, monkeypatch):
    """stop() during a long purge returns after the current transaction; writes go on."""
    token = await register(client, "alice")
    victim = await new_task(client, token, 600)
    last = await finish(client, token, victim)
    other = await new_task(client, token, 1)
    clock = FakeClock()
    clock.advance(DAY)
    retention = make_retention(
        client.app, clock, event_retention=1, batch_rows=10, interval=10 * MS
    )
    store = client.app[store_key]
    real = store.delete_event_ranges
    first_commit = asyncio.Event()

    async def spy(ranges: Any) -> int:
        deleted = await real(ranges)
        first_commit.set()
        return deleted

    monkeypatch.setattr(store, "delete_event_ranges", spy)
    retention.start()
    await asyncio.wait_for(first_commit.wait(), 5)
    await retention.stop()
    assert retention.failures == 0
    assert 1 < len(await stored_seqs(client.app, victim)) < last  # stopped part-way
    events = await client.app[tracker_key].report_progress(other, Progress(progress=9))
    assert events[-1].seq == 4  # the writer is free: no transaction was left open
    await make_retention(client.app, clock, event_retention=1).run_once()
    assert await stored_seqs(client.app, victim) == [last]


async def test_app_starts_and_stops_the_job(aiohttp_client, make_app):
    """The app's own job runs every --retention-interval and stops with the app."""
    app = make_app(retention_interval=10 * MS, max_events_per_task=5)
    client = await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})
    token = await register(client, "alice")
    task_id = await new_task(client, token, 8)

    async def capped() -> bool:
        return await stored_seqs(client.app, task_id) == list(range(6, 11))

    await eventually(capped)


# -- compactness -------------------------------------------------------------------------


async def test_database_file_shrinks_after_a_purge(client):
    """Incremental vacuum and a WAL checkpoint give the purged space back to the disk."""
    token = await register(client, "alice")
    task_id = await new_task(client, token, 1500, message="x" * 2000)
    await finish(client, token, task_id)
    db = client.app[db_key]
    assert await db.auto_vacuum_mode() == 2
    path = os.fspath(client.app[config_key].db_path)
    clock = FakeClock()
    retention = make_retention(client.app, clock, task_retention=30 * 86400)
    report = await retention.run_once()  # nothing to delete; checkpoints
    assert report.rows_deleted == 0
    before = os.path.getsize(path)
    assert before > 3_000_000
    assert os.path.getsize(path + "-wal") == 0

    clock.advance(31 * DAY)
    report = await retention.run_once()
    assert report.tasks_deleted == 1 and report.pages_freed > 0
    after = os.path.getsize(path)
    assert after < before / 10
    assert os.path.getsize(path + "-wal") == 0
    assert await db.free_pages() == 0


async def test_deleting_history_gives_the_users_storage_quota_back(client):
    """users.stored_bytes grows with what a user stores and shrinks as retention deletes it
    (the quota counts what is on disk, not what was ever written)."""
    token = await register(client, "alice")
    db = client.app[db_key]

    async def stored() -> int:
        return (await db.fetch("SELECT stored_bytes FROM users WHERE username = 'alice'"))[0][0]

    assert await stored() == 0
    task_id = await new_task(client, token, 50, message="x" * 1000)
    await finish(client, token, task_id)
    full = await stored()
    assert full > 50 * 1000
    clock = FakeClock()
    clock.advance(2 * DAY)
    trimmed = await make_retention(client.app, clock, event_retention=86400).run_once()
    assert trimmed.events_deleted == 52
    assert 0 < await stored() < full - 50 * 1000
    clock.advance(40 * DAY)
    await make_retention(client.app, clock, task_retention=30 * 86400).run_once()
    assert await stored() == 0
