"""Chaos: producers post concurrently to several tasks while the real server is SIGKILLed
and restarted at random moments; subscribers reconnect with last_seq after every restart.

Afterwards every acknowledged event is stored exactly once, at the seq it was acknowledged
with, each task's seqs are 1..N with no gap, and every subscriber has received exactly
1..N, each once and in order, with the stored contents.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .helpers import PASSWORD, SECRET
from .server_process import ServerProcess, api

TASKS = 3
PRODUCERS_PER_TASK = 3
KILLS = 4
#: Seconds the server runs between two kills (drawn uniformly).
UPTIME = (0.4, 1.2)
#: Bound on the whole storm plus catching up, in seconds.
DEADLINE = 40.0
#: Seconds a producer's request may take before it counts as lost.
REQUEST_TIMEOUT = 5.0
#: Pause after a connection error, in seconds (the server is restarting).
RETRY_PAUSE = 0.05


@pytest.fixture
def server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[ServerProcess]:
    # No limits in the way: this test is about durability, not throttling.
    proc = ServerProcess(
        tmp_path,
        unused_tcp_port_factory(),
        tmp_path / "chaos.db",
        [
            "--jwt-secret",
            SECRET,
            "--task-rate",
            "0",
            "--ws-rate",
            "0",
            "--max-events-per-task",
            "0",
            "--max-connections-per-user",
            "0",
        ],
    )
    yield proc
    proc.close()


@dataclass
class Subscriber:
    """One watcher of one task; `seen` holds (seq, message) in the order received."""

    task_id: str
    endpoint: str  # "multi": /api/v1/ws + subscribe; "task": the per-task endpoint
    seen: list[tuple[int, str | None]] = field(default_factory=list)
    connects: int = 0
    finished: bool = False

    @property
    def last_seq(self) -> int:
        return self.seen[-1][0] if self.seen else 0


async def watch(server: ServerProcess, token: str, sub: Subscriber) -> None:
    """Follow the task across restarts until its `completed` event, resuming with last_seq."""
    headers = {"Authorization": f"Bearer {token}"}
    while True:
        last = sub.last_seq
        if sub.endpoint == "multi":
            url = f"{server.ws_url}/api/v1/ws"
        else:
            url = f"{server.ws_url}/api/v1/stock/ws/analyze/{sub.task_id}?last_seq={last}"
        try:
            async with connect(url, additional_headers=headers, proxy=None, open_timeout=2) as ws:
                sub.connects += 1
                if sub.endpoint == "multi":
                    request = {"action": "subscribe", "task_id": sub.task_id, "last_seq": last}
                    await ws.send(json.dumps(request))
                async for raw in ws:
                    message = json.loads(raw)
                    if message["type"] == "notice":
                        continue
                    # A snapshot would mean the history after last_seq is gone.
                    assert message["type"] == "event", message
                    assert message["task_id"] == sub.task_id, message
                    assert message["seq"] == sub.last_seq + 1, (sub.last_seq, message["seq"])
                    sub.seen.append((message["seq"], message.get("message")))
                    if message["event"] == "completed":
                        sub.finished = True
                        return
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            await asyncio.sleep(RETRY_PAUSE)  # killed or restarting: resume from last_seq


async def produce(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    token: str,
    task_id: str,
    name: str,
    acked: dict[str, list[tuple[int, str]]],
    stop: asyncio.Event,
) -> int:
    """Post progress until `stop`; record (seq, message) of every 200. Returns the attempts."""
    url = f"{server.base_url}/api/v1/tasks/{task_id}/progress"
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    attempt = 0
    while not stop.is_set():
        attempt += 1
        message = f"{name}-{attempt}"
        body = {"progress": attempt % 101, "message": message}
        try:
            async with http.post(url, json=body, headers=headers, timeout=timeout) as resp:
                if resp.status == 200:
                    acked[task_id].append(((await resp.json())["seq"], message))
                    continue
                # 503 while shutting down is allowed; nothing else is.
                assert resp.status == 503, (resp.status, await resp.text())
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            pass  # the server died under this request: it is not acknowledged
        await asyncio.sleep(RETRY_PAUSE)
    return attempt


async def all_events(
    http: aiohttp.ClientSession, server: ServerProcess, token: str, task_id: str
) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        url = f"{server.base_url}/api/v1/tasks/{task_id}/events?after_seq={len(events)}"
        page = (await api(http, "GET", url, token))["events"]
        if not page:
            return events
        events += page


async def test_sigkill_storm_loses_no_acknowledged_event(server: ServerProcess) -> None:
    """Acked events survive 4 SIGKILLs exactly once, gapless; reconnecting subscribers get all."""
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    await server.start()
    async with aiohttp.ClientSession() as http:
        creds = {"username": "chaos", "password": PASSWORD}
        await api(http, "POST", f"{server.base_url}/api/v1/auth/register", json=creds, expect=201)
        login = await api(http, "POST", f"{server.base_url}/api/v1/auth/login", json=creds)
        token = login["access_token"]
        task_ids = []
        for _ in range(TASKS):
            body = {"kind": "external", "params": {}}
            url = f"{server.base_url}/api/v1/tasks"
            task_ids.append((await api(http, "POST", url, token, json=body, expect=201))["id"])

        acked: dict[str, list[tuple[int, str]]] = {t: [] for t in task_ids}
        subs = [Subscriber(t, endpoint) for t in task_ids for endpoint in ("multi", "task")]
        watchers = [asyncio.create_task(watch(server, token, sub)) for sub in subs]
        stop = asyncio.Event()
        producers = [
            asyncio.create_task(produce(http, server, token, t, f"t{i}w{w}", acked, stop))
            for i, t in enumerate(task_ids)
            for w in range(PRODUCERS_PER_TASK)
        ]
        try:
            async with asyncio.timeout(DEADLINE):
                for _ in range(KILLS):
                    await asyncio.sleep(rng.uniform(*UPTIME))
                    server.kill()  # mid-stream: producers and subscribers are busy
                    await server.wait()
                    await server.start()
                await asyncio.sleep(rng.uniform(*UPTIME))
                stop.set()
                attempts = await asyncio.gather(*producers)
                # The end: one more event per task, which the subscribers wait for.
                for task_id in task_ids:
                    url = f"{server.base_url}/api/v1/tasks/{task_id}/complete"
                    await api(http, "POST", url, token, json={})
                await asyncio.gather(*watchers)
        finally:
            for task in producers + watchers:
                task.cancel()
        context = f"seed={seed} attempts={sum(attempts)}"

        for task_id in task_ids:
            events = await all_events(http, server, token, task_id)
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(1, len(events) + 1)), context
            assert [e["event"] for e in events[:2]] == ["created", "started"], context
            assert events[-1]["event"] == "completed", context
            stored = {e["seq"]: e.get("message") for e in events}
            # Every acknowledged event is stored at its seq; a message is never stored twice.
            mine = acked[task_id]
            assert len({seq for seq, _ in mine}) == len(mine), context
            for seq, message in mine:
                assert stored.get(seq) == message, (seq, message, stored.get(seq), context)
            progress_messages = [e["message"] for e in events if e["event"] == "progress"]
            assert len(progress_messages) == len(set(progress_messages)), context
            assert len(progress_messages) >= len(mine), context
            for sub in subs:
                if sub.task_id == task_id:
                    assert sub.finished, context
                    assert sub.seen == [(e["seq"], e.get("message")) for e in events], context
        # The storm was real: every subscriber had to resume with last_seq at least once.
        assert all(sub.connects >= 2 for sub in subs), [s.connects for s in subs]
        assert all(len(mine) > 20 for mine in acked.values()), context
        assert len(server.logs) == KILLS + 1
        assert "Traceback" not in server.all_output()
