"""The byte budget end to end: limits in wire bytes, bounded pages, replays that cannot
grow without bound, and the largest thing the limits allow is always delivered."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server import budget
from server.lifecycle import Progress
from server.web.keys import hub_key, store_key, tracker_key

from .helpers import auth_headers, create_task, post_progress, receive_json, register, ws_connect

API = "/api/v1"


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def post(client: TestClient, token: str, path: str, body: Any) -> Any:
    return await client.post(f"{API}{path}", json=body, headers=auth_headers(token))


def test_wire_bytes_counts_utf8_and_escapes() -> None:
    """Bytes as written inside a JSON string: emoji are 4, a control character 6."""
    assert budget.wire_bytes("abc") == 3
    assert budget.wire_bytes("\U0001f600") == 4
    assert budget.wire_bytes("\x01") == 6
    assert budget.wire_bytes('"') == 2


def test_compact_checks_depth_before_serialising() -> None:
    """A value nested just under the parser's limit is refused for depth, never serialised."""
    value: Any = 0
    for _ in range(900):
        value = [value]
    with pytest.raises(budget.BudgetError, match="deeper than 32"):
        budget.compact(value, max_bytes=1 << 20, max_depth=32)
    assert (
        budget.compact({"a": [1, {"b": "é"}]}, max_bytes=100, max_depth=3) == '{"a":[1,{"b":"é"}]}'
    )


async def test_message_limit_is_in_bytes(client: TestClient) -> None:
    """65,536 ASCII characters fit a progress message; 16,385 emoji (65,540 bytes) do not."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    assert (await post_progress(client, token, task["id"], 1, message="x" * 65536)) == 3
    resp = await post(client, token, f"/tasks/{task['id']}/progress",
                      {"progress": 2, "message": "\U0001f600" * 16385})  # fmt: skip
    assert resp.status == 422
    assert "message" in (await resp.json())["error"]["fields"]
    resp = await post(client, token, f"/tasks/{task['id']}/progress",
                      {"progress": 2, "step": "\U0001f600" * 51})  # fmt: skip
    assert resp.status == 422  # 204 bytes: over the step's 200
    events = (await (await client.get(f"{API}/tasks/{task['id']}/events",
                                      headers=auth_headers(token))).json())["events"]  # fmt: skip
    assert [e["seq"] for e in events] == [1, 2, 3]


async def test_result_is_bounded_in_bytes_and_depth(client: TestClient) -> None:
    """A result over --max-json-bytes or --max-json-depth is 422 and stores nothing."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    deep: Any = {}
    for _ in range(40):
        deep = {"a": deep}
    for result in ({"blob": "é" * 40000}, deep):
        resp = await post(client, token, f"/tasks/{task['id']}/complete", {"result": result})
        assert resp.status == 422, await resp.text()
        assert "result" in (await resp.json())["error"]["fields"]
    resp = await post(client, token, f"/tasks/{task['id']}/complete", {"result": {"ok": "é"}})
    assert resp.status == 200
    got = await (await client.get(f"{API}/tasks/{task['id']}", headers=auth_headers(token))).json()
    assert got["result"] == {"ok": "é"} and got["seq"] == 3


async def test_wire_json_is_utf8(client: TestClient) -> None:
    """Non-ASCII goes out as UTF-8, not as \\u escapes, on HTTP and WebSocket alike."""
    token = await register(client, "alice")
    task = await create_task(client, token, params={"name": "日本"})
    resp = await client.get(f"{API}/tasks/{task['id']}", headers=auth_headers(token))
    assert "日本".encode() in await resp.read()
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    msg = await ws.receive()
    assert "日本" in msg.data and "\\u" not in msg.data
    await ws.close()


