"""Idempotency-Key on every POST under /api/v1/tasks, and batch progress posts."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from server.config import Config
from server.idempotency import KEEP_SECONDS
from server.store.records import iso_time
from server.web.keys import retention_key

from .helpers import PASSWORD, SECRET, auth_headers, create_task, register
from .server_process import ServerProcess, api


async def post(
    client: TestClient, token: str, path: str, body: Any, key: str | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    headers = auth_headers(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    resp = await client.post(path, json=body, headers=headers)
    return resp.status, await resp.json(), resp


async def events_of(client: TestClient, token: str, task_id: str) -> list[dict[str, Any]]:
    resp = await client.get(f"/api/v1/tasks/{task_id}/events", headers=auth_headers(token))
    return (await resp.json())["events"]


async def test_a_retried_post_returns_the_first_answer_and_stores_nothing(
    client: TestClient,
) -> None:
    """Every POST: the same key again gives the same status and body, marked replayed."""
    token = await register(client, "alice")
    status, created, resp = await post(client, token, "/api/v1/tasks", {"kind": "x"}, "k-create")
    assert status == 201 and "Idempotent-Replayed" not in resp.headers
    again = await post(client, token, "/api/v1/tasks", {"kind": "x"}, "k-create")
    assert again[:2] == (201, created) and again[2].headers["Idempotent-Replayed"] == "true"
    task_id = created["id"]
    base = f"/api/v1/tasks/{task_id}"
    for path, body, key in (
        (f"{base}/progress", {"progress": 10}, "k-progress"),
        (f"{base}/progress", {"updates": [{"progress": 20}, {"progress": 30}]}, "k-batch"),
        (f"{base}/complete", {"result": {"n": 1}}, "k-complete"),
    ):
        first = await post(client, token, path, body, key)
        retry = await post(client, token, path, body, key)
        assert first[0] == 200 and retry[:2] == first[:2], path
        assert retry[2].headers["Idempotent-Replayed"] == "true"
    seqs = [e["seq"] for e in await events_of(client, token, task_id)]
    assert seqs == [1, 2, 3, 4, 5, 6]  # created, started, 10, 20, 30, completed
    tasks = await (await client.get("/api/v1/tasks", headers=auth_headers(token))).json()
    assert len(tasks["tasks"]) == 1


async def test_fail_and_cancel_are_idempotent_too(client: TestClient) -> None:
    """A retried fail or cancel answers its seq again instead of 409 task_finished."""
    token = await register(client, "alice")
    for action, body in (("fail", {"error": "boom"}), ("cancel", {})):
        task = await create_task(client, token)
        path = f"/api/v1/tasks/{task['id']}/{action}"
        first = await post(client, token, path, body, f"k-{action}")
        retry = await post(client, token, path, body, f"k-{action}")
        assert first[:2] == (200, {"seq": 2}) and retry[:2] == first[:2]
        fresh = await post(client, token, path, body, f"k-{action}-2")
        assert fresh[0] == 409 and fresh[1]["error"]["code"] == "task_finished"


async def test_a_key_reused_for_another_request_is_refused(client: TestClient) -> None:
    """Another body, another task or another action under the same key: 422."""
    token = await register(client, "alice")
    first = await create_task(client, token)
    second = await create_task(client, token)
    await post(client, token, f"/api/v1/tasks/{first['id']}/progress", {"progress": 1}, "k")
    for path, body in (
        (f"/api/v1/tasks/{first['id']}/progress", {"progress": 2}),
        (f"/api/v1/tasks/{second['id']}/progress", {"progress": 1}),
        (f"/api/v1/tasks/{first['id']}/complete", {}),
    ):
        status, body_, _ = await post(client, token, path, body, "k")
        assert (status, body_["error"]["code"]) == (422, "idempotency_key_reused"), path
    assert [e["seq"] for e in await events_of(client, token, first["id"])] == [1, 2, 3]
    assert [e["seq"] for e in await events_of(client, token, second["id"])] == [1]


async def test_the_same_body_written_differently_is_the_same_request(client: TestClient) -> None:
    """Key order and spacing do not matter: the parsed body is compared."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    headers = {**auth_headers(token), "Idempotency-Key": "k", "Content-Type": "application/json"}
    path = f"/api/v1/tasks/{task['id']}/progress"
    first = await client.post(path, data='{"progress": 5, "step": "a"}', headers=headers)
    retry = await client.post(path, data='{"step":"a","progress":5}', headers=headers)
    assert retry.status == 200 and retry.headers["Idempotent-Replayed"] == "true"
    assert await retry.json() == await first.json()


