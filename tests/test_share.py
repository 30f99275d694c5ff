"""Share tokens: read one task (HTTP, WebSocket, SSE) and nothing else, until they end."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
from aiohttp.test_utils import TestClient

from .helpers import auth_headers, create_task, post_progress, register


async def share(client: TestClient, token: str, task_id: str, **body: Any) -> dict[str, Any]:
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/share", json=body, headers=auth_headers(token)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


async def test_a_share_gives_a_token_an_expiry_and_a_link_with_the_token_in_the_fragment(
    client: TestClient,
) -> None:
    """201 {token, expires_at, url}; the url's fragment names the task and the token."""
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    made = await share(client, owner, task["id"])
    assert set(made) == {"token", "expires_at", "url"} and made["token"].startswith("st_")
    parts = urlsplit(made["url"])
    assert parts.path == "/" and not parts.query and made["token"] not in parts.path
    assert parse_qs(parts.fragment) == {"task": [task["id"]], "share": [made["token"]]}
    assert made["expires_at"].endswith("Z")


async def test_a_share_token_reads_its_task_and_its_events(client: TestClient) -> None:
    """GET the task and its events with the token; the owner's progress shows."""
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    await post_progress(client, owner, task["id"], 40)
    token = (await share(client, owner, task["id"]))["token"]
    got = await (
        await client.get(f"/api/v1/tasks/{task['id']}", headers=auth_headers(token))
    ).json()
    assert got["progress"] == 40
    events = await (
        await client.get(f"/api/v1/tasks/{task['id']}/events", headers=auth_headers(token))
    ).json()
    assert [e["seq"] for e in events["events"]] == [1, 2, 3]


async def test_a_share_token_is_confined_to_its_one_task(client: TestClient) -> None:
    """Another task (the owner's or anyone's) is 404; every other route is 403; no post."""
    owner = await register(client, "alice")
    other_user = await register(client, "bob")
    task = await create_task(client, owner)
    sibling = await create_task(client, owner)
    foreign = await create_task(client, other_user)
    headers = auth_headers((await share(client, owner, task["id"]))["token"])
    for other in (sibling["id"], foreign["id"], "0" * 32):
        for path in ("", "/events", "/stream"):
            resp = await client.get(f"/api/v1/tasks/{other}{path}", headers=headers)
            assert await error_of(resp) == (404, "not_found"), (other, path)
    base = f"/api/v1/tasks/{task['id']}"
    forbidden = [
        await client.get("/api/v1/tasks", headers=headers),
        await client.get("/api/v1/subscriptions", headers=headers),
        await client.get("/api/v1/auth/me", headers=headers),
        await client.get("/api/v1/api-keys", headers=headers),
        await client.post("/api/v1/tasks", json={"kind": "x"}, headers=headers),
        await client.post("/api/v1/stock/analyze", json={"code": "AAPL"}, headers=headers),
        await client.post(f"{base}/progress", json={"progress": 1}, headers=headers),
        await client.post(f"{base}/complete", json={}, headers=headers),
        await client.post(f"{base}/fail", json={"error": "x"}, headers=headers),
        await client.post(f"{base}/cancel", json={}, headers=headers),
        await client.post(f"{base}/share", json={}, headers=headers),
        await client.delete(f"{base}/share", headers=headers),
        await client.post("/api/v1/auth/refresh", headers=headers),
        await client.post("/api/v1/auth/logout", headers=headers),
    ]
    for resp in forbidden:
        assert resp.status in (403, 404), resp.url
        assert (await resp.json())["error"]["code"] in ("insufficient_scope", "not_found")
    after = await (await client.get(base, headers=auth_headers(owner))).json()
    assert after["seq"] == 1 and after["status"] == "pending"


async def test_a_share_token_subscribes_to_its_task_only_over_websocket(
    client: TestClient,
) -> None:
    """The per-task socket and the multi-task socket work for the task; others: not_found."""
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    sibling = await create_task(client, owner)
    token = (await share(client, owner, task["id"]))["token"]
    resp = await client.get(f"/api/v1/stock/ws/analyze/{sibling['id']}?token={token}")
    assert resp.status == 404
    ws = await client.ws_connect(f"/api/v1/stock/ws/analyze/{task['id']}?token={token}")
    assert (await ws.receive_json(timeout=5))["type"] == "snapshot"
    await ws.close()
    ws = await client.ws_connect(f"/api/v1/ws?token={token}")
    await ws.send_json({"action": "subscribe", "task_id": sibling["id"], "id": 1})
    refused = await ws.receive_json(timeout=5)
    assert refused["type"] == "error" and refused["code"] == "not_found"
    await ws.send_json({"action": "subscribe", "task_id": task["id"], "last_seq": 0, "id": 2})
    assert (await ws.receive_json(timeout=5))["seq"] == 1
    await post_progress(client, owner, task["id"], 10)
    live = [await ws.receive_json(timeout=5) for _ in range(2)]
    assert [m["seq"] for m in live] == [2, 3]
    await ws.close()


