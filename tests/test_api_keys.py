"""API keys: made by a login, shown once, stored as a hash, limited to their scopes."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from server.config import Config

from .helpers import auth_headers, create_task, register

READ, WRITE = "tasks:read", "tasks:write"


async def make_key(client: TestClient, token: str, *scopes: str, name: str = "worker") -> dict:
    resp = await client.post(
        "/api/v1/api-keys", json={"name": name, "scopes": list(scopes)}, headers=auth_headers(token)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def error_of(resp: aiohttp.ClientResponse) -> tuple[int, str]:
    return resp.status, (await resp.json())["error"]["code"]


async def test_a_new_key_is_shown_once_and_listed_without_its_secret(
    client: TestClient, config: Config
) -> None:
    """201 gives id, name, scopes, key, created_at; the list and the database hold no secret."""
    token = await register(client, "alice")
    made = await make_key(client, token, WRITE, READ)
    assert set(made) == {"id", "name", "scopes", "key", "created_at"}
    assert made["key"].startswith(f"pk_{made['id']}_")
    assert made["scopes"] == [READ, WRITE]
    secret = made["key"].split("_", 2)[2]
    assert len(secret) >= 43  # 256 bits, URL-safe base64
    listed = await (await client.get("/api/v1/api-keys", headers=auth_headers(token))).json()
    assert listed == {
        "api_keys": [
            {
                "id": made["id"],
                "name": "worker",
                "scopes": [READ, WRITE],
                "created_at": made["created_at"],
                "last_used_at": None,
            }
        ]
    }
    with sqlite3.connect(config.db_path) as db:
        dump = "\n".join(db.iterdump())
    assert secret not in dump and made["key"] not in dump


async def test_a_key_acts_as_its_owner_and_records_its_use(client: TestClient) -> None:
    """A write key creates and reports on the owner's tasks; last_used_at is then set."""
    token = await register(client, "alice")
    key = (await make_key(client, token, WRITE, READ))["key"]
    task = await create_task(client, key)
    resp = await client.post(
        f"/api/v1/tasks/{task['id']}/progress", json={"progress": 30}, headers=auth_headers(key)
    )
    assert resp.status == 200
    mine = await (await client.get("/api/v1/tasks", headers=auth_headers(token))).json()
    assert [t["id"] for t in mine["tasks"]] == [task["id"]]
    listed = await (await client.get("/api/v1/api-keys", headers=auth_headers(token))).json()
    assert listed["api_keys"][0]["last_used_at"] is not None


async def test_each_route_needs_its_scope(client: TestClient) -> None:
    """tasks:write for posts, tasks:read for reads; the other scope is 403 insufficient_scope."""
    token = await register(client, "alice")
    writer = (await make_key(client, token, WRITE))["key"]
    reader = (await make_key(client, token, READ))["key"]
    task = await create_task(client, token)
    base = f"/api/v1/tasks/{task['id']}"
    for path in (
        base,
        f"{base}/events",
        "/api/v1/tasks",
        "/api/v1/subscriptions",
        f"{base}/stream",
    ):
        assert await error_of(await client.get(path, headers=auth_headers(writer))) == (
            403,
            "insufficient_scope",
        ), path
        resp = await client.get(path, headers=auth_headers(reader))
        assert resp.status == 200, path
        resp.close()
    posts: list[tuple[str, Any]] = [
        ("/api/v1/tasks", {"kind": "x"}),
        ("/api/v1/stock/analyze", {"code": "AAPL"}),
        (f"{base}/progress", {"progress": 5}),
        (f"{base}/share", {}),
        (f"{base}/complete", {}),
        (f"{base}/fail", {"error": "x"}),
        (f"{base}/cancel", {}),
    ]
    for path, body in posts:
        resp = await client.post(path, json=body, headers=auth_headers(reader))
        assert await error_of(resp) == (403, "insufficient_scope"), path
    task2 = await create_task(client, writer)
    resp = await client.post(
        f"/api/v1/tasks/{task2['id']}/cancel", json={}, headers=auth_headers(writer)
    )
    assert resp.status == 200


async def test_keys_cannot_manage_keys_refresh_log_out_or_change_passwords(
    client: TestClient,
) -> None:
    """Only a login token manages keys and the account: a key gets 403 insufficient_scope."""
    token = await register(client, "alice")
    made = await make_key(client, token, WRITE, READ)
    key = auth_headers(made["key"])
    refusals = [
        await client.post("/api/v1/api-keys", json={"name": "n", "scopes": [READ]}, headers=key),
        await client.get("/api/v1/api-keys", headers=key),
        await client.delete(f"/api/v1/api-keys/{made['id']}", headers=key),
        await client.post("/api/v1/auth/refresh", headers=key),
        await client.post("/api/v1/auth/logout", headers=key),
        await client.post(
            "/api/v1/auth/password",
            json={"current_password": "correct horse battery", "new_password": "x" * 12},
            headers=key,
        ),
    ]
    for resp in refusals:
        assert await error_of(resp) == (403, "insufficient_scope"), resp.url
    me = await client.get("/api/v1/auth/me", headers=key)
    assert (await me.json())["username"] == "alice"


