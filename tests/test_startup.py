"""server/process.py: the open-files limit, the single-instance lock and the collector, in real
processes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect

from server.config import Config
from server.process import FD_RESERVE, HTTP_SHARE, fit_open_files, raise_open_files_limit

from .helpers import PASSWORD, SECRET, TIMEOUT
from .server_process import RUN_PY, ServerProcess, api, clean_env

MakeServer = Callable[..., ServerProcess]


@pytest.fixture
def make_server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[MakeServer]:
    """ServerProcesses on free ports, all on one database; killed at teardown."""
    servers: list[ServerProcess] = []

    def make(*args: str) -> ServerProcess:
        log_dir = tmp_path / f"proc{len(servers)}"
        log_dir.mkdir()
        server = ServerProcess(
            log_dir,
            unused_tcp_port_factory(),
            tmp_path / "data" / "app.db",
            ["--jwt-secret", SECRET, *args],
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


def _limited(soft: int, hard: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return apply


# -- open files ----------------------------------------------------------------------------


def test_caps_that_fit_are_left_alone(caplog: pytest.LogCaptureFixture) -> None:
    """Caps under the open-files limit are kept, without a warning."""
    config = Config(max_http_connections=100, max_connections=50)
    assert fit_open_files(config) is config
    assert "server.fd_limit" not in caplog.text


def test_caps_over_the_limit_are_lowered_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Caps over the (raised) soft limit are lowered to it less the reserve, and logged once."""
    limit = raise_open_files_limit()
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[1] or limit >= 1 << 20
    config = Config(max_http_connections=limit + 5000, max_connections=limit + 1000)
    with caplog.at_level(logging.WARNING, logger="server.process"):
        fitted = fit_open_files(config)
    room = limit - FD_RESERVE
    # The settings left 4000 connections for plain HTTP; a fifth of the total at most.
    http_room = min(4000, room // HTTP_SHARE)
    assert (fitted.max_http_connections, fitted.max_connections) == (room, room - http_room)
    assert dataclasses.replace(fitted, max_http_connections=0, max_connections=0) == (
        dataclasses.replace(config, max_http_connections=0, max_connections=0)
    )
    (record,) = [r for r in caplog.records if "server.fd_limit" in r.getMessage()]
    assert record.levelno == logging.WARNING
    assert f"open_files={limit} reserve={FD_RESERVE} max_http_connections={room}" in (
        record.getMessage()
    )


async def test_low_open_files_limit_starts_with_a_warning_and_fits(
    tmp_path: Path, unused_tcp_port: int
) -> None:
    """Under a low limit (soft 100, hard 200) run.py raises the soft limit, lowers its caps
    with one WARNING (WebSockets to 4/5 of them), and refuses the connection past them
    with 503 instead of running out of descriptors."""
    port = unused_tcp_port
    log = tmp_path / "server.log"
    cmd = [sys.executable, str(RUN_PY), "--host", "127.0.0.1", "--port", str(port),
           "--db", str(tmp_path / "app.db"), "--jwt-secret", SECRET,
           "--max-http-connections", "24576", "--max-connections", "20000"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=clean_env(), preexec_fn=_limited(100, 200),
        )  # fmt: skip
    conns: list[asyncio.StreamWriter] = []
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_ready(proc, log)
        warnings = [line for line in log.read_text().splitlines() if "server.fd_limit" in line]
        assert len(warnings) == 1, log.read_text()
        room = 200 - FD_RESERVE
        assert "level=WARNING" in warnings[0]
        assert f"open_files=200 reserve={FD_RESERVE} max_http_connections={room}" in warnings[0]
        assert f"max_connections={room - room // HTTP_SHARE}" in warnings[0]
        assert "requested_http=24576 requested_ws=20000" in warnings[0]
        # room - 1 idle connections, then a keep-alive client in the last slot.
        for _ in range(room - 1):
            conns.append((await asyncio.open_connection("127.0.0.1", port))[1])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/metrics") as resp:
                text = await resp.text()
            assert re.search(rf"^progress_http_connections {room}\.0$", text, re.MULTILINE)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            conns.append(writer)
            async with asyncio.timeout(TIMEOUT):
                answer = await reader.read()
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "server_full"
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
    finally:
        for writer in conns:
            writer.close()
        proc.terminate()
        code = await asyncio.to_thread(proc.wait, TIMEOUT)
    assert code == 0
    output = log.read_text()
    assert "Traceback" not in output and "Too many open files" not in output


def test_a_limit_too_low_to_serve_is_refused(tmp_path: Path) -> None:
    """An open-files limit that leaves no room for connections: exit 2, one clear line."""
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "--port", "0", "--db", str(tmp_path / "app.db")],
        capture_output=True, text=True, timeout=30, env=clean_env({"JWT_SECRET": SECRET}),
        preexec_fn=_limited(70, 70),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("error: the open-files limit (70) leaves room for 6 connections")
    )
    assert not (tmp_path / "app.db").exists()


