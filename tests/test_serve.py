"""server/web/serve.py against a real run.py: the TCP connection cap, header, body and
keep-alive timeouts, bind-before-start, and the server.ready line."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect

from .helpers import PASSWORD, SECRET, TIMEOUT
from .server_process import RUN_PY, ServerProcess, api, clean_env

MakeServer = Callable[..., ServerProcess]
#: Bound on waiting for the server to drop a connection, in seconds: generous against
#: the timeouts the tests set (1 s), far below those they would otherwise meet (60 s).
DROP_BOUND = 15.0


@pytest.fixture
def make_server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[MakeServer]:
    """ServerProcesses on free ports and a shared database; all killed at teardown."""
    servers: list[ServerProcess] = []

    def make(*args: str, port: int | None = None) -> ServerProcess:
        log_dir = tmp_path / f"proc{len(servers)}"
        log_dir.mkdir()
        server = ServerProcess(
            log_dir,
            port or unused_tcp_port_factory(),
            tmp_path / "data" / "app.db",
            ["--jwt-secret", SECRET, "--job-step-delay", "0.01", *args],
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# -- raw TCP clients -------------------------------------------------------------------


class Raw:
    """One raw TCP connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, server: ServerProcess) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Send; False once the server has closed the connection."""
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            return False
        return True

    async def read_all(self, timeout: float = DROP_BOUND) -> bytes:
        """Everything until the server closes (reset counts as closed)."""
        chunks = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except (ConnectionError, OSError):
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.writer.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def dribble(conn: Raw, first: bytes, stop: asyncio.Event) -> bool:
    """Send `first`, then one header byte every 0.2 s (never the blank line) until the
    server closes the connection (True) or `stop` is set (False)."""
    if not await conn.send(first):
        return True
    for byte in b"X-Slow: " + b"a" * 10_000:
        if stop.is_set():
            return False
        if not await conn.send(bytes([byte])):
            return True
        try:
            async with asyncio.timeout(0.2):
                if await conn.reader.read(1) == b"":
                    return True
        except TimeoutError:
            pass
        except (ConnectionError, OSError):
            return True
    return False


async def get_status(url: str) -> tuple[int, dict[str, Any]]:
    """One GET on a fresh connection (closed after), as a normal client would."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(url) as resp:
            return resp.status, await resp.json(content_type=None)


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in metrics"
    return float(match.group(1))


async def scrape(server: ServerProcess) -> str:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"{server.base_url}/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


# -- the connection cap and the timeouts ---------------------------------------------------


