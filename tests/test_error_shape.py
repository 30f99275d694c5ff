"""Every HTTP error is {"error": {"code", "message", "fields"}} as JSON: never HTML."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .helpers import PASSWORD, auth_headers, create_task, register

API = "/api/v1"


async def assert_error_shape(resp: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """`resp` has `status`, a JSON Content-Type and exactly the documented error body."""
    text = await resp.text()
    assert resp.status == status, text
    assert resp.content_type == "application/json", (resp.content_type, text)
    assert "<html" not in text.lower() and "Traceback" not in text
    body = await resp.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"code", "message", "fields"}
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["fields"], dict)
    if code is not None:
        assert error["code"] == code
    return error


async def test_401_missing_token(client):
    """401 for a missing token has the error shape."""
    await assert_error_shape(await client.get(f"{API}/auth/me"), 401, "missing_token")


async def test_401_bad_token(client):
    """401 for a garbage token has the error shape."""
    resp = await client.get(f"{API}/tasks", headers=auth_headers("garbage"))
    await assert_error_shape(resp, 401, "invalid_token")


async def test_401_wrong_password(client):
    """401 for wrong credentials has the error shape."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/login", json={"username": "alice", "password": "nope1234"}
    )
    await assert_error_shape(resp, 401, "invalid_credentials")


@pytest.mark.parametrize(
    "path", ["/nope", f"{API}/nope", f"{API}/tasks/x/y/z", f"{API}", f"{API}/auth"]
)
async def test_404_unknown_route(client, path):
    """An unknown route is a JSON 404, not aiohttp's HTML page."""
    await assert_error_shape(await client.get(path), 404, "not_found")


async def test_404_missing_task(client):
    """A missing task is a JSON 404."""
    token = await register(client, "alice")
    resp = await client.get(f"{API}/tasks/{'f' * 32}", headers=auth_headers(token))
    await assert_error_shape(resp, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", f"{API}/tasks"),
        ("DELETE", f"{API}/tasks/abc"),
        ("GET", f"{API}/auth/login"),
        ("GET", f"{API}/auth/register"),
        ("POST", f"{API}/auth/me"),
        ("PATCH", f"{API}/tasks/abc/progress"),
        ("POST", "/healthz"),
    ],
)
async def test_405_wrong_method(client, method, path):
    """A wrong method is a JSON 405 that still lists the allowed methods."""
    resp = await client.request(method, path)
    await assert_error_shape(resp, 405, "method_not_allowed")
    assert resp.headers.get("Allow")


async def test_409_duplicate_user(client):
    """409 for a taken username has the error shape and names the field."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    error = await assert_error_shape(resp, 409, "username_taken")
    assert "username" in error["fields"]


async def test_409_finished_task(client):
    """409 for an update to a finished task has the error shape."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await client.post(f"{API}/tasks/{task['id']}/cancel", headers=auth_headers(token))
    resp = await client.post(
        f"{API}/tasks/{task['id']}/progress", json={"progress": 1}, headers=auth_headers(token)
    )
    await assert_error_shape(resp, 409, "task_finished")


@pytest.fixture
async def small_client(aiohttp_client, make_app):
    """A client of an app that takes at most 1 KiB of request body."""
    return await aiohttp_client(
        make_app(max_body_bytes=1024), server_kwargs={"shutdown_timeout": 0.5}
    )


@pytest.mark.parametrize("size", [1025, 4096, 256 * 1024])
async def test_413_body_too_large(small_client, size):
    """A body over max_body_bytes is a JSON 413, and nothing is created."""
    body = {"username": "alice", "password": "p" * size}
    resp = await small_client.post(f"{API}/auth/register", json=body)
    await assert_error_shape(resp, 413, "payload_too_large")
    # The server still works and the user was not created.
    await register(small_client, "alice")


async def test_413_on_login_form(small_client):
    """An oversized OAuth2 form is a JSON 413 too."""
    resp = await small_client.post(
        f"{API}/auth/login", data={"username": "alice", "password": "p" * 2048}
    )
    await assert_error_shape(resp, 413, "payload_too_large")


async def test_413_chunked_body_without_length(small_client):
    """A chunked body (no Content-Length) over the limit is a JSON 413 and stores nothing."""
    token = await register(small_client, "alice")

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"kind": "x", "params": {"blob": "'
        for _ in range(8):
            yield b"a" * 512
        yield b'"}}'

    resp = await small_client.post(
        f"{API}/tasks",
        data=chunks(),
        headers={**auth_headers(token), "Content-Type": "application/json"},
    )
    await assert_error_shape(resp, 413, "payload_too_large")
    listed = await small_client.get(f"{API}/tasks", headers=auth_headers(token))
    assert (await listed.json())["tasks"] == []


async def test_413_on_progress_stores_nothing(small_client):
    """An oversized progress post is a JSON 413 and adds no event."""
    token = await register(small_client, "alice")
    task = await create_task(small_client, token)
    resp = await small_client.post(
        f"{API}/tasks/{task['id']}/progress",
        json={"progress": 5, "message": "m" * 2000},
        headers=auth_headers(token),
    )
    await assert_error_shape(resp, 413, "payload_too_large")
    events = await small_client.get(f"{API}/tasks/{task['id']}/events", headers=auth_headers(token))
    assert len((await events.json())["events"]) == 1


async def test_422_validation(client):
    """422 carries per-field messages as lists of strings."""
    resp = await client.post(f"{API}/auth/register", json={"username": "a", "password": "b"})
    error = await assert_error_shape(resp, 422, "validation_error")
    assert set(error["fields"]) == {"username", "password"}
    for messages in error["fields"].values():
        assert isinstance(messages, list) and all(isinstance(m, str) for m in messages)


async def test_422_nested_fields(client):
    """422 for a nested field (params.code) is still a dict of fields."""
    token = await register(client, "alice")
    resp = await client.post(
        f"{API}/tasks",
        json={"kind": "stock_analysis", "params": {"code": "??"}},
        headers=auth_headers(token),
    )
    error = await assert_error_shape(resp, 422, "validation_error")
    assert error["fields"]


async def test_422_bad_query(client):
    """422 for a bad query parameter has the error shape."""
    token = await register(client, "alice")
    resp = await client.get(f"{API}/tasks?status=nope", headers=auth_headers(token))
    error = await assert_error_shape(resp, 422, "validation_error")
    assert "status" in error["fields"]


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"", b"\x00\xff"])
async def test_400_invalid_json(client, raw):
    """400 for a body that is not a JSON object has the error shape."""
    resp = await client.post(
        f"{API}/auth/register", data=raw, headers={"Content-Type": "application/json"}
    )
    await assert_error_shape(resp, 400, "invalid_json")


async def test_400_invalid_json_html_accept(client):
    """Even a browser that asks for HTML gets JSON errors."""
    resp = await client.get("/nope", headers={"Accept": "text/html"})
    await assert_error_shape(resp, 404)
    resp = await client.post(
        f"{API}/auth/register",
        data=b"<html>",
        headers={"Accept": "text/html,*/*", "Content-Type": "text/html"},
    )
    await assert_error_shape(resp, 400, "invalid_json")
