"""Reference: a bare aiohttp WebSocket fan-out server. No auth, no database.

Clients send {"action": "subscribe", "task_id": T} and get {"type": "subscribed"};
POST /publish/{task_id} with {"progress", "message"} serialises the event once and queues
it to every subscriber; one writer task per connection sends it. This is what the bare
stack can do on this machine; the real server's figures are divided by these.

    python -m benchmarks.reference_server --port 8090
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import defaultdict

from aiohttp import WSMsgType, web

subscribers: defaultdict[str, set[asyncio.Queue[str]]] = defaultdict(set)
seqs: defaultdict[str, int] = defaultdict(int)


async def socket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    queue: asyncio.Queue[str] = asyncio.Queue()

    async def write() -> None:
        while True:
            await ws.send_str(await queue.get())

    writer = asyncio.create_task(write())
    joined: list[str] = []
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data.get("action") == "subscribe":
                    subscribers[data["task_id"]].add(queue)
                    joined.append(data["task_id"])
                    queue.put_nowait(
                        json.dumps(
                            {
                                "type": "subscribed",
                                "task_id": data["task_id"],
                                "seq": seqs[data["task_id"]],
                            }
                        )
                    )
    finally:
        writer.cancel()
        for task_id in joined:
            subscribers[task_id].discard(queue)
    return ws


async def publish(request: web.Request) -> web.Response:
    task_id = request.match_info["task_id"]
    body = await request.json()
    seqs[task_id] += 1
    data = json.dumps(
        {
            "type": "event",
            "task_id": task_id,
            "seq": seqs[task_id],
            "event": "progress",
            "status": "running",
            **body,
        }
    )
    for queue in subscribers[task_id]:
        queue.put_nowait(data)
    return web.json_response({"seq": seqs[task_id]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/ws", socket)
    app.router.add_post("/publish/{task_id}", publish)
    app.router.add_get("/healthz", lambda _: web.json_response({"status": "ok"}))
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