# -- the single-instance lock --------------------------------------------------------------


async def test_second_server_on_the_same_database_exits_3_and_touches_nothing(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """A second run.py on a database in use exits 3 naming the first's pid; the first's job,
    socket and subscription rows carry on untouched; after a SIGKILL the next start works."""
    first = make_server("--job-step-delay", "0.3")
    await first.start()
    base = f"{first.base_url}/api/v1"
    creds = {"username": "owner", "password": PASSWORD}
    await api(http, "POST", f"{base}/auth/register", json=creds, expect=201)
    token = (await api(http, "POST", f"{base}/auth/login", json=creds))["access_token"]
    body = {"code": "600519"}
    task = await api(http, "POST", f"{base}/stock/analyze", token, json=body, expect=201)
    db = first.db_path
    assert db is not None

    def open_rows() -> int:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            sql = "SELECT COUNT(*) FROM subscriptions WHERE unsubscribed_at IS NULL"
            return conn.execute(sql).fetchone()[0]

    headers = {"Authorization": f"Bearer {token}"}
    async with connect(f"{first.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task["id"], "last_seq": 0}))
        async with asyncio.timeout(TIMEOUT):
            while open_rows() == 0:  # the history is flushed every 0.5 s
                await asyncio.sleep(0.05)

        second = make_server("--job-step-delay", "0.01")
        proc = second.spawn()
        code = await asyncio.to_thread(proc.wait, TIMEOUT * 3)
        output = second.output()
        assert code == 3, output
        assert f"error: another server is using {db} (pid {first.proc.pid})" in output
        for event in ("server.ready", "migration.applied", "job.resume", "server.stopped"):
            assert event not in output
        assert open_rows() == 1

        events = []
        async with asyncio.timeout(TIMEOUT * 3):
            while not events or events[-1]["event"] != "completed":
                message = json.loads(await ws.recv())
                if message["type"] == "event":
                    events.append(message)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    steps = [e["step"] for e in events if e["event"] == "progress" and e["progress"] > 0]
    assert len(steps) == len(set(steps)), steps  # no step ran twice

    await first.kill_and_wait()
    await second.start()  # the kernel dropped the lock with the killed process
    me = await api(http, "GET", f"{second.base_url}/api/v1/auth/me", token)
    assert me["username"] == "owner"
    assert db.with_name(db.name + ".lock").read_text().strip() == str(second.proc.pid)


# -- helpers -------------------------------------------------------------------------------


async def _wait_ready(proc: subprocess.Popen[bytes], log: Path) -> None:
    async with asyncio.timeout(TIMEOUT * 3):
        while "server.ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            await asyncio.sleep(0.05)


def test_the_collector_is_tuned_for_many_long_lived_connections() -> None:
    """tune_garbage_collector (run once the server is up): what start-up built is frozen
    out of every later pass, and the young generation is collected every 10,000
    allocations, not 700; the older generations keep CPython's defaults."""
    script = (
        "import gc, json, sys; from server.process import tune_garbage_collector;"
        "before = gc.get_threshold(); tune_garbage_collector();"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=RUN_PY.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    before, after, frozen = json.loads(out)
    assert after == [10_000, before[1], before[2]]
    assert frozen > 1000  # the modules and objects imported so far
