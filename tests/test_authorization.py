"""Authorization sweep: on every HTTP route and WebSocket action that names a task, another
user's task is answered exactly like a task that does not exist, changes nothing, and
task ids are unguessable (uuid4)."""

from __future__ import annotations

import base64
import os
import re
import uuid
from typing import Any

from aiohttp.test_utils import TestClient

from .helpers import (
    auth_headers,
    create_task,
    post_progress,
    receive_json,
    register,
    ws_connect,
)

API = "/api/v1"

#: (method, path under /api/v1 with {task}, JSON body or None): every route about one task.
TASK_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/tasks/{task}", None),
    ("GET", "/tasks/{task}/events", None),
    ("GET", "/tasks/{task}/events?after_seq=1&limit=5", None),
    ("POST", "/tasks/{task}/progress", {"progress": 10, "step": "x"}),
    ("POST", "/tasks/{task}/complete", {"result": {"stolen": True}}),
    ("POST", "/tasks/{task}/complete", None),
    ("POST", "/tasks/{task}/fail", {"error": "sabotage"}),
    ("POST", "/tasks/{task}/cancel", None),
    ("POST", "/tasks/{task}/cancel", {}),
]

#: Client messages about one task (the same id makes the replies comparable).
WS_ACTIONS: list[dict[str, Any]] = [
    {"action": "subscribe", "id": 1},
    {"action": "subscribe", "last_seq": 0, "id": 2},
    {"action": "subscribe", "last_seq": 1, "id": "three"},
    {"action": "get_status", "id": 4},
    {"action": "unsubscribe", "id": 5},
]


def upgrade_headers(token: str | None) -> dict[str, str]:
    """A complete WebSocket upgrade request, so the handshake path itself is exercised."""
    headers = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    }
    if token is not None:
        headers.update(auth_headers(token))
    return headers


async def answer(
    client: TestClient, method: str, path: str, token: str | None, body: Any = None
) -> tuple[int, Any]:
    headers = auth_headers(token) if token else {}
    resp = await client.request(method, f"{API}{path}", json=body, headers=headers)
    return resp.status, await resp.json()


async def task_state(client: TestClient, token: str, task_id: str) -> tuple[Any, Any]:
    status, task = await answer(client, "GET", f"/tasks/{task_id}", token)
    assert status == 200, task
    status, events = await answer(client, "GET", f"/tasks/{task_id}/events", token)
    assert status == 200, events
    return task, events


async def alices_tasks(client: TestClient, alice: str) -> list[str]:
    """One task in each kind of state: pending, running, completed, cancelled, built-in."""
    pending = (await create_task(client, alice))["id"]
    running = (await create_task(client, alice))["id"]
    await post_progress(client, alice, running, 30, step="work")
    completed = (await create_task(client, alice))["id"]
    status, _ = await answer(client, "POST", f"/tasks/{completed}/complete", alice, {})
    assert status == 200
    cancelled = (await create_task(client, alice))["id"]
    status, _ = await answer(client, "POST", f"/tasks/{cancelled}/cancel", alice)
    assert status == 200
    status, builtin = await answer(client, "POST", "/stock/analyze", alice, {"code": "600519"})
    assert status == 201, builtin
    return [pending, running, completed, cancelled, builtin["id"]]


async def test_http_foreign_task_is_indistinguishable_from_a_missing_one(client: TestClient):
    """Every task route: Bob on Alice's task gets the very 404 body of a nonexistent id."""
    alice, bob = await register(client, "alice"), await register(client, "bob")
    targets = await alices_tasks(client, alice)
    before = [await task_state(client, alice, t) for t in targets]
    for task_id in targets:
        for method, template, body in TASK_ROUTES:
            missing = uuid.uuid4().hex
            foreign = await answer(client, method, template.format(task=task_id), bob, body)
            absent = await answer(client, method, template.format(task=missing), bob, body)
            assert foreign == absent, (method, template, foreign, absent)
            assert foreign[0] == 404 and foreign[1]["error"]["code"] == "not_found", foreign
            assert task_id not in str(foreign[1])
            # Without a token, existence does not show either: the same 401.
            anonymous = await answer(client, method, template.format(task=task_id), None, body)
            nobody = await answer(client, method, template.format(task=missing), None, body)
            assert anonymous == nobody and anonymous[0] == 401, (anonymous, nobody)
    # Nothing Bob did changed Alice's tasks (the built-in job may have moved on by itself).
    after = [await task_state(client, alice, t) for t in targets]
    assert after[:4] == before[:4]
    _, events = after[4]
    kinds = {e["event"] for e in events["events"]}
    assert kinds <= {"created", "started", "progress", "completed"}, kinds
    # Alice's own calls reach the same routes (the 404s above are not a routing mistake).
    status, _ = await answer(client, "GET", f"/tasks/{targets[1]}/events", alice)
    assert status == 200


