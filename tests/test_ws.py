"""The WebSocket protocol: every action, errors, authentication and Origin before the upgrade."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.web.keys import hub_key

from .helpers import (
    SECRET,
    auth_headers,
    create_task,
    eventually,
    post_progress,
    receive_json,
    receive_until,
    register,
    ws_connect,
)

WS = "/api/v1/ws"
EVENT_KEYS = {"type", "task_id", "seq", "event", "status", "progress", "step", "message", "ts"}
#: A progress event also carries the task's rate and ETA.
PROGRESS_KEYS = EVENT_KEYS | {"rate", "eta_s"}


def task_ws(task_id: str) -> str:
    return f"/api/v1/stock/ws/analyze/{task_id}"


async def start(client: TestClient, name: str = "alice") -> tuple[str, dict[str, Any]]:
    """A user's token and one fresh external task of theirs."""
    token = await register(client, name)
    return token, await create_task(client, token)


async def user_id(client: TestClient, token: str) -> int:
    resp = await client.get("/api/v1/auth/me", headers=auth_headers(token))
    assert resp.status == 200
    return (await resp.json())["id"]


async def post(client: TestClient, token: str, task_id: str, action: str, body: Any = None) -> int:
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/{action}", json=body or {}, headers=auth_headers(token)
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["seq"]


async def assert_quiet(ws: aiohttp.ClientWebSocketResponse) -> None:
    """Nothing is queued for `ws`: a ping sent now is answered by the very next message."""
    await ws.send_json({"action": "ping", "id": "quiet?"})
    assert await receive_json(ws) == {"type": "pong", "id": "quiet?"}


async def handshake_status(client: TestClient, path: str, **kwargs: Any) -> int:
    """The HTTP status of a refused upgrade (fails if the upgrade succeeds)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        ws = await client.ws_connect(path, **kwargs)
        await ws.close()
    return info.value.status


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


# -- actions ----------------------------------------------------------------------------


async def test_ping_answers_pong_with_id(client):
    """ping → pong, echoing "id" when given (string or number) and omitting it otherwise."""
    token, _ = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "ping", "id": "abc"})
    assert await receive_json(ws) == {"type": "pong", "id": "abc"}
    await ws.send_json({"action": "ping", "id": 42})
    assert await receive_json(ws) == {"type": "pong", "id": 42}
    await ws.send_json({"action": "ping"})
    assert await receive_json(ws) == {"type": "pong"}
    await ws.close()


async def test_subscribe_sends_snapshot_then_live_events(client):
    """subscribe without last_seq → snapshot (id echoed), then every later event live."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "id": "s1"})
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["id"] == "s1"
    assert "recovered" not in snapshot
    assert snapshot["task"]["id"] == task["id"]
    assert (snapshot["task"]["status"], snapshot["task"]["seq"]) == ("pending", 1)
    assert "user_id" not in snapshot["task"] and "checkpoint" not in snapshot["task"]

    await post_progress(client, token, task["id"], 25, step="load", message="loading")
    started, progress = await receive_json(ws), await receive_json(ws)
    assert set(started) == EVENT_KEYS and set(progress) == PROGRESS_KEYS
    assert started == {**started, "type": "event", "task_id": task["id"], "seq": 2}
    assert (started["event"], started["status"]) == ("started", "running")
    assert progress["type"] == "event" and progress["task_id"] == task["id"]
    assert (progress["seq"], progress["event"], progress["status"]) == (3, "progress", "running")
    assert (progress["progress"], progress["step"], progress["message"]) == (25, "load", "loading")
    assert isinstance(progress["ts"], str) and progress["ts"].endswith("Z")
    await ws.close()


