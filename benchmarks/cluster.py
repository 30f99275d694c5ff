"""B8 and B9: the server on PostgreSQL and Redis, on one node or on two.

One PostgreSQL and one Redis serve the whole benchmark run: the test suite's real servers
(tests/pg.py, tests/redis_server.py: free ports on 127.0.0.1, temporary folders,
PostgreSQL with fsync and synchronous commit on). Every run of a variant gets a fresh
database and nodes of its own (`run.py --store postgresql://… [--broker redis://…]
--node-id …`), stopped and dropped after it.

- B8: B1's paced fan-out, then B2's flat-out one (same sizes), with the subscribers
  spread over two nodes, against the same on one node on the same PostgreSQL and Redis.
  Every post goes to node a, which commits it, fans it out to its own subscribers and
  publishes it to Redis; node b gets it from Redis and fans it out to its subscribers.
  The one-node variant publishes to Redis all the same (nobody else listens), so the
  difference is the broker hop. Server CPU comes from /proc, per event on node a and per
  received event on node b; the broker's counters from each node's /metrics.
- B9: B6's ingest (the same producers and posts, one task each, no subscribers) into
  PostgreSQL on one node; the stored events are then counted in PostgreSQL itself.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .clients import WorkerPool, WorkerSpec
from .scenarios import Figures, Sizes, _burst, _paced, _prepare, _session, ingest, percentile, stamp
from .scenarios import _summarise as summarise_clients
from .targets import Target, cpu_seconds, free_port

#: Variants of B8 and how many nodes each runs; subscribers are spread evenly over them.
NODE_COUNTS = {"one_node": 1, "two_nodes": 2}
#: The marker of B9's posts, to count them in PostgreSQL.
INGEST_MESSAGE = "ingest"


def missing() -> str | None:
    """Why B8 and B9 cannot run on this machine, or None when they can."""
    try:
        from tests.pg import find_bin
        from tests.redis_server import find_redis_binary
    except ImportError as exc:  # tests/ needs pytest
        return f"{exc.name} is not installed (pip install -e '.[test]')"
    absent = []
    if find_bin() is None:
        absent.append("PostgreSQL's binaries (apt-get install postgresql)")
    if find_redis_binary() is None:
        absent.append("redis-server (apt-get install redis-server)")
    for module, extra in (("asyncpg", "postgres"), ("redis", "redis")):
        if importlib.util.find_spec(module) is None:
            absent.append(f"{module} (pip install -e '.[{extra}]')")
    return "missing " + ", ".join(absent) if absent else None


class Backing:
    """The benchmark run's PostgreSQL and Redis, started at first use; a database per run."""

    def __init__(self) -> None:
        #: tests.pg.PostgresServer and tests.redis_server.RedisServer once started.
        self.pg: Any = None
        self.redis: Any = None
        self._redis_dir: Path | None = None
        #: Databases created so far (names them).
        self._created = 0

    def start(self) -> None:
        if self.pg is not None:
            return
        from tests.pg import start_server
        from tests.redis_server import RedisServer, find_redis_binary

        self.pg = start_server()
        self._redis_dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.redis = RedisServer(self._redis_dir, free_port(), find_redis_binary())
        self.redis.start()

    def new_database(self) -> str:
        """An empty database (the first node migrates it); returns its name."""
        self._created += 1
        name = f"bench_{self._created}"
        self.pg.create_database(name)
        return name

    def url(self, database: str) -> str:
        return str(self.pg.url(database))

    def count(self, database: str, sql: str) -> int:
        """One number from PostgreSQL itself, read as its superuser (not through a node)."""
        return int(self.pg.psql(sql, database=database).strip())

    def drop_database(self, database: str) -> None:
        self.pg.drop_database(database)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of Redis and of PostgreSQL (the postmaster and its children)."""
        postmaster = int((self.pg.data / "postmaster.pid").read_text().split()[0])
        return {"redis": cpu_seconds(self.redis.proc.pid), "postgres": _tree_cpu(postmaster)}

    def close(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            from tests.pg import remove_server

            remove_server(self.pg)
        if self._redis_dir is not None:
            shutil.rmtree(self._redis_dir, ignore_errors=True)
        self.pg = self.redis = self._redis_dir = None


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state first)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def _tree_cpu(root: int) -> float:
    """CPU seconds of `root`, of its live children, and of its children that have exited.

    A backend that exits is counted whole (its lifetime in the parent's cutime); the pools'
    backends live as long as their node, so in a measuring window that is rare.
    """
    fields = _stat(root)
    ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == root:
            continue
        try:
            child = _stat(int(entry.name))
        except OSError:  # exited meanwhile
            continue
        if int(child[1]) == root:
            ticks += int(child[11]) + int(child[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Deployment:
    """The nodes of one run on their database."""

    #: Node a (which every post goes to) first.
    nodes: list[Target]
    backing: Backing
    database: str
    #: The nodes' names in figures: "a", "b", …
    names: list[str]


async def run_once(
    scenario: str, variant: str, args: list[str], sizes: Sizes, backing: Backing
) -> Figures:
    """Start the variant's nodes on a fresh database, run the scenario, stop and drop."""
    backing.start()
    database = backing.new_database()
    count = NODE_COUNTS.get(variant, 1)
    names = [chr(ord("a") + i) for i in range(count)]
    nodes = [
        Target(
            name="server",
            port=free_port(),
            extra_args=args,
            store=backing.url(database),
            # B9 measures the store: one node, the default in-memory broker.
            broker=backing.redis.url if scenario == "B8" else None,
            node_id=f"bench-{name}",
        )
        for name in names
    ]
    try:
        for node in nodes:  # one after the other: the first one migrates the database
            node.start()
        deployment = Deployment(nodes, backing, database, names)
        return await SCENARIOS[scenario][1](deployment, sizes)
    finally:
        for node in nodes:
            node.stop()
        backing.drop_database(database)


# -- B8 ---------------------------------------------------------------------------------


async def scrape(session: aiohttp.ClientSession, node: Target) -> dict[str, float]:
    """The node's /metrics samples that have no labels, by name."""
    async with session.get(f"{node.base}/metrics") as resp:
        text = await resp.text()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _spread(
    nodes: list[Target], task: str, subscribers: int, sizes: Sizes, expected: int, deadline: float
) -> WorkerPool:
    """Subscribers on `task`, evenly over the nodes; each worker process talks to one node."""
    workers = max(sizes.workers, len(nodes))
    specs = []
    for w in range(workers):
        node = nodes[w % len(nodes)]
        count = len(range(w, subscribers, workers))
        if count:
            specs.append(
                WorkerSpec(
                    url=node.ws_url(),
                    clients=[[task]] * count,
                    expected_per_task=expected,
                    deadline=deadline,
                    port=node.port,
                )
            )
    return WorkerPool(specs)


Drive = Callable[[Callable[[int], Awaitable[Any]]], Awaitable[None]]


async def _fanout_phase(
    dep: Deployment, subscribers: int, posts: int, drive: Drive, sizes: Sizes
) -> dict[str, Any]:
    """One task, subscribers over the nodes, `posts` posts to node a as `drive` paces them.

    Returns the clients' results, each node's CPU seconds and /metrics deltas, those of
    Redis and PostgreSQL, and when the posting started.
    """
    a = dep.nodes[0]
    (task,) = await _prepare(a, 1)
    for node in dep.nodes[1:]:
        node.token = a.token  # one user: any node accepts a token another node signed
    pool = _spread(dep.nodes, task, subscribers, sizes, posts, time.monotonic() + 300)
    pool.start()
    async with await _session() as session:
        before = [await scrape(session, node) for node in dep.nodes]
        cpu0 = [cpu_seconds(node.pid) for node in dep.nodes]
        backing0 = dep.backing.cpu()
        started = time.monotonic()
        await drive(lambda i: a.publish(session, task, stamp(), i % 100))
        # Every subscriber has had every event (or its deadline passed): the nodes are done.
        results = pool.collect()
        cpu = [cpu_seconds(node.pid) - c for node, c in zip(dep.nodes, cpu0, strict=True)]
        backing = {k: v - backing0[k] for k, v in dep.backing.cpu().items()}
        after = [await scrape(session, node) for node in dep.nodes]
    deltas = [
        {key: value - b.get(key, 0.0) for key, value in x.items()}
        for b, x in zip(before, after, strict=True)
    ]
    return {
        "results": results,
        "cpu": cpu,
        "backing_cpu": backing,
        "metrics": deltas,
        "started": started,
    }


def _per_node_p99(dep: Deployment, results: list[dict[str, Any]]) -> Figures:
    figures = {}
    for name, node in zip(dep.names, dep.nodes, strict=True):
        latencies = [x for r in results if r["port"] == node.port for x in r["latencies"]]
        figures[f"{name}_p99_ms"] = percentile(latencies, 99) * 1000
    return figures


def _us(seconds: float, count: float) -> float:
    return seconds / count * 1e6 if count else float("nan")


async def fanout_nodes(dep: Deployment, sizes: Sizes) -> Figures:
    """B8: B1's paced fan-out, then B2's flat-out one, subscribers spread over the nodes."""
    paced = await _fanout_phase(
        dep,
        sizes.b1_subs,
        sizes.b1_posts,
        lambda post: _paced(sizes.b1_posts, sizes.b1_rate, post),
        sizes,
    )
    burst = await _fanout_phase(
        dep,
        sizes.b2_subs,
        sizes.b2_posts,
        lambda post: _burst(sizes.b2_posts, sizes.b2_producers, post),
        sizes,
    )
    latency = summarise_clients(paced["results"], sum(paced["cpu"]))
    flat = summarise_clients(burst["results"], sum(burst["cpu"]))
    finished = max(r["last_done_at"] or time.monotonic() for r in burst["results"])
    figures: Figures = {
        "received": latency["received"] + flat["received"],
        "lost": latency["lost"] + flat["lost"],
        "gaps": latency["gaps"] + flat["gaps"],
        "dups": latency["dups"] + flat["dups"],
        "p50_ms": latency["p50_ms"],
        "p99_ms": latency["p99_ms"],
        "max_ms": latency["max_ms"],
        **(_per_node_p99(dep, paced["results"]) if len(dep.nodes) > 1 else {}),
        "deliveries_per_s": flat["received"] / (finished - burst["started"]),
        "flat_p99_ms": flat["p99_ms"],
    }
    # CPU per event: all nodes together, then each node on its own (node a per posted
    # event, the others per event received from the broker), paced and flat out.
    for label, phase, posts in (("paced_", paced, sizes.b1_posts), ("", burst, sizes.b2_posts)):
        figures[f"{label}cpu_us_per_event"] = _us(sum(phase["cpu"]), posts)
        if len(dep.nodes) == 1:
            continue
        for name, cpu, metrics in zip(dep.names, phase["cpu"], phase["metrics"], strict=True):
            if name == "a":
                figures[f"{label}a_cpu_us_per_event"] = _us(cpu, posts)
            else:
                received = metrics.get("progress_broker_received_total", 0.0)
                figures[f"{label}{name}_cpu_us_per_received"] = _us(cpu, received)
    for name, cpu, metrics in zip(dep.names, burst["cpu"], burst["metrics"], strict=True):
        deliveries = metrics.get("progress_fanout_messages_total", 0.0)
        figures[f"{name}_cpu_us_per_delivery"] = _us(cpu, deliveries)
    # Redis' own CPU is the rest of the broker's cost (PostgreSQL's is the commits).
    for service, seconds in burst["backing_cpu"].items():
        figures[f"{service}_cpu_us_per_event"] = _us(seconds, sizes.b2_posts)
    figures.update(_broker_figures(dep, [paced["metrics"], burst["metrics"]]))
    figures["client_cpu_s"] = latency["client_cpu_s"] + flat["client_cpu_s"]
    return figures


def _broker_figures(dep: Deployment, phases: list[list[dict[str, float]]]) -> Figures:
    """The broker's counters over both phases: node a's publishes, the others' receipts."""

    def total(node: int, key: str) -> float:
        return sum(phase[node].get(key, 0.0) for phase in phases)

    nodes = range(len(dep.nodes))
    lag = _us(
        total(0, "progress_broker_publish_lag_seconds_sum"),
        total(0, "progress_broker_publish_lag_seconds_count"),
    )
    return {
        "broker_published": total(0, "progress_broker_published_total"),
        "broker_received": sum(total(n, "progress_broker_received_total") for n in nodes[1:]),
        "broker_dropped": sum(total(n, "progress_broker_dropped_total") for n in nodes),
        "broker_reconnects": sum(total(n, "progress_broker_reconnects_total") for n in nodes),
        "gaps_repaired": sum(total(n, "progress_gaps_repaired_total") for n in nodes),
        "publish_lag_mean_ms": lag / 1000,
    }


# -- B9 ---------------------------------------------------------------------------------


async def ingest_postgres(dep: Deployment, sizes: Sizes) -> Figures:
    """B9: B6's ingest into PostgreSQL; then the committed events counted in PostgreSQL.

    PostgreSQL's CPU per event includes B6's setup (a task created and started per
    producer: 2 % of the default run's writes).
    """
    backing0 = dep.backing.cpu()
    figures = await ingest(dep.nodes[0], sizes)
    seconds = dep.backing.cpu()["postgres"] - backing0["postgres"]
    figures["postgres_cpu_us_per_event"] = _us(seconds, figures["events"])
    figures["stored"] = dep.backing.count(
        dep.database, f"SELECT count(*) FROM task_events WHERE message = '{INGEST_MESSAGE}'"
    )
    return figures


SCENARIOS: dict[str, tuple[str, Callable[[Deployment, Sizes], Awaitable[Figures]], bool]] = {
    # id: (title, function, also run against the reference: never, both need the store)
    "B8": ("fan-out over nodes (PostgreSQL + Redis)", fanout_nodes, False),
    "B9": ("ingest into PostgreSQL", ingest_postgres, False),
}


# -- targets ----------------------------------------------------------------------------


def _median(figures: dict[str, Any], key: str) -> float:
    return float(figures[key]["median"]) if key in figures else float("nan")


def _fmt(value: float) -> str:
    if value != value:
        return "nan"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def targets(sc: dict[str, Any]) -> list[str]:
    """Lines for run.py's summary: B8 and B9 correctness, and the figures side by side."""
    lines = []
    if "B8" in sc:
        for variant, figures in sc["B8"].items():
            worst = {k: max(figures[k]["runs"]) for k in ("lost", "gaps", "dups", "broker_dropped")}
            clean = not any(worst.values())
            if variant == "two_nodes":
                # Node b must have had from Redis every event node a published.
                published = figures["broker_published"]["runs"]
                received = figures["broker_received"]["runs"]
                unheard = max(p - r for p, r in zip(published, received, strict=True))
                worst["not_received_by_b"] = unheard
                clean = clean and unheard == 0
            counts = " ".join(f"{k} {v:g}" for k, v in worst.items())
            lines.append(f"target B8 {variant}: {counts} {'MET' if clean else 'MISSED'}")
        one, two = sc["B8"].get("one_node", {}), sc["B8"].get("two_nodes", {})
        if one and two:
            rate = _median(two, "deliveries_per_s") / _median(one, "deliveries_per_s")
            lines.append(
                f"B8 broker hop: deliveries/s {_fmt(_median(two, 'deliveries_per_s'))} on two "
                f"nodes vs {_fmt(_median(one, 'deliveries_per_s'))} on one ({rate:.2f}x); p99 "
                f"{_fmt(_median(two, 'a_p99_ms'))} ms on a, {_fmt(_median(two, 'b_p99_ms'))} ms "
                f"on b vs {_fmt(_median(one, 'p99_ms'))} ms; CPU per event "
                f"{_fmt(_median(two, 'a_cpu_us_per_event'))} us on a + "
                f"{_fmt(_median(two, 'b_cpu_us_per_received'))} us on b per received event = "
                f"{_fmt(_median(two, 'cpu_us_per_event'))} us vs "
                f"{_fmt(_median(one, 'cpu_us_per_event'))} us on one node"
            )
    if "B9" in sc:
        for variant, figures in sc["B9"].items():
            stored = zip(figures["events"]["runs"], figures["stored"]["runs"], strict=True)
            short = [e - s for e, s in stored]
            lines.append(
                f"target B9 {variant}: every acknowledged event stored in PostgreSQL "
                f"(missing at most {max(short)}) {'MET' if max(short) == 0 else 'MISSED'}"
            )
        pg = sc["B9"].get("server", {})
        lite = sc.get("B6", {}).get("server", {})
        if pg and lite:
            ratio = _median(pg, "events_per_s") / _median(lite, "events_per_s")
            lines.append(
                f"B9 vs B6: PostgreSQL {_fmt(_median(pg, 'events_per_s'))} events/s, post p50 "
                f"{_fmt(_median(pg, 'post_p50_ms'))} / p99 {_fmt(_median(pg, 'post_p99_ms'))} ms "
                f"vs SQLite {_fmt(_median(lite, 'events_per_s'))} events/s, "
                f"{_fmt(_median(lite, 'post_p50_ms'))} / {_fmt(_median(lite, 'post_p99_ms'))} ms "
                f"({ratio:.2f}x)"
            )
    return lines
