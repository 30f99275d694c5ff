"""Replay on reconnect, the replay/live race, fan-out, slow consumers and the heartbeat."""

from __future__ import annotations

import asyncio
import logging
import random
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.web.keys import db_key, hub_key

from .helpers import (
    MS,
    auth_headers,
    create_task,
    eventually,
    post_progress,
    receive_json,
    register,
    ws_connect,
)

WS = "/api/v1/ws"


def task_ws(task_id: str) -> str:
    return f"/api/v1/stock/ws/analyze/{task_id}"


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def complete(client: TestClient, token: str, task_id: str) -> int:
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/complete", json={"result": {}}, headers=auth_headers(token)
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["seq"]


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing is queued for `ws`: a ping sent now is answered by the very next message."""
    await ws.send_json({"action": "ping", "id": "quiet?"})
    assert await receive_json(ws) == {"type": "pong", "id": "quiet?"}


async def subscribe(
    ws: aiohttp.ClientWebSocketResponse, task_id: str, last_seq: int | None = None
) -> None:
    message: dict[str, Any] = {"action": "subscribe", "task_id": task_id}
    if last_seq is not None:
        message["last_seq"] = last_seq
    await ws.send_json(message)


async def collect(
    ws: aiohttp.ClientWebSocketResponse, tasks: int = 1, timeout: float = 20.0
) -> dict[str, list[dict[str, Any]]]:
    """Every message per task id until `tasks` tasks have sent their terminal event."""
    got: dict[str, list[dict[str, Any]]] = defaultdict(list)
    finished = 0
    async with asyncio.timeout(timeout):
        while finished < tasks:
            message = await receive_json(ws, timeout)
            task_id = message["task"]["id"] if message["type"] == "snapshot" else message["task_id"]
            got[task_id].append(message)
            if message.get("event") in ("completed", "failed", "cancelled"):
                finished += 1
    return dict(got)


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    assert all(m["type"] == "event" for m in messages), messages
    return [m["seq"] for m in messages]


# -- replay after a disconnect ----------------------------------------------------------


async def test_reconnect_with_last_seq_has_no_gap_and_no_duplicate(client):
    """Receive some events, drop the socket, miss some, reconnect with last_seq: all once."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    ws = await ws_connect(client, token)
    await subscribe(ws, task["id"])
    assert (await receive_json(ws))["task"]["seq"] == 1
    for pct in (10, 20, 30):
        await post_progress(client, token, task["id"], pct)
    seen = [(await receive_json(ws))["seq"] for _ in range(4)]
    assert seen == [2, 3, 4, 5]
    await ws.close()

    for pct in (40, 50, 60):
        await post_progress(client, token, task["id"], pct)  # missed: 6, 7, 8
    ws = await ws_connect(client, token)
    await subscribe(ws, task["id"], last_seq=seen[-1])
    replayed = [await receive_json(ws) for _ in range(3)]
    assert [(m["seq"], m["progress"]) for m in replayed] == [(6, 40), (7, 50), (8, 60)]
    final = await complete(client, token, task["id"])
    live = await receive_json(ws)
    assert (live["seq"], live["event"]) == (final, "completed") == (9, "completed")
    await assert_quiet(ws)
    await ws.close()


