"""Plain helpers for tests: register and log in, auth headers, WebSocket URLs, waiting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import ClientWebSocketResponse, WSMsgType
from aiohttp.test_utils import TestClient

SECRET = "test-secret-0123456789abcdef0123456789abcdef"
PASSWORD = "correct horse battery"
#: One unit of waiting in tests, in seconds; timeouts are multiples of it.
MS = 0.001
TIMEOUT = 5.0


def auth_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Create a user and return an access token for them."""
    resp = await client.post(
        "/api/v1/auth/register", json={"username": username, "password": password}
    )
    assert resp.status == 201, await resp.text()
    resp = await client.post(
        "/api/v1/auth/login", json={"username": username, "password": password}
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["access_token"]


async def create_task(
    client: TestClient, token: str, kind: str = "external", params: Any = None
) -> dict[str, Any]:
    resp = await client.post(
        "/api/v1/tasks", json={"kind": kind, "params": params or {}}, headers=auth_headers(token)
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def post_progress(
    client: TestClient, token: str, task_id: str, progress: float, **extra: Any
) -> int:
    resp = await client.post(
        f"/api/v1/tasks/{task_id}/progress",
        json={"progress": progress, **extra},
        headers=auth_headers(token),
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["seq"]


async def ws_connect(
    client: TestClient, token: str, path: str = "/api/v1/ws", **kwargs: Any
) -> ClientWebSocketResponse:
    return await client.ws_connect(path, headers=auth_headers(token), **kwargs)


async def receive_json(ws: ClientWebSocketResponse, timeout: float = TIMEOUT) -> dict[str, Any]:
    msg = await ws.receive(timeout=timeout)
    assert msg.type is WSMsgType.TEXT, f"expected text, got {msg.type} {msg.data!r}"
    return json.loads(msg.data)


async def receive_until(
    ws: ClientWebSocketResponse, done: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
) -> list[dict[str, Any]]:
    """Messages up to and including the first for which `done` is true."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while True:
            message = await receive_json(ws, timeout)
            got.append(message)
            if done(message):
                return got


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = TIMEOUT) -> None:
    """Poll `check` until it is true (fails after `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(10 * MS)
