"""The Python SDK (`progress_client`) against real `run.py` servers: a worker through
restarts and lost answers, watch across restarts and token expiry, coalescing, typed
errors, and retries that honour Retry-After on the server's real 429 and 503."""

from __future__ import annotations

import ast
import asyncio
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from progress_client import (
    ApiError,
    AsyncClient,
    Client,
    Event,
    RetryNotice,
)

from .helpers import PASSWORD
from .http_relay import LossyRelay
from .sdk_support import FAST_BACKOFF, FAST_WATCH, WAIT, login, make_server, register, until
from .server_process import PROJECT_ROOT, ServerProcess

__all__ = ["make_server"]  # the fixture, imported for pytest

MakeServer = Callable[..., ServerProcess]
USER = {"username": "alice", "password": PASSWORD}


def _every_third_task_post() -> Callable[[str, str], bool]:
    """Drops the answers of task posts number 1, 4, 7, ... (the create among them)."""
    count = 0

    def drop(method: str, path: str) -> bool:
        nonlocal count
        if method != "POST" or not path.startswith("/api/v1/tasks"):
            return False
        count += 1
        return count % 3 == 1

    return drop


async def test_worker_reports_through_restarts_and_lost_answers(make_server: MakeServer) -> None:
    """Posts retried after SIGKILLs and lost answers are stored once each, in order."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    drop = _every_third_task_post()
    relay = LossyRelay(server.port, lambda method, path, n: drop(method, path))
    await relay.start()
    total = 30
    reached = 0

    def work() -> tuple[str, list[int]]:
        nonlocal reached
        with Client(relay.url, **USER, backoff=FAST_BACKOFF, retry_deadline=WAIT) as client:
            task = client.create_task("import", {"file": "a.csv"})
            seqs = []
            for i in range(1, total + 1):
                seqs.append(client.post_progress(task.id, i, step="rows", message=f"row {i}"))
                reached = i
            seqs.append(task.complete({"rows": total}))
            return task.id, seqs

    worker = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        for at in (total // 3, 2 * total // 3):
            await until(lambda: reached >= at or worker.done())
            await server.restart()  # SIGKILL, then the same port and database again
        task_id, seqs = await asyncio.wait_for(worker, WAIT)
    finally:
        await relay.close()

    async with AsyncClient(server.base_url, **USER) as client:
        tasks = await client.list_tasks()
        events = await client.list_events(task_id)
        parent = await client.create_task("batch")
        child = await client.create_task("part", parent_id=parent.id)
        roots = await client.list_tasks(root=True)
        everything = await client.list_tasks()
    assert [t.id for t in tasks] == [task_id]  # the create whose answer was lost: once
    assert [t.id for t in roots] == [parent.id, task_id]
    assert [t.id for t in everything] == [child.id, parent.id, task_id]
    assert [e.event for e in events] == ["created", "started"] + ["progress"] * total + [
        "completed"
    ]
    progress = [e for e in events if e.event == "progress"]
    assert [e.progress for e in progress] == list(range(1, total + 1))
    assert [e.message for e in progress] == [f"row {i}" for i in range(1, total + 1)]
    # Every answer the worker got, replayed or not, is the seq the event is stored at.
    assert seqs == [e.seq for e in progress] + [events[-1].seq]
    assert ("POST", "/api/v1/tasks") in relay.dropped and len(relay.dropped) >= total // 3


async def test_watch_resumes_across_restarts(make_server: MakeServer) -> None:
    """watch() yields each seq once, in order, across a SIGKILL and a graceful restart."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    seen: list[Event] = []
    async with AsyncClient(
        server.base_url, **USER, backoff=FAST_BACKOFF, watch=FAST_WATCH
    ) as client:
        task = await client.create_task("render")

        async def follow() -> None:
            async for event in client.watch(task.id, last_seq=0):
                seen.append(event)

        watcher = asyncio.ensure_future(follow())
        last = 1
        for restart in ("kill", "term", None):
            for _ in range(5):
                last = await client.post_progress(task.id, last * 2 % 100)
            await until(lambda: bool(seen) and seen[-1].seq == last)
            if restart == "kill":
                await server.restart()
            elif restart == "term":
                assert await server.stop(signal.SIGTERM) == 0  # notice, then close 1001
                await server.start()
        last = await client.complete(task.id, {"frames": 15})
        await asyncio.wait_for(watcher, WAIT)
    assert [e.seq for e in seen] == list(range(1, last + 1))
    assert seen[-1].event == "completed" and seen[-1].result == {"frames": 15}
    # It really resumed on each of the three processes.
    assert all("ws.connect" in server.output(i) for i in range(3))