async def test_keys_belong_to_their_owner(client: TestClient) -> None:
    """Two users may use the same key: each gets their own answer."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    a = await post(client, alice, "/api/v1/tasks", {"kind": "x"}, "shared")
    b = await post(client, bob, "/api/v1/tasks", {"kind": "x"}, "shared")
    assert a[0] == b[0] == 201 and a[1]["id"] != b[1]["id"]
    assert "Idempotent-Replayed" not in b[2].headers


async def test_a_refused_request_is_not_remembered(client: TestClient) -> None:
    """A 404 or 422 under a key stores no answer: the corrected retry is acted on."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    path = f"/api/v1/tasks/{task['id']}/progress"
    assert (await post(client, token, path, {"progress": 500}, "k"))[0] == 422
    missing = await post(
        client, token, "/api/v1/tasks/" + "0" * 32 + "/progress", {"progress": 1}, "k2"
    )
    assert missing[0] == 404
    assert (await post(client, token, path, {"progress": 50}, "k"))[:2] == (200, {"seq": 3})


async def test_bad_keys_are_refused(client: TestClient) -> None:
    """An empty, too long or non-printable key is 422 naming Idempotency-Key."""
    token = await register(client, "alice")
    for key in ("", "x" * 256, "tab\there", "caf\u00e9"):
        headers = {**auth_headers(token), "Idempotency-Key": key}
        resp = await client.post("/api/v1/tasks", json={"kind": "x"}, headers=headers)
        body = await resp.json()
        assert resp.status == 422 and "Idempotency-Key" in body["error"]["fields"], repr(key)
    assert (await post(client, token, "/api/v1/tasks", {"kind": "x"}, "x" * 255))[0] == 201


async def test_concurrent_retries_act_once(client: TestClient) -> None:
    """Ten copies of one post at once (one batch or several): one event, ten equal answers."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    path = f"/api/v1/tasks/{task['id']}/progress"
    answers = await asyncio.gather(
        *(post(client, token, path, {"progress": 7}, "same") for _ in range(10))
    )
    assert {(status, body["seq"]) for status, body, _ in answers} == {(200, 3)}
    assert sum(1 for *_, r in answers if "Idempotent-Replayed" in r.headers) == 9
    assert [e["seq"] for e in await events_of(client, token, task["id"])] == [1, 2, 3]


async def test_answers_are_kept_a_day_then_purged_by_retention(
    client: TestClient, config: Config
) -> None:
    """An answer older than 24 h is deleted by retention and no longer replayed."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    path = f"/api/v1/tasks/{task['id']}/progress"
    await post(client, token, path, {"progress": 1}, "old")
    await post(client, token, path, {"progress": 2}, "new")
    day_ago = iso_time(time.time() - KEEP_SECONDS - 60)
    with sqlite3.connect(config.db_path) as db:
        db.execute("UPDATE idempotency_keys SET created_at = ? WHERE key = 'old'", (day_ago,))
    report = await client.app[retention_key].run_once()
    assert report.grants_deleted == 1
    with sqlite3.connect(config.db_path) as db:
        keys = [row[0] for row in db.execute("SELECT key FROM idempotency_keys")]
    assert keys == ["new"]
    status, body, resp = await post(client, token, path, {"progress": 1}, "old")
    assert status == 200 and body["seq"] == 5 and "Idempotent-Replayed" not in resp.headers


