"""Slow consumers against the real server: clients that complete the WebSocket handshake and
then never read, next to normal clients, with more data than the kernel's socket buffers
hold (loopback autotunes up to ~4 MiB per socket).

The normal clients receive every event, in order, without waiting on the stalled ones; the
stalled ones are dropped with 4008 (seen in the server log); the server's memory stays
bounded; and the server really lets go of their sockets (aborted, not left ESTABLISHED
with a full buffer, as a plain close() would).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect

from .helpers import PASSWORD, SECRET, TIMEOUT
from .server_process import ServerProcess, api

NORMAL = 4
STALLED = 6
EVENTS = 600
#: Each progress message, in bytes (the schema allows up to 64 KiB).
MESSAGE_BYTES = 16 * 1024
#: The server's per-connection send limit (own queue + transport buffer), in bytes.
SEND_QUEUE_BYTES = 2 * 1024 * 1024
#: Allowed growth of the server's resident memory over the whole flood, in bytes.
RSS_GROWTH = 64 * 1024 * 1024
#: Concurrent HTTP producers (the tracker folds their posts into group commits).
PRODUCERS = 4
#: Bound on waiting for deliveries, drops and socket release, in seconds.
WAIT = 15.0


@pytest.fixture
def server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path,
        unused_tcp_port_factory(),
        tmp_path / "slow.db",
        [
            "--jwt-secret",
            SECRET,
            "--send-queue-bytes",
            str(SEND_QUEUE_BYTES),
            "--task-rate",
            "0",
            "--sqlite-synchronous",
            "NORMAL",
        ],
    )
    yield proc
    proc.close()


# -- what the server process holds --------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def established_sockets(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections to `port` whose socket is open in process `pid`."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:  # closed while we looked
            continue
        if match := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(match.group(1))
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if fields[3] == "01" and local_port == port and fields[9] in inodes:
                count += 1
    return count


def orphaned_sockets(port: int) -> int:
    """Sockets of `port` no process holds any more that still have data queued to send
    (FIN-WAIT-1/CLOSING with a send queue): the kernel memory a plain close leaves pinned."""
    count = 0
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            tx_queue = int(fields[4].split(":")[0], 16)
            if local_port == port and fields[3] in ("04", "0B") and tx_queue > 0:
                count += 1
    return count


# -- clients ------------------------------------------------------------------------------


def stalled_client(port: int, token: str, task_id: str, tiny_buffer: bool) -> socket.socket:
    """Complete a handshake on the per-task endpoint (subscribed on open), then never read.

    With `tiny_buffer` the receive buffer is shrunk before connecting, so the TCP window
    stays small and what the server sends piles up in its own buffers at once; without it,
    the kernels on both sides absorb what they can first, as with a browser tab that froze.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if tiny_buffer:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(TIMEOUT)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/v1/stock/ws/analyze/{task_id} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: leave everything after the head unread
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def read_all(ws: ClientConnection, received: list[int], last_seq: int) -> None:
    """A normal client: take every message; record event seqs until `last_seq`."""
    async for raw in ws:
        message = json.loads(raw)
        if message["type"] == "event":
            received.append(message["seq"])
            if message["seq"] >= last_seq:
                return


async def produce(
    http: aiohttp.ClientSession, server: ServerProcess, token: str, task_id: str, count: int
) -> None:
    url = f"{server.base_url}/api/v1/tasks/{task_id}/progress"
    for i in range(count):
        body = {"progress": i % 100, "message": f"{i:08d}".ljust(MESSAGE_BYTES, "x")}
        await api(http, "POST", url, token, json=body)