async def test_lists_are_paged_by_bytes_with_a_continuation(aiohttp_client, make_app) -> None:
    """Task and event lists stop at about a page of bytes and say where to go on; following
    the continuation gives every item once."""
    client = await serve(aiohttp_client, make_app())
    token = await register(client, "alice")
    blob = "x" * 60_000
    ids = [(await create_task(client, token, params={"blob": blob}))["id"] for _ in range(40)]
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = "limit=500" + (f"&cursor={cursor}" if cursor else "")
        resp = await client.get(f"{API}/tasks?{query}", headers=auth_headers(token))
        assert resp.status == 200
        body = await resp.json()
        assert len(await resp.read()) < 1.2 * 1024 * 1024
        seen += [t["id"] for t in body["tasks"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages >= 2 and seen == ids[::-1]

    task_id = ids[0]
    tracker = client.app[tracker_key]
    for i in range(40):
        await tracker.report_progress(task_id, Progress(i, message=blob))
    after, got, pages = 0, [], 0
    while True:
        resp = await client.get(
            f"{API}/tasks/{task_id}/events?after_seq={after}&limit=1000",
            headers=auth_headers(token),
        )
        body = await resp.json()
        got += [e["seq"] for e in body["events"]]
        pages += 1
        if body["next_after_seq"] is None:
            break
        after = body["next_after_seq"]
    assert pages >= 2 and got == list(range(1, 42 + 1))


async def test_the_largest_snapshot_the_limits_allow_is_delivered(aiohttp_client, make_app):
    """With the smallest send queue the config accepts, a task carrying params, result and
    message at their limits is still delivered, not dropped as a slow consumer."""
    max_json = 4096
    app = make_app(max_json_bytes=max_json, send_queue_bytes=budget.largest_message_bytes(max_json))
    client = await serve(aiohttp_client, app)
    token = await register(client, "alice")
    # Each value's compact JSON takes exactly max_json bytes of UTF-8.
    params = {"p": "é" * ((max_json - 8) // 2)}
    assert len(budget.compact(params, max_bytes=max_json, max_depth=2).encode()) <= max_json
    task = await create_task(client, token, params=params)
    await post_progress(client, token, task["id"], 5, message="é" * (max_json // 2),
                        step="\U0001f600" * 50)  # fmt: skip
    resp = await post(client, token, f"/tasks/{task['id']}/fail", {"error": "\U0001f600" * 500})
    assert resp.status == 200, await resp.text()
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["task"]["params"] == params
    await ws.close()


async def test_a_failed_subscribe_leaves_no_subscription_behind(client, monkeypatch):
    """Anything failing after the hub subscribed (here the history read) undoes it: no
    buffer keeps collecting the task's events."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    store, hub = client.app[store_key], client.app[hub_key]

    async def broken(task_id: str) -> int:
        raise RuntimeError("disk went away")

    monkeypatch.setattr(store, "first_kept_seq", broken)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 0, "id": 7})
    reply = await receive_json(ws)
    assert (reply["type"], reply["code"]) == ("error", "internal")
    assert hub.subscription_count == 0 and not hub.has_subscribers(task["id"])
    await post_progress(client, token, task["id"], 10)
    await ws.send_json({"action": "ping", "id": "p"})
    assert await receive_json(ws) == {"type": "pong", "id": "p"}  # no event arrived meanwhile
    await ws.close()


async def test_live_events_overrunning_a_replay_end_it_with_a_snapshot(aiohttp_client, make_app):
    """A client that replays a long history slowly while the task moves fast: the held live
    events are bounded; past the bound the replay ends with a `recovered: false` snapshot,
    followed by every later event: still no gap, no duplicate."""
    app = make_app(send_queue_messages=16, send_queue_bytes=64 * 1024, max_json_bytes=1024)
    client = await serve(aiohttp_client, app)
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    tracker = client.app[tracker_key]
    message = "m" * 1000
    for start in range(0, 8000, 500):  # about 8 MB of history: more than the kernel buffers
        await asyncio.gather(
            *(
                tracker.report_progress(task_id, Progress(i % 100, message=message))
                for i in range(start, start + 500)
            )  # fmt: skip
        )
    ws = await ws_connect(client, token, max_msg_size=0)
    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 0})
    first = await receive_json(ws)
    assert first["seq"] == 1
    await asyncio.sleep(0.5)  # not reading: the replay stalls on the full socket
    for start in range(0, 200, 100):  # live events meanwhile: more than 16 held
        await asyncio.gather(
            *(
                tracker.report_progress(task_id, Progress(50, message="live"))
                for _ in range(start, start + 100)
            )  # fmt: skip
        )
    seen = [1]
    while True:  # the replay goes on until it notices the overrun, then a snapshot
        msg = await receive_json(ws, timeout=20)
        if msg["type"] == "snapshot":
            break
        assert msg["seq"] == seen[-1] + 1
        seen.append(msg["seq"])
    assert msg["recovered"] is False and msg["task"]["seq"] >= 8000 + 2
    recovered_at = msg["task"]["seq"]
    # Live again: every later event once, in order.
    for i in range(5):
        await tracker.report_progress(task_id, Progress(60 + i))
    got = [(await receive_json(ws))["seq"] for _ in range(5)]
    assert got == list(range(1 + 1 + 8000 + 200 + 1, 1 + 1 + 8000 + 200 + 6))
    assert recovered_at <= got[0] - 1
    await ws.close()


async def test_a_replay_costs_rate_tokens(aiohttp_client, make_app):
    """Re-subscribing to a long history is charged a message per replay page, so a client
    cannot make the server read it again and again for the price of one message each."""
    client = await serve(aiohttp_client, make_app(ws_rate=0.5, ws_burst=3))
    token = await register(client, "alice")
    task_id = (await create_task(client, token))["id"]
    tracker = client.app[tracker_key]
    for start in range(0, 2000, 500):
        await asyncio.gather(
            *(tracker.report_progress(task_id, Progress(1)) for _ in range(start, start + 500))
        )
    ws = await ws_connect(client, token, max_msg_size=0)
    await ws.send_json({"action": "subscribe", "task_id": task_id, "last_seq": 0})
    for seq in range(1, 2003):
        assert (await receive_json(ws))["seq"] == seq
    await ws.send_json({"action": "ping", "id": 1})
    reply = await receive_json(ws)
    assert (reply["type"], reply.get("code"), reply["id"]) == ("error", "rate_limited", 1)
    await ws.close()


async def test_task_creation_rate_per_user(aiohttp_client, make_app) -> None:
    """--task-create-rate: past the burst a user's creates get 429 with Retry-After;
    another user is not affected."""
    client = await serve(aiohttp_client, make_app(task_create_rate=60))  # burst 6
    alice, bob = await register(client, "alice"), await register(client, "bob")
    statuses = [(await post(client, alice, "/tasks", {"kind": "x"})).status for _ in range(8)]
    assert statuses[:6] == [201] * 6 and statuses[6:] == [429, 429]
    resp = await post(client, alice, "/tasks", {"kind": "x"})
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited" and int(resp.headers["Retry-After"]) >= 1
    assert (await post(client, bob, "/tasks", {"kind": "x"})).status == 201
    listed = await (await client.get(f"{API}/tasks", headers=auth_headers(alice))).json()
    assert len(listed["tasks"]) == 6


async def test_quota_answers_over_http(aiohttp_client, make_app) -> None:
    """The unfinished-task quota is a 429 quota_exceeded naming the quota."""
    client = await serve(aiohttp_client, make_app(max_unfinished_tasks_per_user=2))
    token = await register(client, "alice")
    for _ in range(2):
        await create_task(client, token)
    resp = await post(client, token, "/tasks", {"kind": "x"})
    assert resp.status == 429
    error = (await resp.json())["error"]
    assert error["code"] == "quota_exceeded" and error["fields"] == {"quota": "unfinished_tasks"}
    assert resp.headers["Retry-After"] == "60"
    assert json.loads(await resp.text())  # the usual JSON error shape
    metrics = await (await client.get("/metrics")).text()
    assert 'progress_refused_total{reason="quota_unfinished_tasks"} 1.0' in metrics