async def test_watch_takes_a_new_token_on_4401(make_server: MakeServer) -> None:
    """A token that expires under an open watch is replaced through the token callback."""
    server = make_server("--token-ttl", "2")
    await server.start()
    await register(server.base_url)
    tokens: list[str] = []

    async def fresh_token() -> str:
        tokens.append(await login(server.base_url))
        return tokens[-1]

    seen: list[Event] = []
    async with (
        AsyncClient(server.base_url, token=fresh_token, watch=FAST_WATCH) as watcher_client,
        AsyncClient(server.base_url, **USER, backoff=FAST_BACKOFF) as worker,
    ):
        task = await worker.create_task("render")

        async def follow() -> None:
            async for event in watcher_client.watch(task.id):
                seen.append(event)

        watching = asyncio.ensure_future(follow())
        await until(lambda: len(tokens) >= 2)  # the first token expired: 4401, then a new one
        # The worker's token expired too: its next post logs in again after a 401.
        await worker.post_progress(task.id, 50, step="encode")
        await worker.complete(task.id)
        await asyncio.wait_for(watching, WAIT)
    assert [e.event for e in seen] == ["snapshot", "started", "progress", "completed"]
    assert [e.seq for e in seen] == [1, 2, 3, 4]
    assert "code=4401" in server.output()


async def test_report_coalesces_a_tight_loop(make_server: MakeServer) -> None:
    """1,000 report() calls become a few posts within 4 per second; the last value lands."""
    server = make_server()
    await server.start()
    await register(server.base_url)

    async with AsyncClient(server.base_url, **USER) as client:
        task = await client.create_task("import")
        started = time.monotonic()
        for i in range(1, 1001):
            await task.report(i / 10, step="rows", message=f"row {i}")
        await task.flush()
        elapsed = time.monotonic() - started
        events = await client.list_events(task.id)
    _check_coalesced(events, elapsed)

    def sync_worker() -> tuple[list[Event], float]:
        with Client(server.base_url, **USER) as client:
            task = client.create_task("import")
            started = time.monotonic()
            for i in range(1, 1001):
                task.report(i / 10, step="rows", message=f"row {i}")
            task.flush()
            return client.list_events(task.id), time.monotonic() - started

    _check_coalesced(*await asyncio.to_thread(sync_worker))


def _check_coalesced(events: list[Event], elapsed: float) -> None:
    progress = [e for e in events if e.event == "progress"]
    # One post at once, then one per 1/4 s at most, and one more by flush().
    assert 1 <= len(progress) <= 2 + math.floor(elapsed * 4)
    assert (progress[-1].progress, progress[-1].message) == (100, "row 1000")
    assert all(e.step == "rows" for e in progress)


async def test_report_keeps_the_last_update_of_each_step(make_server: MakeServer) -> None:
    """Between two posts report() keeps each step's last update and sends them in one batch."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    # One post per 100 s: nothing but flush() (and complete) can post before the rate allows.
    async with AsyncClient(server.base_url, **USER, report_rate=0.01) as client:
        task = await client.create_task("import")
        await task.report(10, step="load")
        await task.flush()
        await task.report(20, step="parse", message="a")
        await task.report(30, message="b")  # no step: still "parse"
        await task.report(40, step="write")
        await task.complete()
        events = await client.list_events(task.id)
    progress = [(e.progress, e.step, e.message) for e in events if e.event == "progress"]
    assert progress == [(10, "load", None), (30, "parse", "b"), (40, "write", None)]
    assert events[-1].event == "completed"


async def test_typed_errors_and_the_task_block(make_server: MakeServer) -> None:
    """4xx answers raise ApiError with code, status and fields; task() fails on errors."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    async with AsyncClient(server.base_url, **USER) as client:
        with pytest.raises(ApiError) as bad_kind:
            await client.create_task("not a kind!")
        assert (bad_kind.value.status, bad_kind.value.code) == (422, "validation_error")
        assert "kind" in bad_kind.value.fields

        with pytest.raises(ApiError) as missing:
            await client.get_task("0" * 32)
        assert (missing.value.status, missing.value.code) == (404, "not_found")

        with pytest.raises(ApiError) as unknown_watch:
            async for _ in client.watch("0" * 32):
                pass
        assert unknown_watch.value.code == "not_found"

        task = await client.create_task("import")
        with pytest.raises(ApiError) as long_step:
            await client.post_progress(task.id, 5, step="s" * 201)
        assert long_step.value.status == 422 and "step" in long_step.value.fields

        with pytest.raises(ValueError):
            await client.post_progress(task.id, 101)

        await task.complete({"rows": 1})
        await client.report(task.id, 50)  # refused in the background: 409
        with pytest.raises(ApiError) as finished:
            await client.flush(task.id)
        assert (finished.value.status, finished.value.code) == (409, "task_finished")

        with pytest.raises(RuntimeError, match="disk full"):
            async with client.task("export") as failing:
                await failing.report(10, step="write")
                raise RuntimeError("disk full")
        async with client.task("export", {"n": 3}) as ok:
            async for _ in ok.track(range(3), step="rows"):
                pass
            ok.result = {"written": 3}

        failed = await client.get_task(failing.id)
        done = await client.get_task(ok.id)
        ok_events = await client.list_events(ok.id)
    assert (failed.status, failed.error, failed.step) == (
        "failed",
        "RuntimeError: disk full",
        "write",
    )
    assert (done.status, done.result) == ("completed", {"written": 3})
    tracked = [(e.progress, e.message) for e in ok_events if e.event == "progress"]
    assert tracked[-1] == (100, "3 of 3")