async def test_slow_clients_are_dropped_and_the_cap_refuses_the_excess(
    make_server: MakeServer,
) -> None:
    """Idle, dribbling and slow-body connections are dropped after --header-timeout; past
    --max-http-connections a connection gets 503 server_full at once; others are served."""
    cap = 8
    server = make_server(
        "--max-http-connections", str(cap), "--max-connections", "4",
        "--header-timeout", "1", "--keepalive-timeout", "60",
    )  # fmt: skip
    await server.start()
    stop = asyncio.Event()
    idle = [await Raw.open(server) for _ in range(3)]
    dribblers = [await Raw.open(server) for _ in range(3)]
    dribbling = [
        asyncio.create_task(dribble(c, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", stop))
        for c in dribblers
    ]
    slow_body = await Raw.open(server)
    await slow_body.send(
        b"POST /api/v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"username":'
    )
    async with aiohttp.ClientSession() as normal:  # keeps its connection: the 8th slot
        healthz = f"{server.base_url}/healthz"
        async with normal.get(healthz) as resp:
            assert resp.status == 200
            await resp.read()  # all of it, so the connection goes back to the pool
        # Full (the answer above means the 7 before it were accepted): a new connection is
        # answered at once, without sending anything.
        over = await Raw.open(server)
        status, headers, body = parse_response(await over.read_all(TIMEOUT))
        assert status == 503, (status, body)
        assert 2 <= int(headers["retry-after"]) <= 10
        assert headers["content-type"].startswith("application/json")
        assert headers["connection"] == "close"
        assert json.loads(body)["error"]["code"] == "server_full"
        # So is a new client that sends its request first.
        status, error = await get_status(healthz)
        assert (status, error["error"]["code"]) == (503, "server_full")
        # The client holding a slot is still served.
        async with normal.get(healthz) as resp:
            assert resp.status == 200
            await resp.read()  # all of it, so the connection goes back to the pool

        # Every slow connection is dropped, the dribblers while still dribbling.
        async with asyncio.timeout(DROP_BOUND):
            assert await asyncio.gather(*dribbling) == [True, True, True]
        for conn in idle:
            assert await conn.read_all() == b""
        status, headers, body = parse_response(await slow_body.read_all())
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"

        # The slots are free again.
        assert (await get_status(healthz))[0] == 200
        async with normal.get(f"{server.base_url}/metrics") as resp:
            text = await resp.text()
    assert metric(text, "progress_http_connections") == 1  # the normal client's
    assert metric(text, "progress_http_connections_limit") == cap
    assert metric(text, 'progress_refused_total{reason="http_connections"}') == 2
    assert metric(text, 'progress_refused_total{reason="header_timeout"}') == 6
    assert metric(text, 'progress_refused_total{reason="body_timeout"}') == 1
    stop.set()
    for conn in idle + dribblers + [slow_body, over]:
        conn.close()
    assert await server.stop() == 0
    output = server.output()
    assert "Traceback" not in output
    # Logged once per spell, not once per refusal.
    assert output.count("server.refused reason=http_connections") == 1


async def test_keepalive_and_head_deadline_on_a_kept_alive_connection(
    make_server: MakeServer,
) -> None:
    """An idle kept-alive connection is closed after --keepalive-timeout; one that starts
    its next request and dribbles it is closed after --header-timeout from its first byte."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    server = make_server("--keepalive-timeout", "1", "--header-timeout", "60")
    await server.start()
    kept = await Raw.open(server)
    await kept.send(request)
    head = await kept.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
    await kept.reader.readexactly(length)
    assert await kept.read_all() == b""  # closed by the keep-alive timeout
    kept.close()
    assert await server.stop() == 0

    server = make_server("--keepalive-timeout", "60", "--header-timeout", "1")
    await server.start()
    conn = await Raw.open(server)
    await conn.send(request)
    head = await conn.reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    await conn.reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
    stop = asyncio.Event()
    async with asyncio.timeout(DROP_BOUND):
        assert await dribble(conn, b"GET /healthz HTTP/1.1\r\n", stop) is True
    conn.close()
    assert await server.stop() == 0


async def test_a_busy_kept_alive_connection_outlives_many_head_deadlines(
    make_server: MakeServer,
) -> None:
    """The head deadline counts from each request's first byte: a client that sends one
    whole request after another on one connection, for several --header-timeout spans,
    is never closed by it (the one timer per connection is re-armed, not fired)."""
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    server = make_server("--keepalive-timeout", "60", "--header-timeout", "1")
    await server.start()
    conn = await Raw.open(server)
    for _ in range(12):  # 12 x 0.3 s: past three deadlines, and the jitter
        await conn.send(request)
        head = await conn.reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        await conn.reader.readexactly(int(re.search(rb"Content-Length: (\d+)", head).group(1)))
        await asyncio.sleep(0.3)
    stop = asyncio.Event()
    async with asyncio.timeout(DROP_BOUND):  # and a dribbled head is still cut off
        assert await dribble(conn, b"GET /healthz HTTP/1.1\r\n", stop) is True
    conn.close()
    assert await server.stop() == 0


async def test_websockets_count_against_the_tcp_cap(make_server: MakeServer) -> None:
    """Open WebSockets hold TCP slots and are never dropped by the head deadline."""
    server = make_server(
        "--max-http-connections", "3", "--max-connections", "3", "--header-timeout", "1"
    )
    await server.start()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        base = f"{server.base_url}/api/v1/auth"
        creds = {"username": "sock", "password": PASSWORD}
        await api(http, "POST", f"{base}/register", json=creds, expect=201)
        token = (await api(http, "POST", f"{base}/login", json=creds))["access_token"]
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{server.ws_url}/api/v1/ws"
    async with (
        connect(url, additional_headers=headers, proxy=None) as a,
        connect(url, additional_headers=headers, proxy=None) as b,
    ):
        await asyncio.sleep(1.5)  # past the head deadline: upgraded sockets are not touched
        for ws in (a, b):
            await ws.send(json.dumps({"action": "ping", "id": 1}))
            assert json.loads(await ws.recv()) == {"type": "pong", "id": 1}
        extra = await Raw.open(server)  # the 3rd slot
        await extra.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await extra.reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        over = await Raw.open(server)
        status, _, _ = parse_response(await over.read_all(TIMEOUT))
        assert status == 503
        extra.close()
        over.close()
    assert await server.stop() == 0


# -- bind first, then start ----------------------------------------------------------------


async def test_ready_names_the_real_url_with_port_zero(tmp_path: Path) -> None:
    """--port 0: server.ready names the port actually bound, and it serves there."""
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(RUN_PY), "--host", "127.0.0.1", "--port", "0",
             "--db", str(tmp_path / "app.db"), "--jwt-secret", SECRET],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=clean_env(),
        )  # fmt: skip
    try:
        async with asyncio.timeout(TIMEOUT * 3):
            while not (found := re.search(r"server\.ready url=(\S+) store=(\S+)", log.read_text())):
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.05)
        url, store = found.groups()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url) and not url.endswith(":0")
        assert store == f"sqlite:///{tmp_path / 'app.db'}"
        assert (await get_status(f"{url}/healthz"))[0] == 200
        assert "resumed_jobs=0" in log.read_text()
    finally:
        proc.terminate()
        assert proc.wait(TIMEOUT) == 0


def _files(db: Path) -> dict[str, bytes]:
    """The database file and its companions (-wal, -shm), not the lock file."""
    files = sorted(db.parent.glob(db.name + "*"))
    return {p.name: p.read_bytes() for p in files if not p.name.endswith(".lock")}


async def test_taken_port_leaves_database_jobs_and_subscriptions_alone(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """Port taken: exit 1 with one clear line, no server.ready, and not a byte of the
    database changed (the killed server's job and open subscription rows wait as they were)."""
    first = make_server("--job-step-delay", "1.0")
    await first.start()
    base = f"{first.base_url}/api/v1"
    creds = {"username": "owner", "password": PASSWORD}
    await api(http, "POST", f"{base}/auth/register", json=creds, expect=201)
    token = (await api(http, "POST", f"{base}/auth/login", json=creds))["access_token"]
    task = await api(
        http, "POST", f"{base}/stock/analyze", token, json={"code": "AAPL"}, expect=201
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(f"{first.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task["id"]}))
        await ws.recv()

        def open_rows() -> int:
            with sqlite3.connect(f"file:{first.db_path}?mode=ro", uri=True) as conn:
                sql = "SELECT COUNT(*) FROM subscriptions WHERE unsubscribed_at IS NULL"
                return conn.execute(sql).fetchone()[0]

        async with asyncio.timeout(TIMEOUT):
            while open_rows() == 0:  # the history is flushed every 0.5 s
                await asyncio.sleep(0.05)
        await first.kill_and_wait()  # mid-job, subscription open
    before = _files(first.db_path)
    assert first.db_path.name in before

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        second = make_server("--job-step-delay", "0.01", port=port)
        proc = second.spawn()
        code = await asyncio.to_thread(proc.wait, TIMEOUT * 3)
    output = second.output()
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    for event in ("server.ready", "migration.applied", "job.resume", "server.stopped"):
        assert event not in output
    assert "Traceback" not in output
    assert _files(first.db_path) == before

    # The next start on a free port picks the job and the rows up as a restart would.
    third = make_server("--job-step-delay", "0.01")
    await third.start()
    assert "resumed_jobs=1" in third.output()
    assert open_rows() == 0