async def test_completed_event_carries_result_only(client):
    """The completed event has "result" and no "error"."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["type"] == "snapshot"
    await post(client, token, task["id"], "complete", {"result": {"answer": 42}})
    events = await receive_until(ws, lambda m: m.get("event") == "completed")
    assert [e["event"] for e in events] == ["started", "completed"]
    done = events[-1]
    assert set(done) == EVENT_KEYS | {"result"}
    assert (done["status"], done["progress"], done["result"]) == ("completed", 100, {"answer": 42})
    await ws.close()


@pytest.mark.parametrize(
    ("action", "body", "status", "error"),
    [
        ("fail", {"error": "disk full"}, "failed", "disk full"),
        ("cancel", None, "cancelled", None),
    ],
)
async def test_failed_and_cancelled_events_carry_error_only(client, action, body, status, error):
    """failed and cancelled events have "error" and no "result"."""
    token, task = await start(client)
    await post_progress(client, token, task["id"], 5)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["task"]["seq"] == 3
    seq = await post(client, token, task["id"], action, body)
    event = await receive_json(ws)
    assert set(event) == EVENT_KEYS | {"error"}
    assert (event["seq"], event["event"], event["status"]) == (seq, status, status)
    assert isinstance(event["error"], str) and event["error"]
    if error is not None:
        assert event["error"] == error
    await ws.close()


async def test_subscribe_with_last_seq_replays_missed_events_then_live(client):
    """subscribe with last_seq → exactly the events after it, in order, then live ones."""
    token, task = await start(client)
    for pct in (10, 20, 30, 40):
        await post_progress(client, token, task["id"], pct)  # seqs 2 (started), 3..6
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 3, "id": 9})
    replayed = [await receive_json(ws) for _ in range(3)]
    assert [(m["type"], m["seq"], m["progress"]) for m in replayed] == [
        ("event", 4, 20),
        ("event", 5, 30),
        ("event", 6, 40),
    ]
    assert all(set(m) == PROGRESS_KEYS for m in replayed)
    assert await post_progress(client, token, task["id"], 50) == 7
    live = await receive_json(ws)
    assert (live["seq"], live["progress"]) == (7, 50)
    await assert_quiet(ws)
    await ws.close()


async def test_subscribe_with_last_seq_zero_replays_whole_history(client):
    """last_seq=0 → created, started and every progress event, from seq 1."""
    token, task = await start(client)
    await post_progress(client, token, task["id"], 10)
    await post_progress(client, token, task["id"], 20)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 0})
    events = [await receive_json(ws) for _ in range(4)]
    assert [(m["seq"], m["event"]) for m in events] == [
        (1, "created"),
        (2, "started"),
        (3, "progress"),
        (4, "progress"),
    ]
    assert events[0]["status"] == "pending"
    await assert_quiet(ws)
    await ws.close()


async def test_subscribe_with_current_last_seq_sends_only_new_events(client):
    """A client already up to date gets no replay, just the next live event."""
    token, task = await start(client)
    await post_progress(client, token, task["id"], 10)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 3})
    await assert_quiet(ws)
    await post_progress(client, token, task["id"], 20)
    assert (await receive_json(ws))["seq"] == 4
    await ws.close()


async def test_subscribe_with_last_seq_ahead_gets_unrecovered_snapshot(client):
    """A last_seq beyond the task's history → snapshot with "recovered": false."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 99, "id": 1})
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["recovered"] is False
    assert (snapshot["id"], snapshot["task"]["seq"]) == (1, 1)
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [2, 3]
    await ws.close()