async def test_reconnect_to_task_endpoint_with_last_seq(client):
    """The per-task endpoint resumes from ?last_seq after a disconnect, also past the end."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    ws = await ws_connect(client, token, task_ws(task["id"]))
    assert (await receive_json(ws))["type"] == "snapshot"
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [2, 3]
    await ws.close()

    await post_progress(client, token, task["id"], 20)
    await complete(client, token, task["id"])  # 4, 5 while away
    ws = await ws_connect(client, token, f"{task_ws(task['id'])}?last_seq=3")
    got = [await receive_json(ws) for _ in range(2)]
    assert [(m["seq"], m["event"]) for m in got] == [(4, "progress"), (5, "completed")]
    assert got[1]["result"] == {}
    await assert_quiet(ws)
    await ws.close()


async def test_long_replay_is_complete_and_ordered(aiohttp_client, make_app):
    """A replay longer than a read page and than the send queue arrives whole, in order."""
    client = await serve(aiohttp_client, make_app(send_queue_messages=50))
    token = await register(client, "alice")
    task = await create_task(client, token)
    for i in range(1, 601):
        await post_progress(client, token, task["id"], i % 101)
    ws = await ws_connect(client, token)
    await subscribe(ws, task["id"], last_seq=0)
    got = [await receive_json(ws) for _ in range(602)]
    assert seqs(got) == list(range(1, 603))
    await post_progress(client, token, task["id"], 100)
    assert (await receive_json(ws))["seq"] == 603
    await ws.close()


async def test_trimmed_history_gives_unrecovered_snapshot(client):
    """When the events after last_seq are no longer kept: snapshot with "recovered": false."""
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    for pct in (10, 20, 30):
        await post_progress(client, token, task_id, pct)  # seqs 2..5
    db = client.app[db_key]
    # Simulate a retention policy that dropped seqs 1..3.
    await db.execute("DELETE FROM task_events WHERE task_id = ? AND seq <= 3", (task_id,))
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 2, "id": "r"})
    snapshot = await receive_json(ws)
    assert (snapshot["type"], snapshot["recovered"], snapshot["id"]) == ("snapshot", False, "r")
    assert (snapshot["task"]["seq"], snapshot["task"]["progress"]) == (5, 30)
    await assert_quiet(ws)
    # From seq 3 on everything is still kept: a normal replay.
    await subscribe(ws, task_id, last_seq=3)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [4, 5]
    await post_progress(client, token, task_id, 40)
    assert (await receive_json(ws))["seq"] == 6
    await assert_quiet(ws)
    await ws.close()


# -- the replay/live race ---------------------------------------------------------------


async def race_round(client: TestClient, token: str, rng: random.Random) -> None:
    """One task, producers posting 200 updates, 8 clients subscribing while it runs."""
    updates, workers = 200, 4
    task = await create_task(client, token)
    task_id = task["id"]
    acked: list[int] = []  # seqs the producers have had acknowledged, in ack order
    reached = {k: asyncio.Event() for k in range(0, updates + 1, 10)}

    async def produce(worker: int) -> None:
        for i in range(updates // workers):
            acked.append(await post_progress(client, token, task_id, i, message=f"w{worker}"))
            for k, flag in reached.items():
                if len(acked) >= k:
                    flag.set()

    async def watch(at: int, mode: str) -> None:
        """Subscribe once `at` updates are acknowledged; check the stream to the end."""
        ws = await ws_connect(client, token) if mode != "endpoint" else None
        await reached[at].wait()
        last_seq = {
            "snapshot": None,
            "zero": 0,
            "known": rng.choice(acked) if acked else 0,
            "endpoint": max(acked, default=0),
        }[mode]
        if ws is None:
            ws = await ws_connect(client, token, f"{task_ws(task_id)}?last_seq={last_seq}")
        else:
            await subscribe(ws, task_id, last_seq)
        got = (await collect(ws))[task_id]
        await ws.close()
        if last_seq is None:
            snapshot, got = got[0], got[1:]
            assert snapshot["type"] == "snapshot"
            last_seq = snapshot["task"]["seq"]
        final = got[-1]["seq"]
        assert (got[-1]["event"], final) == ("completed", updates + 3)
        assert seqs(got) == list(range(last_seq + 1, final + 1)), (mode, at, last_seq)
        assert all(m["task_id"] == task_id for m in got)

    modes = ["snapshot", "zero", "known", "endpoint"]
    watchers = [
        asyncio.create_task(watch(rng.choice(list(reached)[:-1]), modes[i % len(modes)]))
        for i in range(8)
    ]
    await asyncio.gather(*(produce(w) for w in range(workers)))
    final_seq = await complete(client, token, task_id)
    assert final_seq == updates + 3  # created, started, updates, completed
    assert sorted(acked) == list(range(3, updates + 3))  # seq 2 is the `started` event
    await asyncio.gather(*watchers)


async def test_replay_live_race_every_seq_once_in_order(client):
    """Clients subscribing while 200 updates are posted see each later seq once, in order."""
    # Six rounds of 8 clients, each subscribing at a random moment by snapshot, last_seq=0,
    # a seq already acknowledged, or the per-task endpoint's ?last_seq: a hub that does not
    # buffer during the replay, or does not drop buffered seqs it replayed, fails here.
    token = await register(client, "alice")
    for round_ in range(6):
        await race_round(client, token, random.Random(round_))
    assert client.app[hub_key].subscription_count == 0


# -- fan-out ----------------------------------------------------------------------------


async def test_ten_producers_twenty_subscribers_ten_tasks(client):
    """10 producers × 50 updates on 10 tasks, 20 subscribers on all: each sees 2..53 in order."""
    token = await register(client, "alice")
    tasks = [(await create_task(client, token))["id"] for _ in range(10)]
    sockets = [await ws_connect(client, token) for _ in range(20)]
    for ws in sockets:
        for task_id in tasks:
            await subscribe(ws, task_id)
        snapshots = [await receive_json(ws) for _ in tasks]
        assert [s["task"]["id"] for s in snapshots] == tasks
    readers = [asyncio.create_task(collect(ws, tasks=len(tasks))) for ws in sockets]

    async def produce(task_id: str) -> None:
        for i in range(1, 51):
            await post_progress(client, token, task_id, i * 2)
        await complete(client, token, task_id)

    await asyncio.gather(*(produce(t) for t in tasks))
    for got in await asyncio.gather(*readers):
        assert set(got) == set(tasks)
        for messages in got.values():
            assert seqs(messages) == list(range(2, 54))
            assert [m["progress"] for m in messages[1:-1]] == [i * 2 for i in range(1, 51)]
            assert (messages[0]["event"], messages[-1]["event"]) == ("started", "completed")
    for ws in sockets:
        await ws.close()


async def test_ten_producers_one_task_twenty_subscribers(client):
    """10 producers × 50 updates on one task, 20 subscribers: every seq once, in order."""
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    sockets = [await ws_connect(client, token) for _ in range(20)]
    for ws in sockets:
        await subscribe(ws, task_id)
        assert (await receive_json(ws))["type"] == "snapshot"
    readers = [asyncio.create_task(collect(ws)) for ws in sockets]

    async def produce(p: int) -> None:
        for i in range(50):
            await post_progress(client, token, task_id, 50, message=f"{p}:{i}")

    await asyncio.gather(*(produce(p) for p in range(10)))
    final = await complete(client, token, task_id)
    assert final == 503
    for got in await asyncio.gather(*readers):
        messages = got[task_id]
        assert seqs(messages) == list(range(2, 504))
        by_producer: dict[str, list[int]] = defaultdict(list)
        for m in messages[1:-1]:
            p, i = m["message"].split(":")
            by_producer[p].append(int(i))
        assert by_producer == {str(p): list(range(50)) for p in range(10)}
    for ws in sockets:
        await ws.close()


# -- slow consumers ---------------------------------------------------------------------


async def test_stalled_client_is_dropped_4008_and_others_get_everything(
    aiohttp_client, make_app, caplog
):
    """A client that never reads is dropped (4008); a reading one still gets every event."""
    caplog.set_level(logging.INFO, logger="server")
    client = await serve(aiohttp_client, make_app(send_queue_bytes=256 * 1024))
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    hub = client.app[hub_key]
    stalled = await ws_connect(client, token)
    await subscribe(stalled, task_id)  # ...and never calls receive()
    normal = await ws_connect(client, token)
    await subscribe(normal, task_id)
    assert (await receive_json(normal))["type"] == "snapshot"
    reader = asyncio.create_task(collect(normal))
    assert hub.connection_count == 2

    def slow_dropped() -> bool:
        return any("ws.slow_consumer" in r.getMessage() for r in caplog.records)

    big = "\U0001f600" * 2000  # 8000 bytes of UTF-8 per message
    posted = 0
    while not slow_dropped():
        assert posted < 5000, "the stalled client was never dropped"
        await post_progress(client, token, task_id, posted % 100, message=big)
        posted += 1
    for i in range(20):  # the others keep going after the drop
        await post_progress(client, token, task_id, i, message="after")
        posted += 1
    final = await complete(client, token, task_id)

    got = (await reader)[task_id]
    assert seqs(got) == list(range(2, final + 1))
    assert final == posted + 3
    assert sum(m["message"] == big for m in got) == posted - 20

    async def stalled_gone() -> bool:
        return hub.connection_count == 1

    await eventually(stalled_gone)
    disconnects = [r.getMessage() for r in caplog.records if "ws.disconnect" in r.getMessage()]
    assert len(disconnects) == 1 and "code=4008" in disconnects[0]
    await assert_quiet(normal)
    await normal.close()
    await stalled.close()


# -- heartbeat --------------------------------------------------------------------------


@pytest.fixture
async def fast_heartbeat(aiohttp_client: Any, make_app: Any) -> TestClient:
    return await serve(aiohttp_client, make_app(heartbeat_interval=0.2, heartbeat_timeout=0.2))


async def test_silent_peer_is_dropped(fast_heartbeat):
    """A client that never answers pings is pinged, then dropped (well within 3 s)."""
    client = fast_heartbeat
    token = await register(client, "alice")
    ws = await ws_connect(client, token, autoping=False)
    pings = 0
    async with asyncio.timeout(3):
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.PING:
                pings += 1
                continue
            break
    assert pings >= 1
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
    hub = client.app[hub_key]

    async def gone() -> bool:
        return hub.connection_count == 0

    await eventually(gone)
    await ws.close()


async def test_peer_answering_pings_stays_connected(fast_heartbeat):
    """A client that answers protocol pings (autoping) outlives many intervals."""
    client = fast_heartbeat
    token = await register(client, "alice")
    ws = await ws_connect(client, token)  # autoping=True answers in receive()
    answered = 0
    pong = ws.pong

    async def counting_pong(message: bytes = b"") -> None:
        nonlocal answered
        answered += 1
        await pong(message)

    ws.pong = counting_pong  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        # receive()'s own timeout restarts after each ping; bound the whole wait instead.
        async with asyncio.timeout(1200 * MS):  # about 6 intervals: nothing but pings arrives
            await ws.receive()
    assert answered >= 2
    assert client.app[hub_key].connection_count == 1
    await assert_quiet(ws)
    await ws.close()


async def test_app_level_ping_counts_as_liveness(fast_heartbeat):
    """A client that ignores protocol pings but sends {"action": "ping"} stays connected."""
    client = fast_heartbeat
    token = await register(client, "alice")
    ws = await ws_connect(client, token, autoping=False)
    pongs = 0
    for i in range(12):  # about 1.2 s: three times interval + timeout
        await ws.send_json({"action": "ping", "id": i})
        while True:
            msg = await ws.receive(timeout=5)
            if msg.type is WSMsgType.PING:
                continue  # never answered on purpose
            assert msg.type is WSMsgType.TEXT, msg
            assert msg.json() == {"type": "pong", "id": i}
            pongs += 1
            break
        await asyncio.sleep(100 * MS)
    assert pongs == 12
    assert client.app[hub_key].connection_count == 1
    await ws.close()


async def test_shutdown_notice_comes_after_queued_events(client):
    """At shutdown a subscriber gets the events already queued, then the notice, then 1001."""
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    ws = await ws_connect(client, token)
    await subscribe(ws, task_id)
    assert (await receive_json(ws))["type"] == "snapshot"
    for i in range(5):
        await post_progress(client, token, task_id, i)
    closing = asyncio.create_task(client.server.close())
    got = [await receive_json(ws) for _ in range(7)]
    assert seqs(got[:6]) == list(range(2, 8))
    assert (got[6]["type"], got[6]["code"]) == ("notice", "server_shutdown")
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    async with asyncio.timeout(5):
        await closing