async def test_stalled_clients_are_dropped_and_normal_ones_get_everything(
    server: ServerProcess,
) -> None:
    """600 x 16 KiB: stalled peers get 4008 and are released; normal peers get all, in order."""
    await server.start()
    assert server.proc is not None
    pid = server.proc.pid
    async with aiohttp.ClientSession() as http:
        base = f"{server.base_url}/api/v1"
        creds = {"username": "watcher", "password": PASSWORD}
        await api(http, "POST", f"{base}/auth/register", json=creds, expect=201)
        token = (await api(http, "POST", f"{base}/auth/login", json=creds))["access_token"]
        task = await api(http, "POST", f"{base}/tasks", token, json={"kind": "x"}, expect=201)
        task_id = task["id"]

        headers = {"Authorization": f"Bearer {token}"}
        normal: list[ClientConnection] = []
        for i in range(NORMAL):
            if i % 2:
                url = f"{server.ws_url}/api/v1/stock/ws/analyze/{task_id}"
                ws = await connect(url, additional_headers=headers, proxy=None)
            else:
                ws = await connect(
                    f"{server.ws_url}/api/v1/ws", additional_headers=headers, proxy=None
                )
                await ws.send(json.dumps({"action": "subscribe", "task_id": task_id}))
            assert json.loads(await ws.recv())["type"] == "snapshot"
            normal.append(ws)
        stalled = [
            await asyncio.to_thread(stalled_client, server.port, token, task_id, i % 2 == 0)
            for i in range(STALLED)
        ]
        try:
            assert established_sockets(pid, server.port) >= NORMAL + STALLED
            rss_before = rss_bytes(pid)
            last_seq = 1 + 1 + EVENTS  # created, started, then the progress events
            received: list[list[int]] = [[] for _ in normal]
            readers = [
                asyncio.create_task(read_all(ws, got, last_seq))
                for ws, got in zip(normal, received, strict=True)
            ]
            peak = rss_before
            async with asyncio.timeout(WAIT * 2):
                share = EVENTS // PRODUCERS
                await asyncio.gather(
                    *(produce(http, server, token, task_id, share) for _ in range(PRODUCERS))
                )
                peak = max(peak, rss_bytes(pid))
                # Bounded wait, no timing assertion: the normal clients reach the last
                # event although the stalled ones never took a byte.
                async with asyncio.timeout(WAIT):
                    await asyncio.gather(*readers)
            for got in received:
                assert got == list(range(2, last_seq + 1)), (len(got), got[:3], got[-3:])

            async def dropped() -> bool:
                log = server.output()
                return (
                    log.count("ws.slow_consumer") >= STALLED and log.count("code=4008") >= STALLED
                )

            await eventually(dropped)
            # Dropped with a reset: what the kernel held for them is freed, not trickled out.
            await eventually(lambda: orphaned_sockets(server.port) == 0)
            # The server let go of the stalled sockets: only the normal clients remain.
            await http.close()  # and no idle keep-alive HTTP connections either
            await eventually(lambda: established_sockets(pid, server.port) == NORMAL)
            peak = max(peak, rss_bytes(pid))
            assert peak - rss_before < RSS_GROWTH, (rss_before, peak)

            async with aiohttp.ClientSession() as scraper:
                async with scraper.get(f"{server.base_url}/metrics") as resp:
                    metrics = await resp.text()
            assert f"progress_ws_slow_consumer_drops_total {float(STALLED)}" in metrics
            # The normal clients were never dropped and are still served.
            for ws in normal:
                await ws.send(json.dumps({"action": "ping", "id": "still-here"}))
                assert json.loads(await ws.recv()) == {"type": "pong", "id": "still-here"}
        finally:
            for sock in stalled:
                sock.close()
            for ws in normal:
                await ws.close()
    log = server.output()
    disconnects = [line for line in log.splitlines() if "ws.disconnect" in line]
    assert sum("code=4008" in line for line in disconnects) == STALLED, disconnects
    assert log.count("ws.slow_consumer") == STALLED
    assert "Traceback" not in log


async def eventually(check: Callable[[], Any], timeout: float = WAIT) -> None:
    """Poll `check` (sync or async) until true, at most `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)