async def test_resubscribe_does_not_duplicate_events(client):
    """Subscribing twice to one task gives one stream: each event arrives once."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    for _ in range(2):
        await ws.send_json({"action": "subscribe", "task_id": task["id"]})
        assert (await receive_json(ws))["type"] == "snapshot"
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [2, 3]
    await assert_quiet(ws)
    await ws.close()


async def test_unsubscribe_stops_events(client):
    """unsubscribe → {"type": "unsubscribed", "task_id"} and no more events for that task."""
    token, task = await start(client)
    other = await create_task(client, token)
    ws = await ws_connect(client, token)
    for t in (task, other):
        await ws.send_json({"action": "subscribe", "task_id": t["id"]})
        assert (await receive_json(ws))["type"] == "snapshot"
    await ws.send_json({"action": "unsubscribe", "task_id": task["id"], "id": "u"})
    assert await receive_json(ws) == {"type": "unsubscribed", "task_id": task["id"], "id": "u"}
    await post_progress(client, token, task["id"], 10)
    await assert_quiet(ws)
    # The other subscription is untouched.
    await post_progress(client, token, other["id"], 10)
    assert [(m["task_id"], m["seq"]) for m in [await receive_json(ws) for _ in range(2)]] == [
        (other["id"], 2),
        (other["id"], 3),
    ]
    await ws.close()


async def test_unsubscribe_affects_only_that_socket(client):
    """Two sockets of one user on one task: unsubscribing one leaves the other subscribed."""
    token, task = await start(client)
    first, second = await ws_connect(client, token), await ws_connect(client, token)
    for ws in (first, second):
        await ws.send_json({"action": "subscribe", "task_id": task["id"]})
        assert (await receive_json(ws))["type"] == "snapshot"
    await first.send_json({"action": "unsubscribe", "task_id": task["id"]})
    assert (await receive_json(first))["type"] == "unsubscribed"
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(second))["seq"] for _ in range(2)] == [2, 3]
    await assert_quiet(first)
    await first.close()
    await second.close()


async def test_unsubscribe_when_not_subscribed_is_acknowledged(client):
    """Unsubscribing from a task one does not watch still answers "unsubscribed"."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "unsubscribe", "task_id": task["id"]})
    assert await receive_json(ws) == {"type": "unsubscribed", "task_id": task["id"]}
    await ws.close()


async def test_get_status_returns_snapshot(client):
    """get_status → snapshot of the current state (id echoed), without subscribing."""
    token, task = await start(client)
    await post_progress(client, token, task["id"], 60, step="rsi", message="computing")
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "get_status", "task_id": task["id"], "id": "g"})
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["id"] == "g"
    got = snapshot["task"]
    assert (got["id"], got["status"], got["seq"]) == (task["id"], "running", 3)
    assert (got["progress"], got["step"], got["message"]) == (60, "rsi", "computing")
    await post_progress(client, token, task["id"], 70)
    await assert_quiet(ws)  # get_status does not subscribe
    await ws.close()


async def test_get_status_requires_task_id_on_multi_task_endpoint(client):
    """On /api/v1/ws a get_status without task_id is a bad_request."""
    token, _ = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "get_status", "id": 3})
    error = await receive_json(ws)
    assert (error["type"], error["code"], error["id"]) == ("error", "bad_request", 3)
    await assert_quiet(ws)
    await ws.close()


# -- the per-task endpoint --------------------------------------------------------------


async def test_task_endpoint_subscribes_on_open(client):
    """/stock/ws/analyze/{id} sends the snapshot on open, then live events."""
    token, task = await start(client)
    ws = await ws_connect(client, token, task_ws(task["id"]))
    snapshot = await receive_json(ws)
    assert snapshot["type"] == "snapshot" and snapshot["task"]["id"] == task["id"]
    assert "id" not in snapshot
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [2, 3]
    await ws.close()


async def test_task_endpoint_with_last_seq_replays_missed_events(client):
    """?last_seq=N on the per-task endpoint → the events after N, then live."""
    token, task = await start(client)
    for pct in (10, 20, 30):
        await post_progress(client, token, task["id"], pct)  # seqs 2..5
    ws = await ws_connect(client, token, f"{task_ws(task['id'])}?last_seq=2")
    assert [(await receive_json(ws))["seq"] for _ in range(3)] == [3, 4, 5]
    await post_progress(client, token, task["id"], 40)
    assert (await receive_json(ws))["seq"] == 6
    await assert_quiet(ws)
    await ws.close()


