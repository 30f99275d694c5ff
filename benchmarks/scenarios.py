"""The seven scenarios (B1-B7). Each takes a Target and sizes, returns figures for one run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .clients import WorkerPool, WorkerSpec
from .targets import Target, cpu_seconds, rss_bytes

Figures = dict[str, Any]


@dataclass
class Sizes:
    workers: int = 2
    b1_subs: int = 1000
    b1_posts: int = 200
    b1_rate: float = 50
    b2_subs: int = 1000
    b2_posts: int = 500
    b2_producers: int = 4
    b3_tasks: int = 500
    b3_subs_per_task: int = 2
    b3_posts: int = 2000
    b3_producers: int = 4
    b4_conns: int = 5000
    b4_tasks: int = 100
    b5_normal: int = 200
    b5_stalled: int = 20
    b5_posts: int = 300
    b5_rate: float = 50
    b5_payload: int = 20 * 1024
    b6_producers: int = 50
    b6_posts_each: int = 100
    b7_subs: int = 1000
    b7_tasks: int = 100
    b7_rate: float = 100
    b7_seconds: float = 6
    # abuse: the well-behaved load, quiet and then beside the attackers (benchmarks/abuse.py)
    abuse_subs: int = 200
    abuse_users: int = 5
    abuse_tasks_per_user: int = 4
    abuse_posters: int = 4
    abuse_post_rate: float = 10.0  # posts per second per poster
    abuse_quiet_s: float = 20.0
    abuse_attack_s: float = 40.0
    abuse_idle: int = 2000  # idle raw TCP connections
    abuse_slowloris: int = 100
    abuse_slow_replayers: int = 20
    abuse_replay_history: int = 600  # 16 KiB events on the slow replayers' task beforehand
    abuse_flood_cap: int = 3000  # most requests of the hash flood
    abuse_flood_addresses: int = 8  # addresses the hash flood comes from, in turn
    abuse_job_cap: int = 3000  # most requests of the job loop
    abuse_big_cap: int = 200  # most requests of each 1 MiB / nested / emoji attack
    #: --header-timeout for the server (0: its default). The quick run is shorter than the
    #: default 20 s, so it lowers it to see idle connections closed.
    abuse_header_timeout: float = 0.0
    #: Attacker processes to run, comma-separated (benchmarks/attackers.py ATTACKERS:
    #: json_bombs, big_logins, hash_flood, socket_hoarding, idle, job_loop, slow_replay);
    #: empty: all of them.
    abuse_attacks: str = ""

    @classmethod
    def quick(cls) -> Sizes:
        """Tiny sizes for the CI smoke run."""
        return cls(
            b1_subs=20,
            b1_posts=20,
            b2_subs=20,
            b2_posts=40,
            b3_tasks=10,
            b3_posts=40,
            b4_conns=50,
            b4_tasks=5,
            b5_normal=10,
            b5_stalled=2,
            b5_posts=40,
            b5_payload=4096,
            b6_producers=5,
            b6_posts_each=20,
            b7_subs=20,
            b7_tasks=5,
            b7_rate=40,
            b7_seconds=2,
            abuse_subs=40,
            abuse_users=2,
            abuse_tasks_per_user=2,
            abuse_post_rate=5,
            abuse_quiet_s=4,
            abuse_attack_s=9,
            abuse_idle=300,
            abuse_slowloris=20,
            abuse_slow_replayers=4,
            abuse_replay_history=60,
            abuse_flood_cap=300,
            # Few enough that the flood outruns the per-address auth rate within 9 s.
            abuse_flood_addresses=2,
            # Past the default task-creation burst, so that a 429 can be seen in 9 s.
            abuse_job_cap=800,
            abuse_big_cap=30,
            abuse_header_timeout=4,
        )


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def split(items: list[Any], parts: int) -> list[list[Any]]:
    return [items[i::parts] for i in range(parts) if items[i::parts]]


def stamp(pad: int = 0) -> str:
    """The producer's send time, read back by clients to compute latency."""
    text = f"{time.monotonic():.6f}"
    return text + " " + "x" * pad if pad else text


#: Tasks started at once while preparing (the server's per-user lane holds 1,250).
PREPARE_SLICE = 500


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


