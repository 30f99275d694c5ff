"""server/web/middleware.py: security headers on every response, the body deadline."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from websockets.asyncio.client import connect

from server.web.keys import metrics_key
from server.web.middleware import CONTENT_SECURITY_POLICY

from .helpers import TIMEOUT, register

HTML_ONLY = ("Content-Security-Policy", "X-Frame-Options", "Referrer-Policy")


async def test_the_page_gets_a_strict_policy(client: TestClient) -> None:
    """GET / (and its 304) carries the CSP, DENY framing, no referrer and nosniff."""
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for part in ("script-src 'self'", "frame-ancestors 'none'", "object-src 'none'"):
        assert part in resp.headers["Content-Security-Policy"]
    again = await client.get("/", headers={"If-Modified-Since": resp.headers["Last-Modified"]})
    assert again.status == 304
    assert again.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/static/js/app.js", 200),
        ("GET", "/static/css/app.css", 200),
        ("GET", "/healthz", 200),
        ("GET", "/api/v1/tasks", 401),
        ("GET", "/no/such/page", 404),
        ("DELETE", "/healthz", 405),
        ("POST", "/api/v1/auth/login", 400),
    ],
)
async def test_every_response_is_nosniff(
    client: TestClient, method: str, path: str, status: int
) -> None:
    """Assets, JSON answers and errors alike say nosniff; only HTML gets the page headers."""
    resp = await client.request(method, path, data=b"{" if method == "POST" else None)
    assert resp.status == status
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for name in HTML_ONLY:
        assert name not in resp.headers


async def test_websocket_upgrade_is_nosniff_too(client: TestClient) -> None:
    """The 101 of a WebSocket handshake carries the header as well."""
    token = await register(client, "upgrader")
    url = f"ws://{client.host}:{client.port}/api/v1/ws?token={token}"
    async with connect(url, proxy=None) as ws:
        assert ws.response.status_code == 101
        assert ws.response.headers["X-Content-Type-Options"] == "nosniff"


async def _raw(client: TestClient, data: bytes) -> bytes:
    """Send `data` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(data)
    await writer.drain()
    try:
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "partial",
    [
        b'Content-Length: 100\r\n\r\n{"username":',
        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"use\r\n',
    ],
    ids=["content-length", "chunked"],
)
async def test_unfinished_body_gets_408_and_is_dropped(
    aiohttp_client: Any, make_app: Any, partial: bytes
) -> None:
    """A body not finished within --header-timeout: 408 request_timeout, connection closed."""
    client = await aiohttp_client(make_app(header_timeout=0.2))
    head = b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = await _raw(client, head + partial)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 408 Request Timeout"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"Connection: close" in headers
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert client.app[metrics_key].refusals.counts["body_timeout"] == 1


async def test_bodies_on_time_and_too_large_are_unchanged(
    aiohttp_client: Any, make_app: Any
) -> None:
    """A whole body is read as before; an oversized one is still 413 payload_too_large."""
    client = await aiohttp_client(make_app(header_timeout=0.2, max_body_bytes=1024))
    creds = {"username": "on-time", "password": "x" * 20}
    resp = await client.post("/api/v1/auth/register", json=creds)
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/v1/auth/login", data=b"x" * 2048)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