async def test_task_endpoint_get_status_without_task_id(client):
    """On the per-task endpoint get_status may leave out task_id."""
    token, task = await start(client)
    ws = await ws_connect(client, token, task_ws(task["id"]))
    assert (await receive_json(ws))["type"] == "snapshot"
    await post_progress(client, token, task["id"], 33)
    assert [(await receive_json(ws))["seq"] for _ in range(2)] == [2, 3]
    await ws.send_json({"action": "get_status", "id": 5})
    snapshot = await receive_json(ws)
    assert (snapshot["type"], snapshot["id"]) == ("snapshot", 5)
    assert (snapshot["task"]["id"], snapshot["task"]["progress"]) == (task["id"], 33)
    await ws.close()


async def test_task_endpoint_accepts_other_actions(client):
    """The per-task socket also takes subscribe for another of the user's tasks."""
    token, task = await start(client)
    other = await create_task(client, token)
    ws = await ws_connect(client, token, task_ws(task["id"]))
    assert (await receive_json(ws))["task"]["id"] == task["id"]
    await ws.send_json({"action": "subscribe", "task_id": other["id"]})
    assert (await receive_json(ws))["task"]["id"] == other["id"]
    await post_progress(client, token, other["id"], 10)
    assert {(await receive_json(ws))["task_id"] for _ in range(2)} == {other["id"]}
    await ws.close()


@pytest.mark.parametrize("query", ["last_seq=abc", "last_seq=-1"])
async def test_task_endpoint_rejects_bad_last_seq(client, query):
    """A malformed ?last_seq is refused with 400 before the upgrade."""
    token, task = await start(client)
    path = f"{task_ws(task['id'])}?{query}"
    assert await handshake_status(client, path, headers=auth_headers(token)) == 400


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "",
        "[1, 2, 3]",
        '"ping"',
        "42",
        "null",
        json.dumps({"id": 1}),
        json.dumps({"action": None}),
        json.dumps({"action": 5}),
        json.dumps({"action": "dance"}),
        json.dumps({"action": "subscribe"}),
        json.dumps({"action": "unsubscribe"}),
        json.dumps({"action": "subscribe", "task_id": 12}),
        json.dumps({"action": "subscribe", "task_id": None}),
        json.dumps({"action": "subscribe", "task_id": ""}),
        json.dumps({"action": "get_status", "task_id": ["x"]}),
        json.dumps({"action": "unsubscribe", "task_id": {"id": "x"}}),
        json.dumps({"action": "subscribe", "task_id": "T", "last_seq": "3"}),
        json.dumps({"action": "subscribe", "task_id": "T", "last_seq": True}),
        json.dumps({"action": "subscribe", "task_id": "T", "last_seq": -1}),
        json.dumps({"action": "subscribe", "task_id": "T", "last_seq": 2.5}),
    ],
)
async def test_bad_messages_get_bad_request_and_connection_stays_usable(client, text):
    """Bad JSON, non-objects, bad or missing action and wrongly typed fields → bad_request."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_str(text.replace('"T"', json.dumps(task["id"])))
    error = await receive_json(ws)
    assert (error["type"], error["code"]) == ("error", "bad_request")
    assert isinstance(error["message"], str) and error["message"]
    await assert_quiet(ws)
    # Still fully usable: a real subscription works after the error.
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["type"] == "snapshot"
    await ws.close()


async def test_bad_request_echoes_id_and_names_fields(client):
    """A message with a usable "id" gets it back on its error, with the bad field named."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": "3", "id": 8})
    error = await receive_json(ws)
    assert (error["code"], error["id"]) == ("bad_request", 8)
    assert "last_seq" in error["fields"]
    await ws.send_json({"action": "teleport", "id": "x"})
    error = await receive_json(ws)
    assert (error["code"], error["id"]) == ("bad_request", "x")
    await ws.close()