async def _prepare(target: Target, task_count: int) -> list[str]:
    """Log in, create tasks, and move each to running (so later events are all progress)."""
    async with await _session() as session:
        await target.login(session)
        tasks = await target.create_tasks(session, task_count)
        if not target.is_reference:
            # In slices: thousands at once would pass the share of the commit queue one
            # user may hold, and be refused with 503 (as they should be).
            for start in range(0, len(tasks), PREPARE_SLICE):
                chunk = tasks[start : start + PREPARE_SLICE]
                await asyncio.gather(*(target.publish(session, t, "start", 0) for t in chunk))
        return tasks


def _pool(
    target: Target,
    assignments: list[list[str]],
    sizes: Sizes,
    expected: int,
    deadline: float,
    **extra: Any,
) -> WorkerPool:
    specs = [
        WorkerSpec(
            url=target.ws_url(),
            clients=chunk,
            expected_per_task=expected,
            deadline=deadline,
            port=target.port,
            **extra,
        )
        for chunk in split(assignments, sizes.workers)
    ]
    return WorkerPool(specs)


def _summarise(results: list[dict[str, Any]], server_cpu: float) -> Figures:
    latencies = [x for r in results for x in r["latencies"]]
    return {
        "received": sum(r["received"] for r in results),
        "lost": sum(r["expected"] - r["received"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        "dups": sum(r["dups"] for r in results),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": max(latencies) * 1000 if latencies else float("nan"),
        "client_cpu_s": sum(r["cpu_seconds"] for r in results),
        "server_cpu_s": server_cpu,
        "cpu_us_per_delivery": server_cpu / max(1, sum(r["received"] for r in results)) * 1e6,
    }


async def _paced(count: int, rate: float, post: Callable[[int], Awaitable[Any]]) -> None:
    """Call post(i) `count` times at `rate` per second (not waiting for answers to pace)."""
    start = time.monotonic()
    pending = []
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(post(i)))
    await asyncio.gather(*pending)


async def _burst(count: int, producers: int, post: Callable[[int], Awaitable[Any]]) -> None:
    """`producers` concurrent loops share `count` posts, each waiting for its answer."""
    counter = iter(range(count))

    async def loop() -> None:
        for i in counter:
            await post(i)

    await asyncio.gather(*(loop() for _ in range(producers)))


async def fanout_latency(target: Target, sizes: Sizes) -> Figures:
    """B1: 1 task, many subscribers, posts at a steady rate; delivery latency."""
    (task,) = await _prepare(target, 1)
    deadline = time.monotonic() + sizes.b1_posts / sizes.b1_rate + 120
    pool = _pool(target, [[task]] * sizes.b1_subs, sizes, sizes.b1_posts, deadline)
    pool.start()
    cpu0 = cpu_seconds(target.pid)
    async with await _session() as session:
        await _paced(
            sizes.b1_posts, sizes.b1_rate, lambda i: target.publish(session, task, stamp(), i % 100)
        )
    results = pool.collect()
    return _summarise(results, cpu_seconds(target.pid) - cpu0)


async def fanout_throughput(target: Target, sizes: Sizes) -> Figures:
    """B2: 1 task, many subscribers, posts as fast as a few producers can."""
    (task,) = await _prepare(target, 1)
    pool = _pool(target, [[task]] * sizes.b2_subs, sizes, sizes.b2_posts, time.monotonic() + 300)
    pool.start()
    cpu0 = cpu_seconds(target.pid)
    started = time.monotonic()
    async with await _session() as session:
        await _burst(
            sizes.b2_posts,
            sizes.b2_producers,
            lambda i: target.publish(session, task, stamp(), i % 100),
        )
    results = pool.collect()
    figures = _summarise(results, cpu_seconds(target.pid) - cpu0)
    finished = max(r["last_done_at"] or time.monotonic() for r in results)
    figures["deliveries_per_s"] = figures["received"] / (finished - started)
    return figures


async def many_tasks(target: Target, sizes: Sizes) -> Figures:
    """B3: many tasks with a couple of subscribers each; posts round-robin."""
    tasks = await _prepare(target, sizes.b3_tasks)
    per_task = sizes.b3_posts // len(tasks)
    assignments = [[t] for t in tasks for _ in range(sizes.b3_subs_per_task)]
    pool = _pool(target, assignments, sizes, per_task, time.monotonic() + 300)
    pool.start()
    cpu0 = cpu_seconds(target.pid)
    started = time.monotonic()
    async with await _session() as session:
        await _burst(
            per_task * len(tasks),
            sizes.b3_producers,
            lambda i: target.publish(session, tasks[i % len(tasks)], stamp(), i % 100),
        )
    results = pool.collect()
    figures = _summarise(results, cpu_seconds(target.pid) - cpu0)
    finished = max(r["last_done_at"] or time.monotonic() for r in results)
    figures["deliveries_per_s"] = figures["received"] / (finished - started)
    return figures


async def idle_connections(target: Target, sizes: Sizes) -> Figures:
    """B4: many open, subscribed, idle connections; memory per connection, connect rate."""
    tasks = await _prepare(target, sizes.b4_tasks)
    assignments = [[tasks[i % len(tasks)]] for i in range(sizes.b4_conns)]
    await asyncio.sleep(0.5)
    rss_before = rss_bytes(target.pid)
    pool = _pool(target, assignments, sizes, 0, time.monotonic() + 300, hold=True)
    started = time.monotonic()
    connect_times = pool.start(timeout=300)
    elapsed = max(connect_times) if connect_times else time.monotonic() - started
    await asyncio.sleep(1.0)  # let buffers settle
    rss_after = rss_bytes(target.pid)
    pool.stop.set()
    results = pool.collect()
    return {
        "connections": sizes.b4_conns,
        "rss_per_conn_kib": (rss_after - rss_before) / sizes.b4_conns / 1024,
        "rss_mib": rss_after / 2**20,
        "connects_per_s": sizes.b4_conns / elapsed,
        "connect_errors": sum(r["connect_errors"] for r in results),
    }


async def slow_consumers(target: Target, sizes: Sizes) -> Figures:
    """B5: normal subscribers beside some that never read, with large events."""
    (task,) = await _prepare(target, 1)
    deadline = time.monotonic() + sizes.b5_posts / sizes.b5_rate + 120
    path = "/ws" if target.is_reference else f"/api/v1/ws?token={target.token}"
    specs = [
        WorkerSpec(
            url=target.ws_url(),
            clients=chunk,
            expected_per_task=sizes.b5_posts,
            deadline=deadline,
            port=target.port,
            path=path,
            stalled_task=task,
            stalled=sizes.b5_stalled if i == 0 else 0,
        )
        for i, chunk in enumerate(split([[task]] * sizes.b5_normal, sizes.workers))
    ]
    pool = WorkerPool(specs)
    pool.start()
    rss_start = rss_bytes(target.pid)
    peak = rss_start
    cpu0 = cpu_seconds(target.pid)
    async with await _session() as session:

        async def post(i: int) -> None:
            nonlocal peak
            await target.publish(session, task, stamp(sizes.b5_payload), i % 100)
            peak = max(peak, rss_bytes(target.pid))

        await _paced(sizes.b5_posts, sizes.b5_rate, post)
    results = pool.collect()
    figures = _summarise(results, cpu_seconds(target.pid) - cpu0)
    figures["rss_growth_mib"] = (peak - rss_start) / 2**20
    figures["stalled_closed"] = sum(r["stalled_closed"] for r in results)
    figures["stalled"] = sizes.b5_stalled
    return figures


async def ingest(target: Target, sizes: Sizes) -> Figures:
    """B6: concurrent producers, one task each, no subscribers; committed events per second."""
    tasks = await _prepare(target, sizes.b6_producers)
    latencies: list[float] = []
    cpu0 = cpu_seconds(target.pid)
    async with await _session() as session:

        async def producer(task: str) -> None:
            for i in range(sizes.b6_posts_each):
                t0 = time.monotonic()
                await target.publish(session, task, "ingest", i % 100)
                latencies.append(time.monotonic() - t0)

        started = time.monotonic()
        await asyncio.gather(*(producer(t) for t in tasks))
        elapsed = time.monotonic() - started
    total = sizes.b6_producers * sizes.b6_posts_each
    server_cpu = cpu_seconds(target.pid) - cpu0
    return {
        "events": total,
        "events_per_s": total / elapsed,
        "post_p50_ms": percentile(latencies, 50) * 1000,
        "post_p99_ms": percentile(latencies, 99) * 1000,
        "server_cpu_s": server_cpu,
        "cpu_us_per_event": server_cpu / total * 1e6,
    }


def _task_seqs(db_path: str, tasks: list[str]) -> dict[str, int]:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute(
            f"SELECT id, seq FROM tasks WHERE id IN ({','.join('?' * len(tasks))})", tasks
        ).fetchall()
    return dict(rows)


async def restart_storm(target: Target, sizes: Sizes) -> Figures:
    """B7: subscribers across running tasks; the server restarts; all resume with last_seq."""
    tasks = await _prepare(target, sizes.b7_tasks)
    goal_fd, goal_file = tempfile.mkstemp(prefix="bench-goals-", suffix=".json")
    os.close(goal_fd)
    os.unlink(goal_file)
    assignments = [[tasks[i % len(tasks)]] for i in range(sizes.b7_subs)]
    pool = _pool(target, assignments, sizes, 0, time.monotonic() + 180, goal_file=goal_file)
    pool.start()
    stop_producing = asyncio.Event()
    acked = 0
    failed_posts = 0

    async def produce() -> None:
        nonlocal acked, failed_posts
        async with await _session() as session:
            i = 0
            while not stop_producing.is_set():
                task = tasks[i % len(tasks)]
                i += 1
                try:
                    await target.publish(session, task, stamp(), i % 100)
                    acked += 1
                except (aiohttp.ClientError, RuntimeError, OSError):
                    failed_posts += 1
                    await asyncio.sleep(0.05)
                await asyncio.sleep(1 / sizes.b7_rate)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(sizes.b7_seconds / 3)
    restart_at = time.monotonic()
    target.stop(signal.SIGTERM)
    db_path = str(target.db_dir / "bench.db")  # type: ignore[operator]
    checkpoint = _task_seqs(db_path, tasks)
    with open(goal_file + ".tmp", "w") as fh:
        json.dump({"checkpoint": checkpoint}, fh)
    os.replace(goal_file + ".tmp", goal_file)
    target.start()
    back_at = time.monotonic()
    await asyncio.sleep(sizes.b7_seconds * 2 / 3)
    stop_producing.set()
    await producer
    async with await _session() as session:
        final = {}
        for task in tasks:
            async with session.get(
                f"{target.base}/api/v1/tasks/{task}", headers=target.auth()
            ) as r:
                final[task] = (await r.json())["seq"]
    with open(goal_file + ".tmp", "w") as fh:
        json.dump({"checkpoint": checkpoint, "final": final}, fh)
    os.replace(goal_file + ".tmp", goal_file)
    results = pool.collect(timeout=240)
    os.unlink(goal_file)
    caught = [r["last_caught_up_at"] for r in results]
    return {
        "subscribers": sizes.b7_subs,
        "recovery_s": (max(caught) - restart_at)
        if all(c is not None for c in caught)
        else float("nan"),
        "server_down_s": back_at - restart_at,
        "gaps": sum(r["gaps"] for r in results),
        "gap_samples": [g for r in results for g in r["gap_samples"]][:10],
        "dups": sum(r["dups"] for r in results),
        "all_final": all(r["final_seq_ok"] for r in results),
        "reconnects": sum(r["reconnects"] for r in results),
        "shed_503": sum(r["shed"] for r in results),
        "connect_errors": sum(r["connect_errors"] for r in results),
        "acked_posts": acked,
        "failed_posts": failed_posts,
    }


SCENARIOS: dict[str, tuple[str, Callable[[Target, Sizes], Awaitable[Figures]], bool]] = {
    # id: (title, function, also run against the reference)
    "B1": ("fan-out latency", fanout_latency, True),
    "B2": ("fan-out throughput", fanout_throughput, True),
    "B3": ("many tasks", many_tasks, True),
    "B4": ("idle connections", idle_connections, True),
    "B5": ("slow consumers", slow_consumers, True),
    "B6": ("ingest", ingest, False),
    "B7": ("restart storm", restart_storm, False),
}


def median(values: list[float]) -> float:
    clean = [v for v in values if isinstance(v, int | float) and v == v]
    return statistics.median(clean) if clean else float("nan")
