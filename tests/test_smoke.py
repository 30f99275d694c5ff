"""The app starts, answers /healthz and serves the demo page."""

from __future__ import annotations

from .helpers import auth_headers, create_task, receive_json, register, ws_connect


async def test_healthz(client):
    """/healthz answers 200 once the app has started."""
    resp = await client.get("/healthz")
    assert resp.status == 200
    body = await resp.json()
    assert (body["status"], body["store"], body["broker"]) == ("ok", "ok", "ok")
    assert body["node"]


async def test_subscribe_and_progress_roundtrip(client):
    """A progress post reaches a subscriber as started + progress events."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "id": 7})
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["id"] == 7
    assert snapshot["task"]["seq"] == 1
    resp = await client.post(
        f"/api/v1/tasks/{task['id']}/progress", json={"progress": 10}, headers=auth_headers(token)
    )
    assert (await resp.json()) == {"seq": 3}
    started, progress = await receive_json(ws), await receive_json(ws)
    assert (started["event"], started["seq"]) == ("started", 2)
    assert (progress["event"], progress["seq"], progress["progress"]) == ("progress", 3, 10)
    await ws.close()