async def test_many_errors_in_a_row_do_not_close_the_socket(client):
    """A burst of bad messages gets one error each and the socket stays open."""
    token, _ = await start(client)
    ws = await ws_connect(client, token)
    for i in range(20):
        await ws.send_str(f"garbage {i}")
    errors = [await receive_json(ws) for _ in range(20)]
    assert {e["code"] for e in errors} == {"bad_request"}
    await assert_quiet(ws)
    await ws.close()


async def test_missing_and_foreign_tasks_are_not_found_alike(client):
    """subscribe/get_status on a missing or another user's task → not_found, same message."""
    token, _ = await start(client, "alice")
    bob, bobs_task = await start(client, "bob")
    ws = await ws_connect(client, token)
    replies: dict[tuple[str, str], dict[str, Any]] = {}
    for action in ("subscribe", "get_status"):
        for label, task_id in (("missing", "0" * 32), ("foreign", bobs_task["id"])):
            await ws.send_json({"action": action, "task_id": task_id, "id": label})
            replies[action, label] = await receive_json(ws)
    for (_, label), reply in replies.items():
        assert (reply["type"], reply["code"], reply["id"]) == ("error", "not_found", label)
        assert "task" not in reply
    assert len({r["message"] for r in replies.values()}) == 1
    # The refused subscription left nothing behind: bob's events never reach alice.
    await post_progress(client, bob, bobs_task["id"], 50)
    await assert_quiet(ws)
    await ws.send_json({"action": "subscribe", "task_id": bobs_task["id"], "last_seq": 0})
    assert (await receive_json(ws))["code"] == "not_found"
    await assert_quiet(ws)
    await ws.close()


async def test_binary_frame_is_refused_and_connection_stays_usable(client):
    """A binary frame → a bad_request error (not a close); text messages still work."""
    token, task = await start(client)
    ws = await ws_connect(client, token)
    await ws.send_bytes(json.dumps({"action": "ping"}).encode())
    error = await receive_json(ws)
    assert (error["type"], error["code"]) == ("error", "bad_request")
    await assert_quiet(ws)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["type"] == "snapshot"
    await ws.close()


async def test_oversized_frame_closes_1009_and_others_keep_receiving(aiohttp_client, make_app):
    """A frame over max_frame_bytes → close 1009 for that client only."""
    client = await serve(aiohttp_client, make_app(max_frame_bytes=1024))
    token, task = await start(client)
    watcher = await ws_connect(client, token)
    await watcher.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(watcher))["type"] == "snapshot"
    offender = await ws_connect(client, token)
    await offender.send_json({"action": "ping", "id": "x" * 900})  # under the limit
    assert await receive_json(offender) == {"type": "pong", "id": "x" * 900}
    await offender.send_json({"action": "ping", "id": "x" * 2000})
    msg = await offender.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == 1009
    assert offender.close_code == 1009
    hub = client.app[hub_key]

    async def one_left() -> bool:
        return hub.connection_count == 1

    await eventually(one_left)
    await post_progress(client, token, task["id"], 10)
    assert [(await receive_json(watcher))["seq"] for _ in range(2)] == [2, 3]
    await assert_quiet(watcher)
    await watcher.close()


def writer_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("ws-writer-")]


async def test_client_close_releases_connection_and_subscriptions(client, caplog):
    """A client that closes is forgotten at once: no connection, subscription or task."""
    caplog.set_level(logging.INFO, logger="server.web.ws")
    token, task = await start(client)
    hub = client.app[hub_key]
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["type"] == "snapshot"
    assert (hub.connection_count, hub.has_subscribers(task["id"])) == (1, True)
    # Idle: frames go straight to the socket, so no writer task is held for it.
    assert writer_tasks() == []
    await ws.close()

    async def released() -> bool:
        return (
            hub.connection_count == 0
            and not hub.has_subscribers(task["id"])
            and not writer_tasks()
            and any("ws.disconnect" in r.getMessage() for r in caplog.records)
        )

    await eventually(released)
    await post_progress(client, token, task["id"], 10)  # publishing to nobody is fine