async def test_a_revoked_key_stops_at_once_and_others_keys_are_not_found(
    client: TestClient,
) -> None:
    """DELETE gives 204 and the key is refused next request; another user's key id is 404."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    made = await make_key(client, alice, READ)
    resp = await client.delete(f"/api/v1/api-keys/{made['id']}", headers=auth_headers(bob))
    assert await error_of(resp) == (404, "not_found")
    assert (await client.get("/api/v1/tasks", headers=auth_headers(made["key"]))).status == 200
    resp = await client.delete(f"/api/v1/api-keys/{made['id']}", headers=auth_headers(alice))
    assert resp.status == 204
    resp = await client.get("/api/v1/tasks", headers=auth_headers(made["key"]))
    assert await error_of(resp) == (401, "invalid_token")
    listed = await (await client.get("/api/v1/api-keys", headers=auth_headers(alice))).json()
    assert listed == {"api_keys": []}
    resp = await client.delete(f"/api/v1/api-keys/{made['id']}", headers=auth_headers(alice))
    assert resp.status == 404


async def test_a_key_cannot_see_another_users_tasks(client: TestClient) -> None:
    """A key acts for its owner only: another user's task is 404, as for their token."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    bobs = await create_task(client, bob)
    key = (await make_key(client, alice, READ, WRITE))["key"]
    for resp in (
        await client.get(f"/api/v1/tasks/{bobs['id']}", headers=auth_headers(key)),
        await client.post(
            f"/api/v1/tasks/{bobs['id']}/progress", json={"progress": 1}, headers=auth_headers(key)
        ),
    ):
        assert await error_of(resp) == (404, "not_found")


async def test_a_key_opens_websockets_and_revoking_it_closes_them(client: TestClient) -> None:
    """A read key works as `?token=` and as a header; its sockets close 4401 on revoke."""
    token = await register(client, "alice")
    made = await make_key(client, token, READ)
    task = await create_task(client, token)
    by_query = await client.ws_connect(f"/api/v1/stock/ws/analyze/{task['id']}?token={made['key']}")
    snapshot = await by_query.receive_json(timeout=5)
    assert snapshot["type"] == "snapshot"
    by_header = await client.ws_connect("/api/v1/ws", headers=auth_headers(made["key"]))
    resp = await client.delete(f"/api/v1/api-keys/{made['id']}", headers=auth_headers(token))
    assert resp.status == 204
    for ws in (by_query, by_header):
        msg = await ws.receive(timeout=5)
        while msg.type is aiohttp.WSMsgType.TEXT:
            msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401
    write_only = (await make_key(client, token, WRITE))["key"]
    resp = await client.get("/api/v1/ws", headers=auth_headers(write_only))
    assert await error_of(resp) == (403, "insufficient_scope")


async def test_bad_key_requests_are_refused_clearly(client: TestClient) -> None:
    """Malformed or wrong keys are 401 invalid_token; bad bodies 422; nothing is stored."""
    token = await register(client, "alice")
    made = await make_key(client, token, READ)
    wrong_secret = made["key"][:-4] + ("AAAA" if not made["key"].endswith("AAAA") else "BBBB")
    for bad in ("pk_", "pk_zz_secret", f"pk_{made['id']}", wrong_secret, "st_" + "0" * 16 + "_x"):
        resp = await client.get("/api/v1/tasks", headers=auth_headers(bad))
        assert await error_of(resp) == (401, "invalid_token"), bad
    for body in (
        {},
        {"name": "n"},
        {"name": "n", "scopes": []},
        {"name": "n", "scopes": ["admin"]},
        {"name": "", "scopes": [READ]},
        {"name": "n" * 101, "scopes": [READ]},
        {"name": "n", "scopes": READ},
    ):
        resp = await client.post("/api/v1/api-keys", json=body, headers=auth_headers(token))
        assert await error_of(resp) == (422, "validation_error"), body
    listed = await (await client.get("/api/v1/api-keys", headers=auth_headers(token))).json()
    assert len(listed["api_keys"]) == 1


async def test_guessing_keys_is_rate_limited_per_address(
    aiohttp_client: Any, config: Config
) -> None:
    """Past --auth-rate wrong keys a minute, the address gets 429 before any lookup; a
    login token from it still works."""
    import dataclasses

    from server.web.app import create_app

    app = create_app(dataclasses.replace(config, auth_rate=5))
    client = await aiohttp_client(app)
    token = await register(client, "alice")
    statuses = []
    for n in range(12):
        resp = await client.get("/api/v1/tasks", headers=auth_headers(f"pk_{n:016x}_{'s' * 43}"))
        statuses.append(resp.status)
    # The burst of 5 is shared with register and login (2 of it used above).
    assert statuses == [401] * 3 + [429] * 9
    resp = await client.get("/api/v1/tasks", headers=auth_headers(token))
    assert resp.status == 200


async def test_a_user_holds_at_most_a_hundred_keys(client: TestClient) -> None:
    """The 101st live key is 429 quota_exceeded; revoking one makes room."""
    token = await register(client, "alice")
    made = await asyncio.gather(*(make_key(client, token, READ) for _ in range(100)))
    resp = await client.post(
        "/api/v1/api-keys", json={"name": "n", "scopes": [READ]}, headers=auth_headers(token)
    )
    assert await error_of(resp) == (429, "quota_exceeded")
    await client.delete(f"/api/v1/api-keys/{made[0]['id']}", headers=auth_headers(token))
    await make_key(client, token, READ)