async def test_lists_show_only_the_callers_tasks(client: TestClient):
    """Task lists and subscription history never include another user's tasks."""
    alice, bob = await register(client, "alice"), await register(client, "bob")
    targets = await alices_tasks(client, alice)
    ws = await ws_connect(client, alice)
    await ws.send_json({"action": "subscribe", "task_id": targets[0]})
    assert (await receive_json(ws))["type"] == "snapshot"
    await ws.close()
    for status_filter in ("any", "active", "pending", "running", "completed", "cancelled"):
        status, body = await answer(client, "GET", f"/tasks?status={status_filter}", bob)
        assert (status, body) == (200, {"tasks": [], "next_cursor": None}), status_filter
    status, body = await answer(client, "GET", "/subscriptions", bob)
    assert (status, body) == (200, {"subscriptions": []})


async def test_ws_actions_on_foreign_task_match_missing_task(client: TestClient):
    """Every WebSocket action: Bob on Alice's task gets the same reply as for a missing id."""
    alice, bob = await register(client, "alice"), await register(client, "bob")
    targets = await alices_tasks(client, alice)
    ws = await ws_connect(client, bob)
    own = (await create_task(client, bob))["id"]
    per_task = await ws_connect(client, bob, f"{API}/stock/ws/analyze/{own}")
    assert (await receive_json(per_task))["type"] == "snapshot"
    for socket in (ws, per_task):
        for task_id in targets:
            for message in WS_ACTIONS:
                await socket.send_json({**message, "task_id": task_id})
                foreign = await receive_json(socket)
                await socket.send_json({**message, "task_id": uuid.uuid4().hex})
                absent = await receive_json(socket)
                # unsubscribe names the task back: only that may differ.
                assert foreign.pop("task_id", task_id) == task_id
                absent.pop("task_id", None)
                assert foreign == absent, (message, foreign, absent)
                assert foreign["type"] == (
                    "unsubscribed" if "unsub" in message["action"] else "error"
                )
                if foreign["type"] == "error":
                    assert foreign["code"] == "not_found", foreign
        # Nothing arrives from Alice's tasks afterwards: no subscription was left behind.
        await post_progress(client, alice, targets[1], 60)
        await socket.send_json({"action": "ping", "id": "fence"})
        assert await receive_json(socket) == {"type": "pong", "id": "fence"}
    await ws.close()
    await per_task.close()


async def test_ws_task_endpoint_handshake_foreign_matches_missing(client: TestClient):
    """The per-task WebSocket endpoint refuses Alice's task to Bob exactly like a missing one."""
    alice, bob = await register(client, "alice"), await register(client, "bob")
    targets = await alices_tasks(client, alice)
    for task_id in targets:
        for query in ("", "?last_seq=0", "?last_seq=2"):
            replies = []
            for target in (task_id, uuid.uuid4().hex):
                path = f"{API}/stock/ws/analyze/{target}{query}"
                resp = await client.get(path, headers=upgrade_headers(bob))
                replies.append((resp.status, await resp.json()))
            assert replies[0] == replies[1], replies
            assert replies[0][0] == 404, replies
        resp = await client.get(f"{API}/stock/ws/analyze/{task_id}", headers=upgrade_headers(alice))
        assert resp.status == 101  # the owner is let in: the 404 above is about ownership
        resp.close()


async def test_task_ids_are_uuid4_hex(client: TestClient):
    """Task ids are 32 lowercase hex characters of a version-4 UUID, all distinct."""
    token = await register(client, "alice")
    ids = [(await create_task(client, token))["id"] for _ in range(30)]
    for code in ("600519", "AAPL"):
        status, task = await answer(client, "POST", "/stock/analyze", token, {"code": code})
        assert status == 201
        ids.append(task["id"])
    for task_id in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", task_id), task_id
        parsed = uuid.UUID(hex=task_id)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122, task_id
    assert len(set(ids)) == len(ids)
    # Not sequential either: no two ids share a long common prefix.
    prefixes = {task_id[:8] for task_id in ids}
    assert len(prefixes) == len(ids)