# -- authentication before the upgrade ---------------------------------------------------


def forged_tokens(token: str) -> dict[str, str]:
    """Variants of the real `token`'s claims: forged, expired, or missing a claim."""
    now = int(time.time())
    real = jwt.decode(token, options={"verify_signature": False})
    good = {**real, "iat": now, "exp": now + 600}
    expired = {**good, "exp": now - 60}
    return {
        "garbage": "not-a-jwt",
        "tampered": jwt.encode(good, SECRET, algorithm="HS256")[:-3] + "AAA",
        "other_secret": jwt.encode(good, "another-secret-0123456789abcdef0123456789", "HS256"),
        "alg_none": jwt.encode(good, None, algorithm="none"),
        "alg_hs512": jwt.encode(good, SECRET + SECRET, algorithm="HS512"),
        "expired": jwt.encode(expired, SECRET, algorithm="HS256"),
        **{
            f"missing_{claim}": jwt.encode(
                {k: v for k, v in good.items() if k != claim}, SECRET, algorithm="HS256"
            )
            for claim in ("exp", "sub", "sid", "db")
        },
    }


async def test_token_variants_are_refused_with_401_before_upgrade(client):
    """Missing, garbage, forged, alg none, expired or claim-less tokens → 401 on both endpoints."""
    token, task = await start(client)
    forged = forged_tokens(token)
    # Sanity: the same claims signed properly are accepted.
    real = jwt.decode(token, options={"verify_signature": False})
    valid = jwt.encode({**real, "exp": int(time.time()) + 600}, SECRET, "HS256")
    ws = await client.ws_connect(WS, headers=auth_headers(valid))
    await ws.close()
    for path in (WS, task_ws(task["id"])):
        assert await handshake_status(client, path) == 401
        assert await handshake_status(client, path, headers={"Authorization": "Basic abc"}) == 401
        assert await handshake_status(client, path, headers={"Authorization": "Bearer "}) == 401
        for name, bad in forged.items():
            by_header = await handshake_status(client, path, headers=auth_headers(bad))
            by_query = await handshake_status(client, path, params={"token": bad})
            assert (name, by_header, by_query) == (name, 401, 401)
    assert client.app[hub_key].connection_count == 0


async def test_refused_upgrade_answers_json_error(client):
    """The 401 for a missing token is the API's JSON error shape, not HTML."""
    resp = await client.get(
        WS, headers={"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13"}
    )
    assert resp.status == 401
    body = await resp.json()
    assert set(body["error"]) == {"code", "message", "fields"}


async def test_token_in_query_string_works(client):
    """?token=<jwt> authenticates the upgrade on both endpoints."""
    token, task = await start(client)
    ws = await client.ws_connect(WS, params={"token": token})
    await ws.send_json({"action": "get_status", "task_id": task["id"]})
    assert (await receive_json(ws))["task"]["id"] == task["id"]
    await ws.close()
    ws = await client.ws_connect(task_ws(task["id"]), params={"token": token, "last_seq": "0"})
    assert (await receive_json(ws))["seq"] == 1
    await ws.close()


async def test_task_endpoint_missing_or_foreign_task_is_404(client):
    """The per-task endpoint refuses a missing or another user's task with 404, no upgrade."""
    token, _ = await start(client, "alice")
    _, bobs_task = await start(client, "bob")
    for task_id in ("0" * 32, bobs_task["id"]):
        status = await handshake_status(client, task_ws(task_id), headers=auth_headers(token))
        assert status == 404
    assert client.app[hub_key].connection_count == 0


async def test_token_expiring_while_connected_closes_4401(aiohttp_client, make_app):
    """A socket whose token expires is closed with 4401."""
    client = await serve(aiohttp_client, make_app(token_ttl=2))
    token = await register(client, "alice")
    ws = await ws_connect(client, token)
    msg = await ws.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE
    assert msg.data == 4401


