"""The job runner: running limits, the order of waiting jobs, cancelling one that waits,
and a step whose write fails for a passing reason is retried, not failed."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient

from server.store.sqlite_writes import TaskWriter
from server.web.keys import jobs_key, tracker_key

from .helpers import auth_headers, eventually, register

API = "/api/v1"


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def analyse(client: TestClient, token: str, code: str = "AAPL") -> str:
    resp = await client.post(
        f"{API}/stock/analyze", json={"code": code}, headers=auth_headers(token)
    )
    assert resp.status == 201, await resp.text()
    return (await resp.json())["id"]


async def task(client: TestClient, token: str, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"{API}/tasks/{task_id}", headers=auth_headers(token))
    return await resp.json()


async def test_jobs_beyond_the_limit_wait_pending_and_start_in_order(aiohttp_client, make_app):
    """With --max-running-jobs 2, the third and later jobs wait as pending, then run in the
    order they were created as slots free; all complete."""
    client = await serve(aiohttp_client, make_app(job_step_delay=0.05, max_running_jobs=2))
    token = await register(client, "alice")
    jobs = client.app[jobs_key]
    ids = [await analyse(client, token) for _ in range(5)]
    assert jobs.running_count == 2 and jobs.waiting_count == 3
    assert [(await task(client, token, i))["status"] for i in ids[2:]] == ["pending"] * 3
    started: list[str] = []
    while len(started) < 5:
        peak = jobs.running_count
        assert peak <= 2
        for task_id in ids:
            if task_id not in started and (await task(client, token, task_id))["started_at"]:
                started.append(task_id)
        await asyncio.sleep(0.01)
    assert started == ids
    await jobs.wait_idle()
    assert [(await task(client, token, i))["status"] for i in ids] == ["completed"] * 5


async def test_a_user_at_their_limit_does_not_hold_up_others(aiohttp_client, make_app):
    """--max-running-jobs-per-user 1: alice's second job waits, bob's starts at once."""
    app = make_app(job_step_delay=0.2, max_running_jobs=10, max_running_jobs_per_user=1)
    client = await serve(aiohttp_client, app)
    alice, bob = await register(client, "alice"), await register(client, "bob")
    first = await analyse(client, alice)
    second = await analyse(client, alice)
    other = await analyse(client, bob)
    jobs = client.app[jobs_key]
    assert jobs.running_count == 2 and jobs.waiting_count == 1
    assert (await task(client, alice, second))["status"] == "pending"
    await eventually(lambda: _started(client, bob, other))
    await jobs.wait_idle()
    for token, task_id in ((alice, first), (alice, second), (bob, other)):
        assert (await task(client, token, task_id))["status"] == "completed"


async def _started(client: TestClient, token: str, task_id: str) -> bool:
    return (await task(client, token, task_id))["started_at"] is not None


async def test_cancelling_a_waiting_job_means_it_never_runs(aiohttp_client, make_app):
    """A job cancelled while it waits for a slot is dropped from the queue."""
    client = await serve(aiohttp_client, make_app(job_step_delay=0.05, max_running_jobs=1))
    token = await register(client, "alice")
    running = await analyse(client, token)
    waiting = await analyse(client, token)
    resp = await client.post(f"{API}/tasks/{waiting}/cancel", headers=auth_headers(token))
    assert resp.status == 200
    jobs = client.app[jobs_key]
    assert jobs.waiting_count == 0
    await jobs.wait_idle()
    assert (await task(client, token, running))["status"] == "completed"
    cancelled = await task(client, token, waiting)
    assert (cancelled["status"], cancelled["started_at"], cancelled["seq"]) == (
        "cancelled",
        None,
        2,
    )


async def test_a_passing_write_failure_is_retried_not_fatal(aiohttp_client, make_app, monkeypatch):
    """A step whose commit fails with "database is locked" is written again after a short
    wait; the job completes with every step once."""
    client = await serve(aiohttp_client, make_app(job_step_delay=0.0))
    token = await register(client, "alice")
    real = TaskWriter._write
    failures = {"left": 2}

    def flaky(conn, writes, bytes_delta):
        writes = list(writes)
        if failures["left"] and any(w.state.kind == "stock_analysis" for w in writes):
            if any(e.step == "rsi" for w in writes for e in w.events):
                failures["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
        real(conn, writes, bytes_delta)

    monkeypatch.setattr(TaskWriter, "_write", staticmethod(flaky))
    monkeypatch.setattr("server.jobs.RETRY_FIRST", 0.01)
    task_id = await analyse(client, token)
    await client.app[jobs_key].wait_idle()
    assert failures["left"] == 0
    done = await task(client, token, task_id)
    assert done["status"] == "completed"
    resp = await client.get(f"{API}/tasks/{task_id}/events", headers=auth_headers(token))
    steps = [e["step"] for e in (await resp.json())["events"] if e["event"] == "progress"]
    assert steps == ["load_prices", "load_prices", "moving_averages", "rsi", "macd", "signal"]


async def test_resumed_jobs_respect_the_running_limits(aiohttp_client, make_app):
    """Unfinished built-in tasks found at start are queued, not all started at once."""
    client = await serve(aiohttp_client, make_app(job_step_delay=0.2, max_running_jobs=2))
    token = await register(client, "alice")
    tracker = client.app[tracker_key]
    for _ in range(5):  # as if left unfinished by an earlier run
        await tracker.create_task(1, "stock_analysis", '{"code":"AAPL"}')
    jobs = client.app[jobs_key]
    jobs.rescan()
    await eventually(lambda: _all_queued(jobs))
    assert jobs.running_count == 2
    await jobs.wait_idle()
    resp = await client.get(f"{API}/tasks?status=completed", headers=auth_headers(token))
    assert len((await resp.json())["tasks"]) == 5


async def _all_queued(jobs: Any) -> bool:
    return jobs.running_count + jobs.waiting_count == 5
