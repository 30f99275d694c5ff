"""Inputs that used to crash a handler or pass unremarked: an unparseable Origin, a
non-UTF-8 metrics bearer, a JWT secret file others can read, file modes under umask 0,
and WebSocket handshake refusals logged one line each."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSServerHandshakeError

from server.auth import SecretFileError, load_or_create_secret
from server.web.keys import metrics_key
from server.web.ws import origin_allowed

from .helpers import TIMEOUT, register, ws_connect
from .server_process import RUN_PY, ServerProcess, clean_env

METRICS_TOKEN = "scrape-token-0123456789"


# -- Origin ----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", ["http://[", "http://[::1", "https://[zz]:80", "http://]"])
def test_unparseable_origins_are_not_allowed(origin: str) -> None:
    """An Origin urlsplit cannot parse is simply not allowed (it used to raise ValueError)."""
    assert origin_allowed(origin, "127.0.0.1:8080", "http", ("http://[",)) is False


async def test_unparseable_origin_gets_403_not_500(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A handshake with `Origin: http://[` is refused 403 origin_not_allowed, no traceback."""
    token = await register(client, "origin")
    with pytest.raises(WSServerHandshakeError) as info:
        await client.ws_connect(
            "/api/v1/ws", headers={"Authorization": f"Bearer {token}", "Origin": "http://["}
        )
    assert info.value.status == 403
    resp = await client.get("/api/v1/ws", headers={"Origin": "http://["})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- the metrics bearer ----------------------------------------------------------------


async def _raw_get(client: Any, path: str, authorization: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Authorization: " + authorization + b"\r\n\r\n"
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize(
    "bearer", [b"Bearer \xff\xfe", b"Bearer scrape-token-\xe90123", b"Bearer \xc3"]
)
async def test_non_utf8_metrics_bearer_is_401(
    aiohttp_client: Any, make_app: Any, bearer: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """With --metrics-token set, a bearer with bytes that are not UTF-8 is refused (401)."""
    client = await aiohttp_client(make_app(metrics_token=METRICS_TOKEN))
    answer = await _raw_get(client, "/metrics", bearer)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert b'"invalid_token"' in answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    good = await _raw_get(client, "/metrics", b"Bearer " + METRICS_TOKEN.encode())
    assert good.startswith(b"HTTP/1.1 200 ")


# -- the JWT secret file ----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "what"), [(0o644, "readable"), (0o640, "readable"),
                                            (0o604, "readable"), (0o620, "writable")])  # fmt: skip
def test_secret_file_open_to_others_is_refused(tmp_path: Path, mode: int, what: str) -> None:
    """A stored secret that group or others can read (or write) is not used."""
    path = tmp_path / "app.db.jwt-secret"
    path.write_text("a" * 64 + "\n")
    path.chmod(mode)
    with pytest.raises(SecretFileError) as info:
        load_or_create_secret(path)
    assert str(info.value) == f"{path} is {what} by others; chmod 600 {path}"
    assert path.read_text() == "a" * 64 + "\n"  # not replaced either
    path.chmod(0o600)
    assert load_or_create_secret(path) == "a" * 64


def test_run_py_refuses_to_start_with_a_readable_secret(tmp_path: Path) -> None:
    """run.py with a world-readable <db>.jwt-secret: exit 2, one clear line, no database."""
    db = tmp_path / "app.db"
    secret = tmp_path / "app.db.jwt-secret"
    secret.write_text("b" * 64 + "\n")
    secret.chmod(0o644)
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "--port", "0", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {secret} is readable by others; chmod 600 {secret}"
    )
    assert "Traceback" not in done.stderr
    assert not db.exists()


async def test_files_are_private_even_under_umask_0(tmp_path: Path, unused_tcp_port: int) -> None:
    """The database, its -wal and -shm, the generated secret and the lock file are 0600."""
    server = ServerProcess(tmp_path, unused_tcp_port, tmp_path / "data" / "app.db", [])
    umask = os.umask(0)  # inherited by the server process
    try:
        await server.start()
    finally:
        os.umask(umask)
    try:
        async with aiohttp.ClientSession() as http:  # a write, so the WAL exists
            body = {"username": "private", "password": "correct horse battery"}
            async with http.post(f"{server.base_url}/api/v1/auth/register", json=body) as resp:
                assert resp.status == 201
        names = ("app.db", "app.db-wal", "app.db-shm", "app.db.jwt-secret", "app.db.lock")
        modes = {n: stat.S_IMODE((tmp_path / "data" / n).stat().st_mode) for n in names}
        assert modes == dict.fromkeys(names, 0o600)
    finally:
        assert await server.stop() == 0


# -- WebSocket handshake refusals ----------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "reason", "status"),
    [
        ({"max_connections_per_user": 1}, "ws_too_many_connections", 429),
        ({"max_connections": 1}, "ws_server_full", 503),
    ],
)
async def test_handshake_refusals_are_counted_and_logged_once(
    aiohttp_client: Any,
    make_app: Any,
    caplog: pytest.LogCaptureFixture,
    settings: dict[str, int],
    reason: str,
    status: int,
) -> None:
    """Refused handshakes go through refusals.note: each counted, one log line per spell."""
    client = await aiohttp_client(make_app(**settings), server_kwargs={"shutdown_timeout": 0.5})
    token = await register(client, "many")
    caplog.set_level(logging.INFO)
    async with await ws_connect(client, token):
        for _ in range(5):
            with pytest.raises(WSServerHandshakeError) as info:
                await ws_connect(client, token)
            assert info.value.status == status
    metrics = client.app[metrics_key]
    assert metrics.refusals.counts[reason] == 5
    if status == 503:
        assert metrics.connections.handshakes_shed == 5
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if m.startswith("server.refused")] == [
        next(m for m in lines if m.startswith(f"server.refused reason={reason} count=1 "))
    ]
    assert not [m for m in lines if m.startswith(("ws.refused", "ws.shed"))]
