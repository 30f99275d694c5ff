"""A parent's history, progress and rate survive a crash of the real server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from .helpers import PASSWORD, SECRET
from .server_process import ServerProcess, api


@pytest.fixture
async def server(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess(tmp_path, unused_tcp_port, tmp_path / "tree.db", ["--jwt-secret", SECRET])
    await proc.start()
    yield proc
    proc.close()


async def test_a_parent_replays_whole_across_a_sigkill_and_its_rate_goes_on(
    server: ServerProcess,
) -> None:
    """Children post before and after a SIGKILL: replaying the parent from 0 gives seqs
    1..N once, in order, each progress event naming its child, its progress the weighted
    mean; its rate, known before the crash, is still computed after it."""
    base = f"{server.base_url}/api/v1"
    creds = {"username": "alice", "password": PASSWORD}
    async with aiohttp.ClientSession() as http:
        await api(http, "POST", f"{base}/auth/register", json=creds, expect=201)
        token = (await api(http, "POST", f"{base}/auth/login", json=creds))["access_token"]

        async def post(path: str, body: Any, expect: int = 200) -> Any:
            return await api(http, "POST", f"{base}/{path}", token, json=body, expect=expect)

        parent = await post("tasks", {"kind": "batch", "auto_finish": True}, 201)
        heavy = await post("tasks", {"kind": "f", "parent_id": parent["id"], "weight": 3}, 201)
        light = await post("tasks", {"kind": "f", "parent_id": parent["id"]}, 201)
        for value in (10, 20, 30):
            await post(f"tasks/{heavy['id']}/progress", {"progress": value})
            await asyncio.sleep(0.6)  # a rate needs two updates over a second
        before = await api(http, "GET", f"{base}/tasks/{parent['id']}", token)
        assert before["rate"] is not None and before["progress"] == 22.5

        await server.kill_and_wait()
        await server.start()
        await asyncio.sleep(0.4)
        await post(f"tasks/{heavy['id']}/progress", {"progress": 60})
        after = await api(http, "GET", f"{base}/tasks/{parent['id']}", token)
        assert after["progress"] == 45 and after["rate"] is not None
        await post(f"tasks/{light['id']}/complete", {})
        await post(f"tasks/{heavy['id']}/complete", {})

    url = server.base_url.replace("http", "ws", 1) + "/api/v1/ws"
    got: list[dict[str, Any]] = []
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": parent["id"], "last_seq": 0}))
        async with asyncio.timeout(10):
            while not got or got[-1]["event"] != "completed":
                got.append(json.loads(await ws.recv()))
    assert [m["seq"] for m in got] == list(range(1, len(got) + 1))
    weights = {heavy["id"]: 3, light["id"]: 1}
    seen = dict.fromkeys(weights, 0.0)
    for message in got:
        if message["event"] == "progress":
            child = message["child"]
            seen[child["id"]] = child["progress"]
            mean = sum(seen[c] * w for c, w in weights.items()) / 4
            assert message["progress"] == pytest.approx(mean)
    assert got[-1]["status"] == "completed"