async def test_api_keys_act_within_their_scopes(make_server: MakeServer) -> None:
    """Keys act within their scopes and stop when revoked; share tokens read one task."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    async with AsyncClient(server.base_url, **USER) as owner:
        writer_key = await owner.create_api_key("workers", ["tasks:write"])
        reader_key = await owner.create_api_key("dashboards", ["tasks:read"])
        assert writer_key.key and writer_key.key.startswith("pk_")
        listed = await owner.list_api_keys()
        assert [(k.id, k.name, k.scopes, k.key) for k in listed] == [
            (writer_key.id, "workers", ["tasks:write"], None),
            (reader_key.id, "dashboards", ["tasks:read"], None),
        ]

    def work() -> str:
        with Client(server.base_url, api_key=writer_key.key) as client:
            with client.task("import") as task:
                for _ in task.track(range(10), step="rows"):
                    pass
            return task.id

    task_id = await asyncio.to_thread(work)
    async with AsyncClient(server.base_url, api_key=writer_key.key) as writer:
        with pytest.raises(ApiError) as no_read:
            async for _ in writer.watch(task_id):
                pass
        assert (no_read.value.status, no_read.value.code) == (403, "insufficient_scope")
        with pytest.raises(ApiError) as no_keys:
            await writer.list_api_keys()
        assert no_keys.value.code == "insufficient_scope"
    async with AsyncClient(server.base_url, api_key=reader_key.key) as reader:
        seen = [e async for e in reader.watch(task_id)]
        assert [(e.event, e.status, e.progress) for e in seen] == [("snapshot", "completed", 100)]
        async with AsyncClient(server.base_url, **USER) as owner:
            await owner.revoke_api_key(reader_key.id)
        with pytest.raises(ApiError) as revoked:
            await reader.get_task(task_id)
        assert (revoked.value.status, revoked.value.code) == (401, "invalid_token")

    # A share token reads that one task (a watch included) until the owner ends it.
    async with AsyncClient(server.base_url, api_key=writer_key.key) as writer:
        link = await writer.share(task_id, ttl_s=600)
        assert link.token.startswith("st_") and task_id in link.url
        async with AsyncClient(server.base_url, token=link.token) as viewer:
            assert (await viewer.get_task(task_id)).status == "completed"
            assert [e.event async for e in viewer.watch(task_id, last_seq=0)][-1] == "completed"
            with pytest.raises(ApiError) as no_post:
                await viewer.create_task("import")
            assert no_post.value.code == "insufficient_scope"
            await writer.unshare(task_id)
            with pytest.raises(ApiError) as ended:
                await viewer.get_task(task_id)
            assert ended.value.status == 401


async def test_watch_of_a_finished_task_ends(make_server: MakeServer) -> None:
    """A watch of a finished task ends: with its snapshot, or at once from its last seq."""
    server = make_server()
    await server.start()
    await register(server.base_url)
    async with AsyncClient(server.base_url, **USER) as client:
        task = await client.create_task("import")
        seq = await task.cancel()
        snapshot = [e async for e in client.watch(task.id)]
        from_end = [e async for e in client.watch(task.id, last_seq=seq)]
        replay = [e async for e in client.watch(task.id, last_seq=0)]
    assert [(e.event, e.status, e.seq) for e in snapshot] == [("snapshot", "cancelled", seq)]
    assert from_end == []
    assert [e.event for e in replay] == ["created", "cancelled"]


async def test_429_is_retried_after_retry_after(make_server: MakeServer) -> None:
    """A progress post over --task-rate waits the server's Retry-After, then lands."""
    server = make_server("--task-rate", "1", "--task-burst", "1")
    await server.start()
    await register(server.base_url)
    notices: list[RetryNotice] = []
    async with AsyncClient(server.base_url, **USER, on_retry=notices.append) as client:
        task = await client.create_task("import")
        await client.post_progress(task.id, 1)
        started = time.monotonic()
        await client.post_progress(task.id, 2)
        waited = time.monotonic() - started
        events = await client.list_events(task.id)
    assert [n.error.code for n in notices if isinstance(n.error, ApiError)] == ["rate_limited"]
    refusal = notices[0].error
    assert isinstance(refusal, ApiError) and refusal.status == 429 and refusal.retry_after
    assert notices[0].delay >= refusal.retry_after and waited >= refusal.retry_after
    assert [e.progress for e in events if e.event == "progress"] == [1, 2]

    # A wait longer than the deadline is not taken: the 429 is raised at once.
    async with AsyncClient(
        server.base_url, **USER, retry_deadline=0.5, on_retry=notices.append
    ) as client:
        other = await client.create_task("import")  # a bucket of its own
        await client.post_progress(other.id, 3)
        with pytest.raises(ApiError) as refused:
            await client.post_progress(other.id, 4)
    assert refused.value.code == "rate_limited" and len(notices) == 1


