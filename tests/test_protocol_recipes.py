"""The recipes of docs/protocol.md, extracted and run as written, against a real server
that is SIGKILLed and restarted while they run: workers store each step once and finish;
watchers print every seq once, in order, and end with the task."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .helpers import PASSWORD, SECRET
from .server_process import PROJECT_ROOT, ServerProcess, api, clean_env

DOC = PROJECT_ROOT / "docs" / "protocol.md"
RECIPE = re.compile(r"<!-- recipe: (\S+) -->\n```python\n(.*?)```", re.S)
#: Bound on one recipe's whole run, restarts included, in seconds.
DEADLINE = 60.0


def recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text(encoding="utf-8")))


def test_every_recipe_is_tested() -> None:
    """The document's recipes are exactly those this module runs."""
    assert set(recipes()) == {"sdk-worker", "sdk-watcher", "raw-worker", "raw-watcher"}


@pytest.fixture
async def server(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path,
        unused_tcp_port,
        tmp_path / "app.db",
        ["--jwt-secret", SECRET, "--password-hash-cost", "1", "--auth-rate", "0"],
    )
    await proc.start()
    yield proc
    proc.close()


async def key_for(server: ServerProcess, *scopes: str) -> tuple[str, str]:
    """A login token and an API key with `scopes` for a fresh user."""
    base = server.base_url
    creds = {"username": "alice", "password": PASSWORD}
    async with aiohttp.ClientSession() as http:
        await api(http, "POST", f"{base}/api/v1/auth/register", json=creds, expect=201)
        token = (await api(http, "POST", f"{base}/api/v1/auth/login", json=creds))["access_token"]
        made = await api(
            http,
            "POST",
            f"{base}/api/v1/api-keys",
            token,
            json={"name": "recipe", "scopes": list(scopes)},
            expect=201,
        )
    return token, made["key"]


async def run_recipe(
    tmp_path: Path, name: str, server: ServerProcess, key: str, *args: str
) -> asyncio.subprocess.Process:
    script = tmp_path / f"{name}.py"
    script.write_text(recipes()[name], encoding="utf-8")
    env = clean_env({"PROGRESS_URL": server.base_url, "PROGRESS_API_KEY": key})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )


async def restart(server: ServerProcess) -> None:
    """SIGKILL, then start again on the same port and database."""
    await server.kill_and_wait()
    await asyncio.sleep(0.3)
    await server.start()


async def events_of(server: ServerProcess, token: str, task_id: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        url = f"{server.base_url}/api/v1/tasks/{task_id}/events"
        return (await api(http, "GET", url, token))["events"]


@pytest.mark.parametrize("name", ["raw-worker", "sdk-worker"])
async def test_a_worker_recipe_survives_a_crash_and_stores_each_step_once(
    tmp_path: Path, server: ServerProcess, name: str
) -> None:
    """The worker is killed under (its server is), keeps going after the restart, and the
    task ends completed with gapless seqs and no update stored twice."""
    token, key = await key_for(server, "tasks:write")
    proc = await run_recipe(tmp_path, name, server, key)
    assert proc.stdout is not None and proc.stderr is not None
    async with asyncio.timeout(DEADLINE):
        task_id = (await proc.stdout.readline()).decode().strip()
        assert len(task_id) == 32, (task_id, await proc.stderr.read())
        await asyncio.sleep(0.6)  # a few updates in
        await restart(server)
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    events = await events_of(server, token, task_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "completed"
    progress = [e["progress"] for e in events if e["event"] == "progress"]
    assert progress == sorted(set(progress)), "an update was stored twice"
    if name == "raw-worker":  # every chunk reported, once
        messages = [e["message"] for e in events if e["event"] == "progress"]
        assert messages == [f"chunk {i}" for i in range(1, 21)]
        assert progress[-1] == 100


@pytest.mark.parametrize("name", ["raw-watcher", "sdk-watcher"])
async def test_a_watcher_recipe_sees_every_seq_once_across_a_crash(
    tmp_path: Path, server: ServerProcess, name: str
) -> None:
    """Posts before, during and after a SIGKILL restart: the watcher prints seqs 1..N once
    each, in order, and exits 0 after the task completes."""
    token, key = await key_for(server, "tasks:read")
    base = server.base_url
    async with aiohttp.ClientSession() as http:
        task = await api(
            http, "POST", f"{base}/api/v1/tasks", token, json={"kind": "job"}, expect=201
        )
        task_id = task["id"]
        proc = await run_recipe(tmp_path, name, server, key, task_id)
        assert proc.stdout is not None

        async def post(value: float) -> None:
            url = f"{base}/api/v1/tasks/{task_id}/progress"
            await api(http, "POST", url, token, json={"progress": value})

        lines: list[str] = []

        async def read_until(seq: int) -> None:
            assert proc.stdout is not None
            while not lines or not lines[-1].split()[0] == str(seq):
                line = (await proc.stdout.readline()).decode()
                assert line, f"watcher ended early: {lines}"
                lines.append(line.strip())

        async with asyncio.timeout(DEADLINE):
            for value in (10, 20, 30):
                await post(value)
            await read_until(5)  # created, started, 3 updates
            await restart(server)
            for value in (40, 50):
                await post(value)
            await restart(server)
            await api(http, "POST", f"{base}/api/v1/tasks/{task_id}/complete", token, json={})
            out, err = await proc.communicate()
    lines += out.decode().split("\n")
    seqs = [int(line.split()[0]) for line in lines if line.strip()]
    assert proc.returncode == 0, err.decode()
    assert seqs == list(range(1, 9)), lines
    assert lines[-1] == "" and "completed" in [ln for ln in lines if ln][-1]


def test_the_recipes_need_nothing_beyond_the_test_extra() -> None:
    """The raw recipes import only aiohttp and websockets (what a user installs)."""
    for name, code in recipes().items():
        imported = set(re.findall(r"^(?:from|import) (\w+)", code, re.M))
        allowed = {"asyncio", "json", "os", "random", "sys", "time", "uuid"}
        allowed |= {"aiohttp", "websockets", "progress_client"}
        assert imported <= allowed, (name, imported - allowed)
    assert os.path.exists(DOC)
