"""Text that a store could not keep is refused up front, on every store alike."""

from __future__ import annotations

from aiohttp.test_utils import TestClient

from .helpers import auth_headers, create_task, register


async def test_a_nul_character_in_any_text_field_is_422_and_stores_nothing(
    client: TestClient,
) -> None:
    """step, message, error and a key's name with \\u0000: 422 naming the field (PostgreSQL's
    text type cannot hold it, so SQLite must not take it either)."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    base = f"/api/v1/tasks/{task['id']}"
    for path, body, field in (
        (f"{base}/progress", {"progress": 1, "step": "a\u0000b"}, "step"),
        (f"{base}/progress", {"progress": 1, "message": "\u0000"}, "message"),
        (f"{base}/fail", {"error": "bad\u0000"}, "error"),
        ("/api/v1/api-keys", {"name": "k\u0000", "scopes": ["tasks:read"]}, "name"),
    ):
        resp = await client.post(path, json=body, headers=auth_headers(token))
        error = (await resp.json())["error"]
        assert (resp.status, error["code"]) == (422, "validation_error"), path
        assert field in error["fields"], error
    got = await (await client.get(base, headers=auth_headers(token))).json()
    assert (got["seq"], got["status"]) == (1, "pending")