# -- batch progress --------------------------------------------------------------------


async def test_a_batch_is_stored_as_consecutive_seqs(client: TestClient) -> None:
    """{"updates": [...]}: one transaction, seqs in order, answer {seq, first_seq}."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    updates = [{"progress": p, "step": f"s{p}", "message": f"m{p}"} for p in (10, 20, 30)]
    status, body, _ = await post(
        client, token, f"/api/v1/tasks/{task['id']}/progress", {"updates": updates}
    )
    assert (status, body) == (200, {"seq": 5, "first_seq": 3})  # 2 is `started`
    events = await events_of(client, token, task["id"])
    assert [(e["seq"], e["event"], e["progress"], e["step"], e["message"]) for e in events] == [
        (1, "created", 0, None, None),
        (2, "started", 0, None, None),
        (3, "progress", 10, "s10", "m10"),
        (4, "progress", 20, "s20", "m20"),
        (5, "progress", 30, "s30", "m30"),
    ]
    got = await (
        await client.get(f"/api/v1/tasks/{task['id']}", headers=auth_headers(token))
    ).json()
    assert (got["progress"], got["step"], got["message"], got["seq"]) == (30, "s30", "m30", 5)


async def test_a_batch_with_one_bad_item_stores_nothing(client: TestClient) -> None:
    """One invalid update: 422 naming it, and no event at all; more than 100 or none: 422."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    path = f"/api/v1/tasks/{task['id']}/progress"
    bad = [{"progress": 10}, {"progress": 101}, {"progress": 30}]
    status, body, _ = await post(client, token, path, {"updates": bad})
    assert status == 422 and "1" in body["error"]["fields"]["updates"]
    for updates in ([], [{"progress": 1}] * 101, "x", [1]):
        assert (await post(client, token, path, {"updates": updates}))[0] == 422
    assert [e["seq"] for e in await events_of(client, token, task["id"])] == [1]
    assert (await post(client, token, path, {"updates": [{"progress": 1}] * 100}))[1] == {
        "seq": 102,
        "first_seq": 3,
    }


async def test_a_batch_on_a_finished_task_is_refused_whole(client: TestClient) -> None:
    """409 task_finished and nothing stored."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post(client, token, f"/api/v1/tasks/{task['id']}/complete", {})
    status, body, _ = await post(
        client, token, f"/api/v1/tasks/{task['id']}/progress", {"updates": [{"progress": 5}]}
    )
    assert (status, body["error"]["code"]) == (409, "task_finished")


# -- across a crash ----------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path, unused_tcp_port_factory(), tmp_path / "idem.db", ["--jwt-secret", SECRET]
    )
    yield proc
    proc.close()


async def test_a_retry_after_sigkill_is_answered_from_the_database(server: ServerProcess) -> None:
    """Post, SIGKILL the server, restart, retry with the same key: replayed, one event."""
    await server.start()
    base = server.base_url
    async with aiohttp.ClientSession() as http:
        creds = {"username": "alice", "password": PASSWORD}
        await api(http, "POST", f"{base}/api/v1/auth/register", json=creds, expect=201)
        token = (await api(http, "POST", f"{base}/api/v1/auth/login", json=creds))["access_token"]
        task = await api(
            http, "POST", f"{base}/api/v1/tasks", token, json={"kind": "x"}, expect=201
        )
        path = f"{base}/api/v1/tasks/{task['id']}/progress"
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": "after-crash"}
        async with http.post(path, json={"progress": 42}, headers=headers) as resp:
            first = await resp.json()
        await server.kill_and_wait()
        await server.start()
        async with http.post(path, json={"progress": 42}, headers=headers) as resp:
            assert resp.status == 200 and resp.headers["Idempotent-Replayed"] == "true"
            assert await resp.json() == first
        events = await api(http, "GET", f"{base}/api/v1/tasks/{task['id']}/events", token)
        assert [e["seq"] for e in events["events"]] == [1, 2, 3]
