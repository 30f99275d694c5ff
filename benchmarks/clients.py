"""Load-generating subscriber processes: many WebSocket clients per process.

Each worker process connects its clients, subscribes them, reports "ready", then counts
events: latency from the producer's timestamp (time.monotonic, system-wide on Linux) to
receipt, gaps and duplicates by seq. Clients reconnect with jittered backoff and resume
with last_seq when the server goes away (restart storm). Stalled clients are raw sockets
that complete the handshake, subscribe, and never read again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing as mp
import os
import random
import resource
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class WorkerSpec:
    url: str
    #: One entry per client: the task ids it subscribes to.
    clients: list[list[str]]
    #: Progress events each client must receive per task before it is done.
    expected_per_task: int
    deadline: float  # time.monotonic() after which the worker gives up
    #: Stay connected until told to stop (idle scenario), even with nothing expected.
    hold: bool = False
    stalled: int = 0  # extra raw clients that never read
    stalled_task: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    path: str = ""
    reconnect: bool = True
    #: JSON file {"checkpoint": {task: seq}, "final": {task: seq}} written by the orchestrator
    #: (restart storm): a client is caught up at the checkpoint seqs, done at the final ones.
    goal_file: str = ""
    #: Per client: its own URL (token of its own user) and handshake headers (a fake
    #: X-Forwarded-For address). Empty: every client uses `url` and no extra headers.
    urls: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: Also report each latency sample's send time and each disconnect (abuse scenario,
    #: which splits one run into phases).
    timeline: bool = False


@dataclass
class ClientState:
    tasks: list[str]
    index: int = 0
    last_seq: dict[str, int] = field(default_factory=dict)
    received: int = 0
    gaps: int = 0
    dups: int = 0
    reconnects: int = 0
    done_at: float | None = None
    caught_up_at: float | None = None


class Worker:
    def __init__(self, spec: WorkerSpec, stop: Any) -> None:
        self.spec = spec
        self.stop = stop
        self.latencies: list[float] = []
        self.connect_errors = 0
        self.shed = 0  # 503 answers to a handshake
        self.goals: dict[str, dict[str, int]] = {}
        #: The first few gaps seen, for diagnosis.
        self.gap_samples: list[dict[str, Any]] = []
        #: Send time of each latency sample (spec.timeline only), parallel to `latencies`.
        self.sent_at: list[float] = []
        #: (client index, time.monotonic(), close code) per connection the server ended.
        self.disconnects: list[tuple[int, float, int | None]] = []
        #: Error messages received ({"type": "error"}).
        self.error_messages = 0

    async def run(self, ready: Any) -> dict[str, Any]:
        spec = self.spec
        states = [ClientState(tasks, index=i) for i, tasks in enumerate(spec.clients)]
        started = time.monotonic()
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, connect=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            sockets = await self._connect_all(session, states)
            stalled = [self._stall_client() for _ in range(spec.stalled)]
            ready.put(("ready", os.getpid(), time.monotonic() - started))
            watcher = asyncio.create_task(self._watch_goals()) if spec.goal_file else None
            await asyncio.gather(
                *(
                    self._receive(session, ws, state)
                    for ws, state in zip(sockets, states, strict=True)
                )
            )
            if watcher is not None:
                watcher.cancel()
            stalled_closed = sum(1 for s in stalled if _closed_by_peer(s))
            for s in stalled:
                s.close()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        done = [s.done_at for s in states if s.done_at is not None]
        caught = [s.caught_up_at for s in states if s.caught_up_at is not None]
        return {
            "clients": len(states),
            # Results arrive in the order workers finish: the port says whose they are.
            "port": spec.port,
            "received": sum(s.received for s in states),
            "expected": sum(len(s.tasks) for s in states) * spec.expected_per_task,
            "gaps": sum(s.gaps for s in states),
            "dups": sum(s.dups for s in states),
            "reconnects": sum(s.reconnects for s in states),
            "incomplete": sum(1 for s in states if s.done_at is None)
            if spec.expected_per_task
            else 0,
            "last_done_at": max(done) if done else None,
            "last_caught_up_at": max(caught) if len(caught) == len(states) else None,
            "final_seq_ok": all(
                all(s.last_seq.get(t, -1) == self.goals.get("final", {}).get(t) for t in s.tasks)
                for s in states
            )
            if spec.goal_file
            else None,
            "latencies": self.latencies,
            "gap_samples": self.gap_samples,
            "connect_errors": self.connect_errors,
            "shed": self.shed,
            "stalled_closed": stalled_closed,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "sent_at": self.sent_at,
            "disconnects": self.disconnects,
            "error_messages": self.error_messages,
            "last_seqs": [s.last_seq for s in states],
        }

    async def _open(
        self, session: aiohttp.ClientSession, state: ClientState
    ) -> aiohttp.ClientWebSocketResponse:
        """Connect and subscribe (with last_seq once known), retrying with jittered backoff."""
        spec = self.spec
        url = spec.urls[state.index] if spec.urls else spec.url
        headers = spec.headers[state.index] if spec.headers else None
        attempt = 0
        while True:
            try:
                ws = await session.ws_connect(url, headers=headers, max_msg_size=0, heartbeat=None)
                for task_id in state.tasks:
                    message: dict[str, Any] = {"action": "subscribe", "task_id": task_id}
                    if task_id in state.last_seq:
                        message["last_seq"] = state.last_seq[task_id]
                    await ws.send_str(json.dumps(message))
                return ws
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 503:
                    self.shed += 1
                else:
                    self.connect_errors += 1
            except (aiohttp.ClientError, OSError):
                self.connect_errors += 1
            attempt += 1
            if time.monotonic() > self.spec.deadline:
                raise TimeoutError("could not connect before the deadline")
            if spec.hold and self.stop.is_set():  # a dead server must not keep us past stop
                raise TimeoutError("told to stop while reconnecting")
            await asyncio.sleep(random.uniform(0, min(2.0, 0.1 * 2**attempt)))

    async def _connect_all(
        self, session: aiohttp.ClientSession, states: list[ClientState]
    ) -> list[Any]:
        sockets: list[Any] = [None] * len(states)
        batch = 50
        for start in range(0, len(states), batch):
            chunk = range(start, min(start + batch, len(states)))
            opened = await asyncio.gather(*(self._open(session, states[i]) for i in chunk))
            for i, ws in zip(chunk, opened, strict=True):
                sockets[i] = ws
        # Wait for each subscription's first answer (snapshot / subscribed): it gives the seq.
        await asyncio.gather(
            *(self._await_subscribed(ws, st) for ws, st in zip(sockets, states, strict=True))
        )
        return sockets

    async def _await_subscribed(self, ws: Any, state: ClientState) -> None:
        pending = set(state.tasks)
        while pending:
            msg = await ws.receive()
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"subscribe failed: {msg.type} {msg.data}")
            data = json.loads(msg.data)
            if data["type"] == "snapshot":
                task_id, seq = data["task"]["id"], data["task"]["seq"]
            elif data["type"] == "subscribed":
                task_id, seq = data["task_id"], data["seq"]
            else:
                raise RuntimeError(f"unexpected {data}")
            state.last_seq[task_id] = seq
            pending.discard(task_id)

    async def _receive(self, session: aiohttp.ClientSession, ws: Any, state: ClientState) -> None:
        spec = self.spec
        goal = len(state.tasks) * spec.expected_per_task
        while True:
            if spec.goal_file:
                if self._reached("checkpoint", state) and state.caught_up_at is None:
                    state.caught_up_at = time.monotonic()
                if self._reached("final", state):
                    state.done_at = time.monotonic()
                    await ws.close()
                    return
            elif not spec.hold and state.received >= goal:
                state.done_at = state.done_at or time.monotonic()
                await ws.close()
                return
            if spec.hold and self.stop.is_set():
                await ws.close()
                return
            remaining = spec.deadline - time.monotonic()
            if remaining <= 0:
                await ws.close()
                return
            try:
                msg = await ws.receive(timeout=min(remaining, 0.5))
            except TimeoutError:
                continue
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._count(msg.data, state)
            elif msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.ERROR,
            ):
                if spec.timeline:
                    self.disconnects.append((state.index, time.monotonic(), ws.close_code))
                if not spec.reconnect:
                    return
                state.reconnects += 1
                try:
                    ws = await self._open(session, state)
                except TimeoutError:
                    return

    def _reached(self, name: str, state: ClientState) -> bool:
        goal = self.goals.get(name)
        return goal is not None and all(state.last_seq.get(t, -1) >= goal[t] for t in state.tasks)

    async def _watch_goals(self) -> None:
        mtime = 0.0
        while True:
            try:
                stat = os.stat(self.spec.goal_file)
                if stat.st_mtime != mtime:
                    mtime = stat.st_mtime
                    with open(self.spec.goal_file) as fh:
                        self.goals = json.load(fh)
            except (OSError, ValueError):
                pass
            await asyncio.sleep(0.1)

    def _count(self, text: str, state: ClientState) -> None:
        now = time.monotonic()
        data = json.loads(text)
        kind = data.get("type")
        if kind == "snapshot":  # recovered: false would land here; treat as a reset
            state.last_seq[data["task"]["id"]] = data["task"]["seq"]
            return
        if kind == "error":
            self.error_messages += 1
            return
        if kind != "event":
            return
        task_id, seq = data["task_id"], data["seq"]
        last = state.last_seq.get(task_id, 0)
        if seq <= last:
            state.dups += 1
            return
        if seq > last + 1:
            state.gaps += seq - last - 1
            if len(self.gap_samples) < 20:
                self.gap_samples.append(
                    {"task": task_id, "last": last, "seq": seq, "reconnects": state.reconnects}
                )
        state.last_seq[task_id] = seq
        if data.get("event") == "progress":
            state.received += 1
            try:
                sent = float(data["message"].split(" ", 1)[0])
            except (ValueError, AttributeError, KeyError):
                return
            self.latencies.append(now - sent)
            if self.spec.timeline:
                self.sent_at.append(sent)

    def _stall_client(self) -> socket.socket:
        """A raw client that subscribes and then never reads: its buffers fill up."""
        spec = self.spec
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((spec.host, spec.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                raise RuntimeError("stalled client: handshake refused")
            head += chunk
        payload = json.dumps({"action": "subscribe", "task_id": spec.stalled_task}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
        return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """True when the server has closed or reset the socket (drains what is readable)."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _worker_main(spec: WorkerSpec, ready: Any, results: Any, stop: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        result = asyncio.run(Worker(spec, stop).run(ready))
    except Exception as exc:  # report instead of hanging the orchestrator
        ready.put(("error", os.getpid(), repr(exc)))
        result = {"error": repr(exc)}
    results.put(result)


class WorkerPool:
    """Starts worker processes and collects their results."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = mp.get_context("fork")
        self.ready = ctx.Queue()
        self.results = ctx.Queue()
        self.stop = ctx.Event()
        self.procs = [
            ctx.Process(
                target=_worker_main, args=(s, self.ready, self.results, self.stop), daemon=True
            )
            for s in specs
        ]

    def start(self, timeout: float = 120) -> list[float]:
        """Start every worker; wait until all are connected; return their connect times."""
        for proc in self.procs:
            proc.start()
        times = []
        for _ in self.procs:
            kind, _pid, value = self.ready.get(timeout=timeout)
            if kind == "error":
                raise RuntimeError(f"worker failed: {value}")
            times.append(value)
        return times

    def collect(self, timeout: float = 300) -> list[dict[str, Any]]:
        results = [self.results.get(timeout=timeout) for _ in self.procs]
        for proc in self.procs:
            proc.join(5)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise RuntimeError(f"worker failed: {errors[0]}")
        return results
