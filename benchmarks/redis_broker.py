"""The Redis broker alone: how many messages one publisher sustains, and its publish lag.

Starts its own redis-server (tests/redis_server.py) on a free port, then for each run:
node A publishes N messages with ~300-byte texts to node B (another RedisBroker, in this
process or in a child process), and reports

- saturated: A keeps its queue topped up (never past half the limit, so nothing drops):
  messages/s from the first publish() to the last acknowledgement, and to B's last
  delivery; publish lag (publish() → Redis' answer) p50/p99;
- paced: A publishes at fixed rates; publish lag p50/p99, and for the in-process receiver
  the publish() → deliver() latency.

    python -m benchmarks.redis_broker [--messages 20000] [--receiver process]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from server.broker import Message
from server.broker.redis import RedisBroker
from server.stats import Histogram
from tests.redis_server import RedisServer

TEXT_BYTES = 300


class RecordingHistogram(Histogram):
    """A Histogram that also keeps every value (for exact percentiles)."""

    def __init__(self) -> None:
        super().__init__(())
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def text_of(seq: int) -> str:
    head = {"type": "event", "task_id": f"task-{seq % 10}", "seq": seq, "event": "progress"}
    pad = TEXT_BYTES - len(json.dumps({**head, "data": {"message": ""}}))
    return json.dumps({**head, "data": {"message": "x" * max(0, pad)}})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _receive(url: str, count: int, ready: Any, done: Any) -> None:
    """Child process: a node B that counts deliveries and reports when it has `count`."""
    got = 0
    finished = asyncio.Event()

    def deliver(message: Message) -> None:
        nonlocal got
        got += 1
        if got == count:
            finished.set()

    broker = RedisBroker(url, "b")
    await broker.start(deliver, lambda: None)
    ready.set()
    await finished.wait()
    done.put(time.monotonic())
    await broker.close()


def _receiver_process(url: str, count: int, ready: Any, done: Any) -> None:
    asyncio.run(_receive(url, count, ready, done))


async def saturated(url: str, count: int, receiver: str) -> dict[str, Any]:
    a = RedisBroker(url, "a")
    lag = RecordingHistogram()
    a.stats.publish_lag = lag
    got = 0
    received = asyncio.Event()

    def deliver(message: Message) -> None:
        nonlocal got
        got += 1
        if got == count:
            received.set()

    b: RedisBroker | None = None
    proc = None
    if receiver == "process":
        ctx = mp.get_context("spawn")
        ready, done = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=_receiver_process, args=(url, count, ready, done))
        proc.start()
        await asyncio.to_thread(ready.wait, 30)
    else:
        b = RedisBroker(url, "b")
        await b.start(deliver, lambda: None)
    await a.start(lambda m: None, lambda: None)
    messages = [Message("a", f"task-{i % 10}", i, "progress", text_of(i)) for i in range(count)]
    limit = 5_000
    start = time.monotonic()
    i = 0
    while i < count:
        while i < count and a.queued < limit:
            a.publish(messages[i])
            i += 1
        await asyncio.sleep(0)
    while a.stats.published < count:
        await asyncio.sleep(0.001)
    acked = time.monotonic()
    if proc is not None:
        delivered = await asyncio.to_thread(done.get, True, 60)
        await asyncio.to_thread(proc.join, 30)
    else:
        await asyncio.wait_for(received.wait(), 60)
        delivered = time.monotonic()
    assert a.stats.dropped == 0, a.stats.dropped
    await a.close()
    if b is not None:
        await b.close()
    return {
        "messages": count,
        "published_per_s": round(count / (acked - start)),
        "delivered_per_s": round(count / (delivered - start)),
        "lag_p50_ms": round(percentile(lag.values, 0.5) * 1000, 2),
        "lag_p99_ms": round(percentile(lag.values, 0.99) * 1000, 2),
    }


async def paced(url: str, rate: int, seconds: float) -> dict[str, Any]:
    a = RedisBroker(url, "a")
    b = RedisBroker(url, "b")
    lag = RecordingHistogram()
    a.stats.publish_lag = lag
    sent_at: dict[int, float] = {}
    e2e: list[float] = []

    def deliver(message: Message) -> None:
        e2e.append(time.perf_counter() - sent_at.pop(message.seq))

    await b.start(deliver, lambda: None)
    await a.start(lambda m: None, lambda: None)
    count = int(rate * seconds)
    tick = 0.005  # publish in 5 ms steps: what a group commit does
    per_tick = max(1, round(rate * tick))
    start = time.perf_counter()
    seq = 0
    while seq < count:
        for _ in range(min(per_tick, count - seq)):
            sent_at[seq] = time.perf_counter()
            a.publish(Message("a", f"task-{seq % 10}", seq, "progress", text_of(seq)))
            seq += 1
        next_tick = start + (seq / per_tick) * tick
        await asyncio.sleep(max(0.0, next_tick - time.perf_counter()))
    while len(e2e) < count:
        await asyncio.sleep(0.001)
    await a.close()
    await b.close()
    return {
        "rate": rate,
        "messages": count,
        "lag_p50_ms": round(percentile(lag.values, 0.5) * 1000, 2),
        "lag_p99_ms": round(percentile(lag.values, 0.99) * 1000, 2),
        "e2e_p50_ms": round(percentile(e2e, 0.5) * 1000, 2),
        "e2e_p99_ms": round(percentile(e2e, 0.99) * 1000, 2),
        "e2e_mean_ms": round(statistics.fmean(e2e) * 1000, 2),
    }


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--receiver", choices=("same", "process", "both"), default="both")
    parser.add_argument("--rates", default="1000,5000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), free_port())
        server.start()
        try:
            receivers = ("same", "process") if args.receiver == "both" else (args.receiver,)
            for receiver in receivers:
                for _ in range(args.repeat):
                    result = await saturated(server.url, args.messages, receiver)
                    print(json.dumps({"run": "saturated", "receiver": receiver, **result}))
            for rate in (int(r) for r in args.rates.split(",")):
                result = await paced(server.url, rate, 3.0)
                print(json.dumps({"run": "paced", "receiver": "same", **result}))
        finally:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
