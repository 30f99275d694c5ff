"""References: the fastest honest bare aiohttp fan-out, and the same with durable posts.

Clients send {"action": "subscribe", "task_id": T} and get {"type": "subscribed"}; POST
/publish/{task_id} with {"progress", "message"} serialises the event once, builds its
WebSocket frame once and writes it straight to each subscriber's transport (a subscriber
whose transport holds more than `--buffer-limit` unsent bytes is aborted). With
`--durable PATH` every post is first group-committed to SQLite (WAL, synchronous=FULL,
stdlib sqlite3 on one writer thread, one hand-off per batch) and answered after its
commit, then fanned out: what durable acknowledgement costs, without anything else the
server does. The server's figures are divided by these.

    python -m benchmarks.reference_server --port 8090 [--durable /tmp/ref.db]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import sqlite3
import struct
import threading
from collections import defaultdict

from aiohttp import WSMsgType, web

subscribers: defaultdict[str, dict[int, asyncio.Transport]] = defaultdict(dict)
committer_key: web.AppKey[Committer] = web.AppKey("committer")
seqs: defaultdict[str, int] = defaultdict(int)
BUFFER_LIMIT = 1 << 20


def frame(text: str) -> bytes:
    """An unmasked final text frame (RFC 6455 5.2)."""
    payload = text.encode()
    n = len(payload)
    head = (
        struct.pack("!BB", 0x81, n)
        if n < 126
        else struct.pack("!BBH", 0x81, 126, n)
        if n < 1 << 16
        else struct.pack("!BBQ", 0x81, 127, n)
    )
    return head + payload


def fan_out(task_id: str, data: bytes) -> None:
    watchers = subscribers[task_id]
    for key, transport in list(watchers.items()):
        if transport.get_write_buffer_size() > BUFFER_LIMIT:
            transport.abort()  # a slow consumer: dropped, as the server drops it
            del watchers[key]
        elif not transport.is_closing():
            transport.write(data)


class Committer:
    """Group commit on one thread: every post waiting when a transaction starts joins it."""

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting: queue.SimpleQueue[tuple[tuple[str, int, str], asyncio.Future[None]]]
        self._waiting = queue.SimpleQueue()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events (task_id TEXT, seq INTEGER, data TEXT,"
            " PRIMARY KEY (task_id, seq)) WITHOUT ROWID"
        )
        threading.Thread(target=self._run, daemon=True).start()

    def commit(self, row: tuple[str, int, str]) -> asyncio.Future[None]:
        done = self._loop.create_future()
        self._waiting.put((row, done))
        return done

    def _run(self) -> None:
        while True:
            batch = [self._waiting.get()]
            while not self._waiting.empty():
                batch.append(self._waiting.get_nowait())
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO events VALUES (?, ?, ?)", [r for r, _ in batch])
            self._db.execute("COMMIT")
            self._loop.call_soon_threadsafe(_resolve, [done for _, done in batch])


def _resolve(futures: list[asyncio.Future[None]]) -> None:
    for done in futures:
        if not done.done():
            done.set_result(None)


async def socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    transport = request.transport
    assert isinstance(transport, asyncio.Transport)
    joined: list[str] = []
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data.get("action") == "subscribe":
                    task_id = data["task_id"]
                    subscribers[task_id][id(ws)] = transport
                    joined.append(task_id)
                    reply = {"type": "subscribed", "task_id": task_id, "seq": seqs[task_id]}
                    transport.write(frame(json.dumps(reply)))
    finally:
        for task_id in joined:
            subscribers[task_id].pop(id(ws), None)
    return ws


async def publish(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    body = await request.json()
    seqs[task_id] += 1
    seq = seqs[task_id]
    event = {"type": "event", "task_id": task_id, "seq": seq, "event": "progress"}
    text = json.dumps({**event, "status": "running", **body})
    committer = request.app.get(committer_key)
    if committer is not None:
        await committer.commit((task_id, seq, text))  # acknowledged means committed
    fan_out(task_id, frame(text))
    return web.json_response({"seq": seq})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--durable", metavar="PATH", help="group-commit every post to SQLite")
    args = parser.parse_args()
    app = web.Application()

    async def start(app: web.Application) -> None:
        if args.durable:
            app[committer_key] = Committer(args.durable, asyncio.get_running_loop())

    app.on_startup.append(start)
    app.router.add_get("/ws", socket)
    app.router.add_post("/publish/{task_id}", publish)
    app.router.add_get("/healthz", lambda _: web.json_response({"status": "ok"}))
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
