"""Shared by the SDK and CLI tests: real `run.py` servers, users, fast retry settings."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from progress_client import Backoff, WatchSettings

from .helpers import PASSWORD, SECRET
from .server_process import ServerProcess

#: Fast settings for a test server: cheap password hashes, no per-address login limit.
SERVER_ARGS = ["--jwt-secret", SECRET, "--password-hash-cost", "1", "--auth-rate", "0"]
#: Retries in tests: short waits, so a restart costs little time (the policy is the same).
FAST_BACKOFF = Backoff(initial=0.05, maximum=0.5)
FAST_WATCH = WatchSettings(backoff=Backoff(initial=0.05, maximum=0.5), reconnect_deadline=30)
#: Bound on anything a test waits for, in seconds.
WAIT = 30.0


@pytest.fixture
def make_server(
    tmp_path: Path, unused_tcp_port_factory: Callable[[], int]
) -> Iterator[Callable[..., ServerProcess]]:
    """make(*flags) -> a ServerProcess (not started) with SERVER_ARGS and `flags`."""
    servers: list[ServerProcess] = []

    def make(*flags: str) -> ServerProcess:
        folder = tmp_path / f"server{len(servers)}"
        folder.mkdir()
        server = ServerProcess(
            folder, unused_tcp_port_factory(), folder / "app.db", [*SERVER_ARGS, *flags]
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


async def register(base_url: str, username: str = "alice", password: str = PASSWORD) -> None:
    """Create a user on a running server."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base_url}/api/v1/auth/register", json={"username": username, "password": password}
        ) as resp:
            assert resp.status == 201, await resp.text()


async def login(base_url: str, username: str = "alice", password: str = PASSWORD) -> str:
    """An access token for the user."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{base_url}/api/v1/auth/login", json={"username": username, "password": password}
        ) as resp:
            body: dict[str, Any] = await resp.json()
            assert resp.status == 200, body
            return str(body["access_token"])


async def until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `check()` is true (fails after `timeout` seconds)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)
