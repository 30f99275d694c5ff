"""GET /api/v1/tasks/{id}/stream: Server-Sent Events with the WebSocket's guarantees."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from server.config import Config
from server.web import sse
from server.web.app import create_app
from server.web.keys import hub_key, metrics_key

from .helpers import auth_headers, create_task, post_progress, register


@dataclasses.dataclass
class Message:
    event: str
    id: str | None
    data: dict[str, Any]


async def read_messages(resp: aiohttp.ClientResponse, *, until_eof: bool = True) -> list[Message]:
    """Parse an SSE body into messages (comments and `retry:` left out) to its end."""
    messages: list[Message] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(10):
        async for raw in resp.content:
            line = raw.decode().rstrip("\n")
            if line == "":
                if "data" in fields:
                    messages.append(
                        Message(
                            fields.get("event", "message"),
                            fields.get("id"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
    return messages


def stream_path(task_id: str, **query: Any) -> str:
    suffix = "&".join(f"{k}={v}" for k, v in query.items())
    return f"/api/v1/tasks/{task_id}/stream" + (f"?{suffix}" if suffix else "")


async def finish(client: TestClient, token: str, task_id: str) -> int:
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/complete", json={"result": {"ok": 1}}, headers=auth_headers(token)
    )
    return (await resp.json())["seq"]


async def test_a_stream_starts_with_a_snapshot_goes_live_and_ends_with_the_task(
    client: TestClient,
) -> None:
    """No position: `event: snapshot` (id = the task's seq), then each event, then EOF."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 10)
    resp = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["Cache-Control"] == "no-cache"
    first = await resp.content.readuntil(b"\n\n")
    assert first.startswith(b"retry: ")
    reader = asyncio.create_task(read_messages(resp))
    await post_progress(client, token, task["id"], 60, step="b", message="half")
    last = await finish(client, token, task["id"])
    got = await reader
    assert [m.event for m in got] == ["snapshot", "progress", "completed"]
    assert got[0].id == "3" and got[0].data["task"]["progress"] == 10
    assert [m.id for m in got[1:]] == ["4", str(last)]
    assert got[1].data == {
        "type": "event",
        "task_id": task["id"],
        "seq": 4,
        "event": "progress",
        "status": "running",
        "progress": 60,
        "step": "b",
        "message": "half",
        "ts": got[1].data["ts"],
        "rate": None,
        "eta_s": None,
    }
    assert got[2].data["result"] == {"ok": 1}
    assert client.app[hub_key].connection_count == 0


async def test_last_event_id_and_last_seq_replay_what_was_missed(client: TestClient) -> None:
    """`Last-Event-ID: N` (what EventSource sends) or `?last_seq=N`: every event after N."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    for value in (10, 20, 30):
        await post_progress(client, token, task["id"], value)
    last = await finish(client, token, task["id"])
    headers = {**auth_headers(token), "Last-Event-ID": "3"}
    by_header = await read_messages(await client.get(stream_path(task["id"]), headers=headers))
    by_query = await read_messages(
        await client.get(stream_path(task["id"], last_seq=3), headers=auth_headers(token))
    )
    for got in (by_header, by_query):
        assert [int(m.id or 0) for m in got] == list(range(4, last + 1))
        assert [m.event for m in got] == ["progress", "progress", "completed"]


async def test_a_finished_task_resumed_at_its_end_is_204(client: TestClient) -> None:
    """Nothing will follow the terminal event: 204, which makes EventSource stop."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    last = await finish(client, token, task["id"])
    headers = {**auth_headers(token), "Last-Event-ID": str(last)}
    resp = await client.get(stream_path(task["id"]), headers=headers)
    assert resp.status == 204
    snapshot = await read_messages(
        await client.get(stream_path(task["id"]), headers=auth_headers(token))
    )
    assert [m.event for m in snapshot] == ["snapshot"]
    assert snapshot[0].data["task"]["status"] == "completed"


async def test_bad_positions_and_foreign_tasks_are_refused(client: TestClient) -> None:
    """A non-numeric Last-Event-ID or last_seq is 400/422; another user's task 404; no
    token 401."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    task = await create_task(client, alice)
    for value in ("abc", "-1", "1.5", "9" * 30):
        headers = {**auth_headers(alice), "Last-Event-ID": value}
        resp = await client.get(stream_path(task["id"]), headers=headers)
        assert resp.status == 400, value
        assert (await resp.json())["error"]["code"] == "bad_request"
    resp = await client.get(stream_path(task["id"], last_seq="x"), headers=auth_headers(alice))
    assert resp.status == 422
    resp = await client.get(stream_path(task["id"]), headers=auth_headers(bob))
    assert resp.status == 404
    resp = await client.get(stream_path(task["id"]))
    assert resp.status == 401


async def test_a_stream_takes_a_token_in_the_query(client: TestClient) -> None:
    """EventSource cannot send headers: `?token=` (a login token, a key, a share token)."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await finish(client, token, task["id"])
    got = await read_messages(await client.get(stream_path(task["id"], token=token)))
    assert [m.event for m in got] == ["snapshot"]


async def test_streams_count_against_the_per_user_connection_limit(
    aiohttp_client: Any, config: Config
) -> None:
    """--max-connections-per-user covers SSE streams: one open, the next is 429."""
    client = await aiohttp_client(
        create_app(dataclasses.replace(config, max_connections_per_user=1))
    )
    token = await register(client, "alice")
    task = await create_task(client, token)
    first = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    assert first.status == 200
    second = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "too_many_connections"
    first.close()


async def test_keepalive_comments_keep_a_quiet_stream_open(
    client: TestClient, monkeypatch: Any
) -> None:
    """A comment line every KEEPALIVE seconds (shortened here) while nothing happens."""
    monkeypatch.setattr(sse, "KEEPALIVE", 0.2)
    monkeypatch.setattr(sse, "POLL", 0.1)
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    seen = b""
    async with asyncio.timeout(5):
        while seen.count(b": keepalive\n\n") < 2:
            seen += await resp.content.readany()
    resp.close()


async def race_round(client: TestClient, token: str, rng: random.Random) -> None:
    """Producers post 120 updates while 6 streams open at random moments and positions."""
    updates, workers = 120, 4
    task_id = (await create_task(client, token))["id"]
    acked: list[int] = []
    reached = {k: asyncio.Event() for k in range(0, updates + 1, 10)}

    async def produce() -> None:
        for i in range(updates // workers):
            acked.append(await post_progress(client, token, task_id, i))
            for k, flag in reached.items():
                if len(acked) >= k:
                    flag.set()

    async def watch(at: int, mode: str) -> None:
        await reached[at].wait()
        position = {"snapshot": None, "zero": 0, "known": rng.choice(acked) if acked else 0}[mode]
        headers = auth_headers(token)
        if position is not None:
            headers["Last-Event-ID"] = str(position)
        got = await read_messages(await client.get(stream_path(task_id), headers=headers))
        if position is None:
            assert got[0].event == "snapshot"
            position, got = got[0].data["task"]["seq"], got[1:]
        assert [int(m.id or 0) for m in got] == list(range(position + 1, updates + 4)), mode
        assert got[-1].event == "completed"

    modes = ["snapshot", "zero", "known"]
    watchers = [
        asyncio.create_task(watch(rng.choice(list(reached)[:-1]), modes[i % 3])) for i in range(6)
    ]
    await asyncio.gather(*(produce() for _ in range(workers)))
    assert await finish(client, token, task_id) == updates + 3
    await asyncio.gather(*watchers)


async def test_replay_live_race_every_seq_once_in_order(client: TestClient) -> None:
    """Streams opened while updates are posted see each later seq once, in order."""
    token = await register(client, "alice")
    for round_ in range(4):
        await race_round(client, token, random.Random(round_))
    assert client.app[hub_key].subscription_count == 0


async def test_a_stream_that_is_not_read_is_dropped(aiohttp_client: Any, config: Config) -> None:
    """Past --send-queue-bytes unread, the stream is reset (slow consumer), others go on."""
    app = create_app(dataclasses.replace(config, send_queue_bytes=64 * 1024, max_json_bytes=16384))
    client = await aiohttp_client(app)
    token = await register(client, "alice")
    task = await create_task(client, token)
    stalled = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    assert stalled.status == 200
    reader = await client.get(stream_path(task["id"]), headers=auth_headers(token))
    healthy = asyncio.create_task(read_messages(reader))
    message = "x" * 12000
    for i in range(400):  # ~5 MB: more than kernel buffers and the queue limit together
        await post_progress(client, token, task["id"], i % 100, message=message)
        if app[hub_key].connection_count < 2:
            break
    assert app[hub_key].connection_count == 1
    assert app[metrics_key].connections.slow_consumer_drops == 1
    await finish(client, token, task["id"])
    got = await healthy
    assert got[-1].event == "completed"
    stalled.close()