async def test_503_is_retried_after_retry_after(make_server: MakeServer) -> None:
    """A login refused with 503 overloaded (hashing thread busy) waits Retry-After, then lands."""
    # One hashing thread and no queue: a login while another hashes gets 503 at once.
    server = make_server(
        "--password-hash-cost", "64", "--password-hash-workers", "1", "--password-hash-queue", "0"
    )
    await server.start()
    await register(server.base_url)
    async with aiohttp.ClientSession() as http:
        for _ in range(3):  # the busy spell can end just before our login: then again
            notices: list[RetryNotice] = []
            busy = asyncio.ensure_future(_keep_hashing_busy(http, server.base_url))

            def refused(notice: RetryNotice) -> None:
                notices.append(notice)
                busy.cancel()  # the thread frees up within one hash: the retry can land

            try:
                await _wait_for_503(http, server.base_url)
                started = time.monotonic()
                async with AsyncClient(server.base_url, **USER, on_retry=refused) as c:
                    me = await c.me()
                waited = time.monotonic() - started
            finally:
                busy.cancel()
            if notices:
                break
    assert me["username"] == "alice"
    refusal = notices[0].error
    assert isinstance(refusal, ApiError) and (refusal.status, refusal.code) == (503, "overloaded")
    assert refusal.retry_after is not None and waited >= refusal.retry_after
    assert notices[0].path == "/auth/login"


async def _keep_hashing_busy(http: aiohttp.ClientSession, base_url: str) -> None:
    """One slow login after another (unknown users: the server still hashes)."""
    n = 0
    while True:
        n += 1
        body = {"username": f"nobody{n}", "password": PASSWORD}
        async with http.post(f"{base_url}/api/v1/auth/login", json=body) as resp:
            await resp.read()


async def _wait_for_503(http: aiohttp.ClientSession, base_url: str) -> None:
    """Until a login is refused with 503: the hashing thread is busy right now."""
    body: dict[str, Any] = {"username": "probe", "password": PASSWORD}
    async with asyncio.timeout(WAIT):
        while True:
            async with http.post(f"{base_url}/api/v1/auth/login", json=body) as resp:
                await resp.read()
                if resp.status == 503:
                    return


def test_the_sdk_needs_only_aiohttp_and_never_the_server() -> None:
    """progress_client imports the standard library, aiohttp and itself: never `server`."""
    found: set[str] = set()
    for path in (PROJECT_ROOT / "progress_client").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    outside = {m for m in found if m not in sys.stdlib_module_names and m != "__future__"}
    assert outside == {"aiohttp"}