# -- Origin -----------------------------------------------------------------------------


async def test_no_origin_is_allowed(client):
    """Scripts send no Origin: allowed."""
    token, _ = await start(client)
    ws = await ws_connect(client, token)
    await assert_quiet(ws)
    await ws.close()


async def test_same_host_origin_is_allowed(client):
    """An Origin naming the Host the request went to is allowed."""
    token, task = await start(client)
    origin = f"http://{client.host}:{client.port}"
    for path in (WS, task_ws(task["id"])):
        ws = await client.ws_connect(path, headers={**auth_headers(token), "Origin": origin})
        await ws.send_json({"action": "ping"})
        assert (await receive_until(ws, lambda m: m["type"] == "pong"))[-1] == {"type": "pong"}
        await ws.close()


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "http://127.0.0.1.evil.example",
        "http://evil.example:{port}",
        "http://127.0.0.1:1",
        "file://",
        "",
    ],
)
async def test_foreign_origin_is_refused_with_403(client, origin):
    """Cross-site origins, "null" and look-alike hosts → 403 before the upgrade, any token."""
    token, task = await start(client)
    origin = origin.format(port=client.port)
    for path in (WS, task_ws(task["id"])):
        headers = {**auth_headers(token), "Origin": origin}
        assert await handshake_status(client, path, headers=headers) == 403
    assert client.app[hub_key].connection_count == 0


async def test_configured_origin_is_allowed(aiohttp_client, make_app):
    """An origin in allowed_origins is accepted; others still are not."""
    client = await serve(aiohttp_client, make_app(allowed_origins=("http://front.example",)))
    token, _ = await start(client)
    headers = {**auth_headers(token), "Origin": "http://front.example"}
    ws = await client.ws_connect(WS, headers=headers)
    await assert_quiet(ws)
    await ws.close()
    headers["Origin"] = "http://front.example.evil.example"
    assert await handshake_status(client, WS, headers=headers) == 403
    headers["Origin"] = "https://evil.example"
    assert await handshake_status(client, WS, headers=headers) == 403


async def test_bad_origin_wins_over_bad_token(client):
    """A foreign Origin is refused even without a token (403, not a hint about auth)."""
    status = await handshake_status(client, WS, headers={"Origin": "https://evil.example"})
    assert status == 403


async def test_a_plain_get_is_told_to_send_a_websocket_handshake(aiohttp_client, make_app):
    """GET without the upgrade headers (a browser's address bar, curl) → 400 in the JSON
    error shape, saying what to send; no socket is counted or held for it."""
    client = await serve(aiohttp_client, make_app(max_connections_per_user=2))
    token, task = await start(client)
    for path in (WS, task_ws(task["id"])):
        async with client.get(path, headers=auth_headers(token)) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["code"] == "bad_request"
        assert "WebSocket" in error["message"] and "Upgrade: websocket" in error["message"]
    hub = client.app[hub_key]
    assert hub.connection_count == 0
    # The places the handshakes reserved under --max-connections-per-user were given back:
    # both of the user's 2 sockets can still open.
    sockets = [await ws_connect(client, token) for _ in range(2)]
    for ws in sockets:
        await ws.close()


# -- shutdown ---------------------------------------------------------------------------


async def test_shutdown_sends_notice_then_1001(client):
    """Closing the server: each client gets a server_shutdown notice, then close 1001."""
    token, task = await start(client)
    sockets = [await ws_connect(client, token) for _ in range(3)]
    await sockets[0].send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(sockets[0]))["type"] == "snapshot"
    closing = asyncio.create_task(client.server.close())
    for ws in sockets:
        notice = await receive_json(ws)
        assert (notice["type"], notice["code"]) == ("notice", "server_shutdown")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    async with asyncio.timeout(5):
        await closing