async def test_revoking_shares_ends_the_tokens_and_their_sockets(client: TestClient) -> None:
    """DELETE /share: 204; the token is 401 and its open socket closes with 4401."""
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    first = (await share(client, owner, task["id"]))["token"]
    second = (await share(client, owner, task["id"]))["token"]
    ws = await client.ws_connect(f"/api/v1/stock/ws/analyze/{task['id']}?token={first}")
    await ws.receive_json(timeout=5)
    resp = await client.delete(f"/api/v1/tasks/{task['id']}/share", headers=auth_headers(owner))
    assert resp.status == 204
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401
    for token in (first, second):
        resp = await client.get(f"/api/v1/tasks/{task['id']}", headers=auth_headers(token))
        assert await error_of(resp) == (401, "invalid_token")


async def test_a_share_token_expires(client: TestClient) -> None:
    """ttl_s=1: a second later the token is 401 token_expired, and its socket closes 4401."""
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    token = (await share(client, owner, task["id"], ttl_s=1))["token"]
    ws = await client.ws_connect(f"/api/v1/stock/ws/analyze/{task['id']}?token={token}")
    await ws.receive_json(timeout=5)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401
    await asyncio.sleep(0.1)
    resp = await client.get(f"/api/v1/tasks/{task['id']}", headers=auth_headers(token))
    assert await error_of(resp) == (401, "token_expired")


async def test_only_the_owner_shares_and_ttls_are_bounded(client: TestClient) -> None:
    """Another user's task is 404; ttl_s must be 1 s .. 30 days (422 otherwise)."""
    owner = await register(client, "alice")
    other = await register(client, "bob")
    task = await create_task(client, owner)
    for method in (client.post, client.delete):
        resp = await method(f"/api/v1/tasks/{task['id']}/share", headers=auth_headers(other))
        assert await error_of(resp) == (404, "not_found")
    for ttl in (0, -5, 30 * 86400 + 1, "60", True):
        resp = await client.post(
            f"/api/v1/tasks/{task['id']}/share", json={"ttl_s": ttl}, headers=auth_headers(owner)
        )
        assert await error_of(resp) == (422, "validation_error"), ttl
    made = await share(client, owner, task["id"], ttl_s=30 * 86400)
    assert made["expires_at"] > task["created_at"]


async def test_viewers_of_a_share_count_apart_from_the_owner(
    aiohttp_client: Any, config: Any
) -> None:
    """Share-token sockets fill their own --max-connections-per-user places, not the
    owner's: with a limit of 2, two viewers are in, a third is 429, the owner still opens."""
    import dataclasses

    from server.web.app import create_app

    client = await aiohttp_client(
        create_app(dataclasses.replace(config, max_connections_per_user=2))
    )
    owner = await register(client, "alice")
    task = await create_task(client, owner)
    token = (await share(client, owner, task["id"]))["token"]
    path = f"/api/v1/stock/ws/analyze/{task['id']}?token={token}"
    viewers = [await client.ws_connect(path) for _ in range(2)]
    refused = await client.get(path)
    assert await error_of(refused) == (429, "too_many_connections")
    mine = await client.ws_connect(path.replace(token, owner))
    assert (await mine.receive_json(timeout=5))["type"] == "snapshot"
    for ws in (*viewers, mine):
        await ws.close()


async def test_behind_a_trusted_proxy_the_link_names_the_public_origin(
    aiohttp_client: Any, config: Any
) -> None:
    """From a --trusted-proxies peer, X-Forwarded-Proto/Host make the link's origin; from
    anyone else they are ignored."""
    import dataclasses

    from server.web.app import create_app

    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "progress.example.com"}
    cases = ((("127.0.0.1",), "https://progress.example.com/#"), ((), "http://127.0.0.1:"))
    for n, (trusted, expected) in enumerate(cases):
        app = create_app(dataclasses.replace(config, trusted_proxies=trusted))
        client = await aiohttp_client(app)
        owner = await register(client, f"user{n}")
        task = await create_task(client, owner)
        resp = await client.post(
            f"/api/v1/tasks/{task['id']}/share", json={}, headers={**auth_headers(owner), **headers}
        )
        assert (await resp.json())["url"].startswith(expected)
        await client.close()
