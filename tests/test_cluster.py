"""Several nodes: real `run.py` processes sharing one PostgreSQL and one Redis.

Each test starts two or three nodes at once on a fresh database (and a Redis of its own),
then checks what a user relies on: every subscriber, on whichever node and over either
endpoint, receives its task's seqs 1..N exactly once, in order, with the stored contents;
every acknowledged post is among them; `GET .../events` is the same on every node; and
crashes and outages (a node SIGKILLed, Redis killed, PostgreSQL restarted, a node dying in
the middle of a built-in job) change none of that.

Retention running on one node at a time is proven by the store's contract suite
(`test_exclusive_is_held_by_one_holder_at_a_time` on PostgreSQL: two Backends, as two
nodes, and the advisory lock grants "retention" to one); `Retention._loop` runs each
pass under that lock, and nothing a client sees from outside tells a skipped turn from a
run that found nothing to delete, so no process test here repeats it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from .helpers import PASSWORD, SECRET
from .pg import PostgresServer, pg_server, pg_template, pg_url  # noqa: F401
from .redis_server import RedisServer, redis_server  # noqa: F401
from .server_process import ServerProcess, api

#: Every node's flags besides --store/--broker/--node-id: one JWT secret everywhere, and no
#: per-user limit in the way (these tests are about delivery, not throttling), as the
#: benchmarks and the chaos test lift them.
NODE_ARGS = [
    "--jwt-secret", SECRET,
    "--task-rate", "0",
    "--task-create-rate", "0",
    "--ws-rate", "0",
    "--max-connections-per-user", "0",
    "--max-events-per-task", "0",
    "--shutdown-timeout", "0.5",
]  # fmt: skip
#: Bound on each phase of a test (posting, catching up, a takeover), in seconds.
DEADLINE = 30.0
#: Seconds one HTTP request may take before it counts as failed.
REQUEST_TIMEOUT = 5.0
#: Pause before retrying after a refused or failed request, in seconds.
RETRY_PAUSE = 0.05
TERMINAL = ("completed", "failed", "cancelled")
#: The built-in job's finished steps, in order (server/jobs/stock.py STEPS, the report
#: step ends in `completed` rather than a progress event).
JOB_STEPS = [
    ("load_prices", 20),
    ("moving_averages", 40),
    ("rsi", 55),
    ("macd", 70),
    ("signal", 85),
]


# -- the cluster ---------------------------------------------------------------------------


class Cluster:
    """Nodes on one database and one Redis, each on a port of its own."""

    def __init__(
        self, root: Path, ports: Callable[[], int], store_url: str, redis: RedisServer
    ) -> None:
        self.root = root
        self.ports = ports
        self.store_url = store_url
        self.redis = redis
        self.nodes: list[ServerProcess] = []

    async def start(self, names: Sequence[str], *extra: str) -> list[ServerProcess]:
        """Start one node per name, all at once; returns them in the order of `names`."""
        started = []
        for name in names:
            log_dir = self.root / f"node-{name}"
            log_dir.mkdir(parents=True)
            args = [
                "--store", self.store_url,
                "--broker", self.redis.url,
                "--node-id", name,
                *NODE_ARGS,
                *extra,
            ]  # fmt: skip
            started.append(ServerProcess(log_dir, self.ports(), None, args))
        self.nodes += started
        await asyncio.gather(*(node.start() for node in started))
        return started

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture
async def cluster(
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
    pg_url: str,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> AsyncIterator[Cluster]:
    """A fresh database and Redis; the nodes a test starts are killed at its end."""
    nodes = Cluster(tmp_path, unused_tcp_port_factory, pg_url, redis_server)
    try:
        yield nodes
    finally:
        nodes.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A connection pool per host is what a client behind a balancer has; no proxy from
    # the environment may route 127.0.0.1.
    async with aiohttp.ClientSession(trust_env=False) as session:
        yield session


def node_id(node: ServerProcess) -> str:
    return node.args[node.args.index("--node-id") + 1]


def assert_no_traceback(*nodes: ServerProcess) -> None:
    """No node logged an unexpected exception (an outage is logged as one clear line)."""
    for node in nodes:
        output = node.all_output()
        at = output.find("Traceback")
        assert at < 0, f"{node_id(node)} logged:\n{output[max(0, at - 300) : at + 3000]}"


# -- HTTP helpers --------------------------------------------------------------------------


async def login(http: aiohttp.ClientSession, node: ServerProcess, username: str) -> str:
    """Register `username` through `node` and return an access token (valid on any node)."""
    creds = {"username": username, "password": PASSWORD}
    await api(http, "POST", f"{node.base_url}/api/v1/auth/register", json=creds, expect=201)
    body = await api(http, "POST", f"{node.base_url}/api/v1/auth/login", json=creds)
    return str(body["access_token"])


async def create_task(http: aiohttp.ClientSession, node: ServerProcess, token: str) -> str:
    url = f"{node.base_url}/api/v1/tasks"
    body = {"kind": "import", "params": {}}
    return str((await api(http, "POST", url, token, json=body, expect=201))["id"])


async def start_job(http: aiohttp.ClientSession, node: ServerProcess, token: str) -> str:
    """The built-in stock analysis, started through `node` (so it runs there)."""
    url = f"{node.base_url}/api/v1/stock/analyze"
    return str((await api(http, "POST", url, token, json={"code": "AAPL"}, expect=201))["id"])


async def finish(http: aiohttp.ClientSession, node: ServerProcess, token: str, task_id: str) -> int:
    """Complete the task (the subscribers' cue to stop); returns its last seq."""
    url = f"{node.base_url}/api/v1/tasks/{task_id}/complete"
    return int((await api(http, "POST", url, token, json={"result": {"ok": True}}))["seq"])


async def all_events(
    http: aiohttp.ClientSession, node: ServerProcess, token: str, task_id: str
) -> list[dict[str, Any]]:
    """The task's whole stored history, read page by page from `node`."""
    events: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        url = f"{node.base_url}/api/v1/tasks/{task_id}/events?after_seq={after}&limit=200"
        page = await api(http, "GET", url, token)
        events += page["events"]
        after = page["next_after_seq"]
    return events


async def metric(http: aiohttp.ClientSession, node: ServerProcess, name: str) -> float:
    """A metric of `node`, summed over its labels (fails if `node` has no such metric)."""
    async with http.get(f"{node.base_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values = [
        float(value)
        for key, _, value in (line.rpartition(" ") for line in text.splitlines())
        if key.split("{", 1)[0] == name
    ]
    assert values, f"{node_id(node)} has no metric {name}"
    return sum(values)


async def health(http: aiohttp.ClientSession, node: ServerProcess) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{node.base_url}/healthz") as resp:
        return resp.status, await resp.json()


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = DEADLINE
) -> None:
    """Poll `check` (plain or async) until it is true; fail naming `what`."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                outcome = check()
                if await outcome if inspect.isawaitable(outcome) else outcome:
                    return
                await asyncio.sleep(RETRY_PAUSE)
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


@dataclass
class Post:
    """What one progress post got: the status, and the seq if it was acknowledged."""

    message: str
    status: int | None  # None: no answer (the connection broke, the node died)
    seq: int | None = None
    retry_after: str | None = None


async def post(
    http: aiohttp.ClientSession, node: ServerProcess, token: str, task_id: str, message: str
) -> Post:
    """One progress post; a broken connection is an answer of its own, not an exception."""
    url = f"{node.base_url}/api/v1/tasks/{task_id}/progress"
    headers = {"Authorization": f"Bearer {token}"}
    body = {"progress": 50, "message": message}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with http.post(url, json=body, headers=headers, timeout=timeout) as resp:
            answer = await resp.json(content_type=None)
            seq = answer["seq"] if resp.status == 200 else None
            return Post(message, resp.status, seq, resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, ConnectionError, TimeoutError):
        return Post(message, None)


# -- watchers ------------------------------------------------------------------------------


@dataclass
class Watcher:
    """One subscriber of one task, following it to its terminal event.

    It connects to `nodes[0]`, and after a broken connection to the next node in the list
    (round robin), resuming with the last seq it has, as a client behind a balancer would.
    """

    task_id: str
    endpoint: str  # "multi": /api/v1/ws + subscribe; "task": the per-task endpoint
    nodes: list[ServerProcess]
    #: Every event received, without its "type", in the order received.
    seen: list[dict[str, Any]] = field(default_factory=list)
    #: The node of each connection made.
    connections: list[str] = field(default_factory=list)
    #: Set once the first subscription is in place (its ping answered).
    live: asyncio.Event = field(default_factory=asyncio.Event)
    finished: bool = False

    @property
    def last_seq(self) -> int:
        return int(self.seen[-1]["seq"]) if self.seen else 0

    def __str__(self) -> str:
        return f"{self.endpoint}@{'/'.join(self.connections)}"


async def watch(watcher: Watcher, token: str) -> None:
    """Run `watcher` until its task's terminal event; every seq must be the next one."""
    headers = {"Authorization": f"Bearer {token}"}
    at = 0
    while True:
        node = watcher.nodes[at % len(watcher.nodes)]
        last = watcher.last_seq
        if watcher.endpoint == "multi":
            url = f"{node.ws_url}/api/v1/ws"
        else:
            url = f"{node.ws_url}/api/v1/stock/ws/analyze/{watcher.task_id}?last_seq={last}"
        try:
            async with connect(url, additional_headers=headers, proxy=None, open_timeout=2) as ws:
                watcher.connections.append(node_id(node))
                if watcher.endpoint == "multi":
                    subscribe = {"action": "subscribe", "task_id": watcher.task_id}
                    await ws.send(json.dumps({**subscribe, "last_seq": last}))
                # Answered after the subscription is in place: messages are handled in order.
                await ws.send(json.dumps({"action": "ping", "id": "live"}))
                async for raw in ws:
                    message = json.loads(raw)
                    kind = message.pop("type")
                    if kind == "pong":
                        watcher.live.set()
                        continue
                    if kind == "notice":
                        continue
                    # A snapshot would mean history after last_seq is gone: never here.
                    assert kind == "event", (str(watcher), kind, message)
                    assert message["task_id"] == watcher.task_id, message
                    assert message["seq"] == watcher.last_seq + 1, (
                        str(watcher),
                        watcher.last_seq,
                        message["seq"],
                    )
                    watcher.seen.append(message)
                    if message["event"] in TERMINAL:
                        watcher.finished = True
                        return
        except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError):
            at += 1  # that node is gone: the next one, from last_seq
            await asyncio.sleep(RETRY_PAUSE)


class Watchers:
    """Background watchers; `wait()` returns once all have seen their terminal event."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.all: list[Watcher] = []
        self._tasks: list[asyncio.Task[None]] = []

    def add(self, task_id: str, endpoint: str, *nodes: ServerProcess) -> Watcher:
        watcher = Watcher(task_id, endpoint, list(nodes))
        self.all.append(watcher)
        self._tasks.append(asyncio.create_task(watch(watcher, self.token)))
        return watcher

    async def live(self) -> None:
        """Wait until every watcher's subscription is in place."""
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*(w.live.wait() for w in self.all))

    async def wait(self) -> None:
        """Until every watcher has its terminal event (fails naming those that stalled)."""
        try:
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*self._tasks)
        except TimeoutError:
            stalled = [f"{w} at seq {w.last_seq}" for w in self.all if not w.finished]
            raise AssertionError(f"not within {DEADLINE} s: {stalled}") from None
        finally:
            self.cancel()

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()


@pytest.fixture
async def watchers() -> AsyncIterator[Callable[[str], Watchers]]:
    made: list[Watchers] = []

    def make(token: str) -> Watchers:
        made.append(Watchers(token))
        return made[-1]

    yield make
    for group in made:
        group.cancel()


def assert_received_history(watchers: Sequence[Watcher], history: list[dict[str, Any]]) -> None:
    """Each watcher got exactly the stored history: seqs 1..N, once each, same contents."""
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    assert history[-1]["event"] in TERMINAL
    for watcher in watchers:
        assert watcher.finished, str(watcher)
        assert watcher.seen == history, str(watcher)


def assert_acknowledged_stored(posts: Sequence[Post], history: list[dict[str, Any]]) -> None:
    """Every acknowledged post is stored at the seq it was answered with, once."""
    by_seq = {e["seq"]: e for e in history}
    acked = [p for p in posts if p.status == 200]
    assert len({p.seq for p in acked}) == len(acked)
    for p in acked:
        assert p.seq in by_seq and by_seq[p.seq].get("message") == p.message, (p, by_seq.get(p.seq))
    messages = [e["message"] for e in history if e["event"] == "progress"]
    assert len(messages) == len(set(messages)), "a post was stored twice"


# -- 1. cross-node delivery ----------------------------------------------------------------


async def test_an_event_posted_on_one_node_reaches_subscribers_on_the_other(
    cluster: Cluster, http: aiohttp.ClientSession, watchers: Callable[[str], Watchers]
) -> None:
    """Posts on A reach subscribers on B (both endpoints) live, through Redis, in order."""
    a, b = await cluster.start(["a", "b"])
    token = await login(http, a, "alice")
    task_id = await create_task(http, a, token)
    group = watchers(token)
    on_b = [group.add(task_id, "multi", b), group.add(task_id, "task", b)]
    await group.live()

    posts = [await post(http, a, token, task_id, f"p{i}") for i in range(40)]
    assert [p.status for p in posts] == [200] * 40
    await finish(http, a, token, task_id)
    await group.wait()

    history = await all_events(http, a, token, task_id)
    assert len(history) == 1 + 1 + 40 + 1  # created, started, 40 progress, completed
    assert_received_history(on_b, history)
    assert_acknowledged_stored(posts, history)
    # B learnt every event from Redis as it happened: none had to be read back from the
    # store, and both sockets stayed on B.
    assert await metric(http, b, "progress_broker_received_total") >= len(history) - 1
    assert await metric(http, b, "progress_gaps_repaired_total") == 0
    assert all(w.connections == ["b"] for w in on_b)
    assert_no_traceback(a, b)


# -- 2. replay on another node -------------------------------------------------------------


async def events_until(ws: Any, last: int) -> list[dict[str, Any]]:
    """Event messages (without "type") up to and including seq `last`."""
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(DEADLINE):
        while not got or got[-1]["seq"] < last:
            message = json.loads(await ws.recv())
            assert message.pop("type") == "event", message
            got.append(message)
    return got


async def test_a_subscriber_resumes_on_another_node_and_history_is_the_same_everywhere(
    cluster: Cluster, http: aiohttp.ClientSession
) -> None:
    """Reconnecting to B with last_seq replays exactly what was missed; events, the task and
    errors read the same from every node."""
    a, b = await cluster.start(["a", "b"])
    token = await login(http, a, "alice")
    headers = {"Authorization": f"Bearer {token}"}
    task_id = await create_task(http, a, token)
    for i in range(10):
        assert (await post(http, a, token, task_id, f"first-{i}")).status == 200
    async with connect(f"{a.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task_id, "last_seq": 0}))
        before = await events_until(ws, 12)
    # Disconnected at seq 12; meanwhile events are posted through both nodes.
    for i in range(10):
        assert (await post(http, (a, b)[i % 2], token, task_id, f"second-{i}")).status == 200

    async with (
        connect(f"{b.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as multi,
        connect(
            f"{b.ws_url}/api/v1/stock/ws/analyze/{task_id}?last_seq=12",
            additional_headers=headers,
            proxy=None,
        ) as per_task,
    ):
        await multi.send(json.dumps({"action": "subscribe", "task_id": task_id, "last_seq": 12}))
        replayed = [await events_until(multi, 22), await events_until(per_task, 22)]
        last = await finish(http, a, token, task_id)
        live = [await events_until(multi, last), await events_until(per_task, last)]

    history = await all_events(http, a, token, task_id)
    assert [e["seq"] for e in history] == list(range(1, 24))
    assert before == history[:12]
    for resumed, then in zip(replayed, live, strict=True):
        assert resumed + then == history[12:]
    # Every node reads the same: the history (whole and from the middle), the task, and a
    # missing or foreign task's error.
    assert await all_events(http, b, token, task_id) == history
    for after in (0, 7):
        url = f"/api/v1/tasks/{task_id}/events?after_seq={after}&limit=5"
        pages = [await api(http, "GET", node.base_url + url, token) for node in (a, b)]
        assert pages[0] == pages[1] and pages[0]["events"] == history[after : after + 5]
    tasks = [await api(http, "GET", f"{n.base_url}/api/v1/tasks/{task_id}", token) for n in (a, b)]
    assert tasks[0] == tasks[1] and tasks[0]["seq"] == 23 and tasks[0]["status"] == "completed"
    mallory = await login(http, b, "mallory")
    for path in (f"/api/v1/tasks/{task_id}", "/api/v1/tasks/0123456789abcdef0123456789abcdef"):
        errors = [await api(http, "GET", n.base_url + path, mallory, expect=404) for n in (a, b)]
        assert errors[0] == errors[1] and errors[0]["error"]["code"] == "not_found", errors
    assert_no_traceback(a, b)


# -- 3. many producers and subscribers over three nodes --------------------------------------


async def produce(
    http: aiohttp.ClientSession,
    nodes: Sequence[ServerProcess],
    token: str,
    task_id: str,
    name: str,
    count: int,
    posts: list[Post],
) -> None:
    """`count` posts through `nodes[0]`; all must be acknowledged."""
    for i in range(count):
        answer = await post(http, nodes[0], token, task_id, f"{name}-{i}")
        posts.append(answer)
        assert answer.status == 200, answer


async def test_ten_producers_and_twenty_subscribers_spread_over_three_nodes(
    cluster: Cluster, http: aiohttp.ClientSession, watchers: Callable[[str], Watchers]
) -> None:
    """10 producers × 50 posts to two tasks through three nodes at once: each of 20
    subscribers (both endpoints, all nodes) gets 1..N of its task once, in order."""
    nodes = await cluster.start(["a", "b", "c"])
    token = await login(http, nodes[0], "alice")
    task_ids = [await create_task(http, nodes[i], token) for i in range(2)]
    group = watchers(token)
    subscribed = [
        group.add(task_ids[i % 2], ("multi", "task")[i // 2 % 2], nodes[i % 3]) for i in range(20)
    ]
    await group.live()

    posts: dict[str, list[Post]] = {t: [] for t in task_ids}
    # Five producers per task, each through its own node: seqs of one task are allocated
    # by three nodes concurrently.
    async with asyncio.timeout(DEADLINE):
        await asyncio.gather(
            *(
                produce(
                    http,
                    [nodes[p % 3]],
                    token,
                    task_ids[p % 2],
                    f"w{p}",
                    50,
                    posts[task_ids[p % 2]],
                )
                for p in range(10)
            )
        )
    for i, task_id in enumerate(task_ids):
        await finish(http, nodes[i], token, task_id)
    await group.wait()

    for task_id in task_ids:
        history = await all_events(http, nodes[2], token, task_id)
        assert len(history) == 2 + 250 + 1
        assert_received_history([w for w in subscribed if w.task_id == task_id], history)
        assert_acknowledged_stored(posts[task_id], history)
    # Fan-out crossed nodes: every node received events published by the others.
    for node in nodes:
        assert await metric(http, node, "progress_broker_received_total") > 0
    assert all(len(w.connections) == 1 for w in subscribed)
    assert_no_traceback(*nodes)


# -- 4. a node SIGKILLed while its producers post ---------------------------------------------


@dataclass
class Producer:
    """Posts to one task until stopped, through `nodes[0]`, and after a failed request
    through the next node (a worker behind a balancer); keeps every answer."""

    task_id: str
    name: str
    nodes: list[ServerProcess]
    posts: list[Post] = field(default_factory=list)

    def acked(self) -> int:
        return sum(p.status == 200 for p in self.posts)

    async def run(self, http: aiohttp.ClientSession, token: str, stop: asyncio.Event) -> None:
        at = 0
        while not stop.is_set():
            node = self.nodes[at % len(self.nodes)]
            answer = await post(http, node, token, self.task_id, f"{self.name}-{len(self.posts)}")
            self.posts.append(answer)
            if answer.status != 200:
                assert answer.status in (None, 503), answer  # dead, or shutting down
                at += 1
                await asyncio.sleep(RETRY_PAUSE)


async def test_sigkill_of_a_node_loses_no_acknowledged_event_on_the_survivors(
    cluster: Cluster, http: aiohttp.ClientSession, watchers: Callable[[str], Watchers]
) -> None:
    """C is SIGKILLed while its producers post: every event it acknowledged (and any it
    committed unanswered) reaches every subscriber on A and B, and C's subscribers resume
    there."""
    a, b, c = await cluster.start(["a", "b", "c"])
    token = await login(http, a, "alice")
    task_ids = [await create_task(http, a, token) for _ in range(2)]
    group = watchers(token)
    survivors = [
        group.add(task_id, endpoint, node)
        for task_id in task_ids
        for endpoint in ("multi", "task")
        for node in (a, b)
    ]
    moved = [group.add(task_id, "multi", c, a, b) for task_id in task_ids]
    await group.live()
    producers = [
        Producer(task_id, f"{node_id(node)}{i}", [node, a])
        for task_id in task_ids
        for i, node in enumerate((c, c, a, b))
    ]
    stop = asyncio.Event()
    running = [asyncio.create_task(p.run(http, token, stop)) for p in producers]
    try:
        on_c = [p for p in producers if p.nodes[0] is c]
        await eventually(lambda: all(p.acked() >= 20 for p in on_c), "C's producers acknowledged")
        c.kill()  # mid-stream: its producers have requests in flight
        await c.wait()
        after_kill = {id(p): p.acked() for p in producers}
        # Everyone goes on (C's producers through A) for a while after the crash.
        await eventually(
            lambda: all(p.acked() >= after_kill[id(p)] + 20 for p in producers),
            "posting after the crash",
        )
        stop.set()
        await asyncio.gather(*running)
    finally:
        stop.set()
        for task in running:
            task.cancel()
    for task_id in task_ids:
        await finish(http, b, token, task_id)
    await group.wait()

    for task_id in task_ids:
        history = await all_events(http, b, token, task_id)
        mine = [w for w in survivors + moved if w.task_id == task_id]
        assert_received_history(mine, history)
        assert_acknowledged_stored(
            [p for pr in producers if pr.task_id == task_id for p in pr.posts], history
        )
    # C really was in the middle of it: its producers lost requests to the crash.
    assert any(p.status is None for pr in producers if pr.nodes[0] is c for p in pr.posts)
    assert all(w.connections == [node_id(w.nodes[0])] for w in survivors)
    assert all(w.connections[0] == "c" and len(w.connections) >= 2 for w in moved)
    assert_no_traceback(a, b)


# -- 5. Redis killed and restarted -------------------------------------------------------------


async def broker_state(http: aiohttp.ClientSession, node: ServerProcess) -> str:
    status, body = await health(http, node)
    assert status == 200 and body["store"] == "ok", (status, body)  # the node still serves
    return str(body["broker"])


async def test_redis_killed_and_restarted_mid_stream_loses_nothing(
    cluster: Cluster,
    http: aiohttp.ClientSession,
    watchers: Callable[[str], Watchers],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    """Redis dies mid-stream: posts go on being acknowledged, other nodes' subscribers catch
    up from the store, /healthz says broker down then ok, and nobody misses anything."""
    a, b = await cluster.start(["a", "b"])
    token = await login(http, a, "alice")
    task_ids = [await create_task(http, a, token) for _ in range(2)]
    group = watchers(token)
    subscribed = [
        group.add(task_id, endpoint, node)
        for task_id in task_ids
        for endpoint in ("multi", "task")
        for node in (a, b)
    ]
    await group.live()
    producers = [
        Producer(t, f"{node_id(n)}{i}", [n]) for i, t in enumerate(task_ids) for n in (a, b)
    ]
    stop = asyncio.Event()
    running = [asyncio.create_task(p.run(http, token, stop)) for p in producers]

    async def everyone_posts(more: int) -> None:
        counts = {id(p): p.acked() for p in producers}
        await eventually(lambda: all(p.acked() >= counts[id(p)] + more for p in producers), "posts")

    async def brokers(state: str) -> bool:
        return [await broker_state(http, node) for node in (a, b)] == [state, state]

    try:
        await everyone_posts(10)
        redis_server.kill()
        await eventually(lambda: brokers("down"), "both nodes report the broker down")
        await everyone_posts(20)
        # Still down: each node's subscribers catch up with the other node's posts from the
        # store (the periodic check), not from Redis.
        assert not redis_server.running
        latest = {
            t: max(p.seq or 0 for pr in producers if pr.task_id == t for p in pr.posts)
            for t in task_ids
        }
        await eventually(
            lambda: all(w.last_seq >= latest[w.task_id] for w in subscribed),
            "subscribers caught up while Redis is down",
        )
        redis_server.start()
        await eventually(lambda: brokers("ok"), "both nodes report the broker ok again")
        await everyone_posts(20)
        stop.set()
        await asyncio.gather(*running)
    finally:
        stop.set()
        for task in running:
            task.cancel()
    for task_id in task_ids:
        await finish(http, b, token, task_id)
    await group.wait()

    for task_id in task_ids:
        history = await all_events(http, a, token, task_id)
        assert_received_history([w for w in subscribed if w.task_id == task_id], history)
        posts = [p for pr in producers if pr.task_id == task_id for p in pr.posts]
        assert {p.status for p in posts} == {200}  # acknowledged all along
        assert_acknowledged_stored(posts, history)
    for node in (a, b):
        assert await metric(http, node, "progress_broker_reconnects_total") >= 1
        assert await metric(http, node, "progress_gaps_repaired_total") >= 1
        assert await metric(http, node, "progress_broker_up") == 1
    assert all(len(w.connections) == 1 for w in subscribed)  # no socket was dropped
    assert_no_traceback(a, b)


# -- 6. PostgreSQL restarted ---------------------------------------------------------------------


async def test_postgres_restart_gives_503_then_recovers_with_nothing_lost(
    cluster: Cluster,
    http: aiohttp.ClientSession,
    watchers: Callable[[str], Watchers],
    pg_server: PostgresServer,  # noqa: F811
) -> None:
    """PostgreSQL crashes and comes back: meanwhile writes and reads are 503 with
    Retry-After and /healthz is 503; then everything resumes by itself, every acknowledged
    post is stored, and the open sockets stayed open and got every event."""
    a, b = await cluster.start(["a", "b"])
    token = await login(http, a, "alice")
    task_id = await create_task(http, a, token)
    group = watchers(token)
    subscribed = [group.add(task_id, e, n) for e in ("multi", "task") for n in (a, b)]
    await group.live()
    producers = [Producer(task_id, node_id(n), [n]) for n in (a, b)]
    stop = asyncio.Event()
    running = [asyncio.create_task(p.run(http, token, stop)) for p in producers]

    def refused(producer: Producer) -> int:
        return sum(p.status == 503 for p in producer.posts)

    async def stores(status: int) -> bool:
        return [(await health(http, n))[0] for n in (a, b)] == [status, status]

    try:
        await eventually(lambda: all(p.acked() >= 10 for p in producers), "posts before")
        pg_server.crash()  # pg_ctl -m immediate: no shutdown, recovery at the next start
        try:
            await eventually(lambda: stores(503), "both nodes report the store down")
            for node in (a, b):
                status, body = await health(http, node)
                assert body["store"] == "down" and body["status"] == "unavailable", body
                async with http.get(
                    f"{node.base_url}/api/v1/tasks/{task_id}",
                    headers={"Authorization": f"Bearer {token}"},
                ) as resp:
                    assert resp.status == 503 and resp.headers["Retry-After"], resp.status
                    assert (await resp.json())["error"]["code"] == "unavailable"
                # The operator's metrics stay up through the outage.
                async with http.get(f"{node.base_url}/metrics") as resp:
                    assert resp.status == 200 and "progress_broker_up" in await resp.text()
            counts = [refused(p) for p in producers]
            await eventually(
                lambda: all(refused(p) >= n + 3 for p, n in zip(producers, counts, strict=True)),
                "posts refused while PostgreSQL is down",
            )
        finally:
            pg_server.start()
        await eventually(lambda: stores(200), "both nodes report the store ok again")
        counts = [p.acked() for p in producers]
        await eventually(
            lambda: all(p.acked() >= n + 10 for p, n in zip(producers, counts, strict=True)),
            "posts after recovery",
        )
        stop.set()
        await asyncio.gather(*running)
    finally:
        stop.set()
        for task in running:
            task.cancel()
    await finish(http, b, token, task_id)
    await group.wait()

    history = await all_events(http, a, token, task_id)
    assert_received_history(subscribed, history)
    posts = [p for pr in producers for p in pr.posts]
    assert {p.status for p in posts} == {200, 503}, {p.status for p in posts}
    assert all(p.retry_after for p in posts if p.status == 503)
    assert_acknowledged_stored(posts, history)
    assert all(len(w.connections) == 1 for w in subscribed)  # no socket was dropped
    assert_no_traceback(a, b)


# -- 7. a node killed in the middle of a built-in job --------------------------------------------


async def jobs_running(http: aiohttp.ClientSession, node: ServerProcess) -> float:
    return await metric(http, node, "progress_jobs_running")


def job_steps(history: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(step, progress) of each progress event, in seq order."""
    return [(e["step"], e["progress"]) for e in history if e["event"] == "progress"]


async def test_a_job_on_a_killed_node_is_taken_over_after_its_lease(
    cluster: Cluster, http: aiohttp.ClientSession, watchers: Callable[[str], Watchers]
) -> None:
    """A dies mid-job: B takes the lease over once it expires and finishes the job from
    its checkpoint; no step is written twice and the subscribers see no gap."""
    a, b = await cluster.start(["a", "b"], "--job-step-delay", "0.5", "--job-lease-ttl", "3")
    token = await login(http, a, "alice")
    task_id = await start_job(http, a, token)
    group = watchers(token)
    on_b = group.add(task_id, "multi", b)
    moved = group.add(task_id, "task", a, b)
    await eventually(
        lambda: ("load_prices", 20) in job_steps(on_b.seen), "the job's first step", 10
    )
    assert (await jobs_running(http, a), await jobs_running(http, b)) == (1, 0)
    a.kill()
    await a.wait()
    await group.wait()

    history = await all_events(http, b, token, task_id)
    assert_received_history([on_b, moved], history)
    assert [e["event"] for e in history[:2]] == ["created", "started"]
    assert job_steps(history) == [("load_prices", 0), *JOB_STEPS]
    assert history[-1]["event"] == "completed" and history[-1]["result"]["signal"]
    assert moved.connections[0] == "a" and moved.connections[-1] == "b"
    assert await metric(http, b, "progress_job_lease_takeovers_total") == 1
    assert f"job.resume task={task_id}" in b.all_output()
    assert await jobs_running(http, b) == 0
    assert_no_traceback(b)


# -- 8. cancel through another node ---------------------------------------------------------------


async def test_cancel_through_another_node_stops_the_job_where_it_runs(
    cluster: Cluster, http: aiohttp.ClientSession, watchers: Callable[[str], Watchers]
) -> None:
    """A job running on A is cancelled through B: A stops it at once (long before its next
    step), the history ends with `cancelled`, and no node takes it up again."""
    # A step every 30 s: the job cannot end by itself while the test runs.
    a, b = await cluster.start(["a", "b"], "--job-step-delay", "30")
    token = await login(http, a, "alice")
    task_id = await start_job(http, a, token)
    group = watchers(token)
    on_b = group.add(task_id, "multi", b)
    await eventually(lambda: bool(job_steps(on_b.seen)), "the job started", 10)
    assert (await jobs_running(http, a), await jobs_running(http, b)) == (1, 0)

    url = f"{b.base_url}/api/v1/tasks/{task_id}/cancel"
    cancelled_seq = (await api(http, "POST", url, token, json={}))["seq"]
    await group.wait()

    async def a_idle() -> bool:
        return await jobs_running(http, a) == 0

    await eventually(a_idle, "A stopped the job", 10)

    history = await all_events(http, a, token, task_id)
    assert_received_history([on_b], history)
    assert [e["event"] for e in history] == ["created", "started", "progress", "cancelled"]
    assert history[-1]["seq"] == cancelled_seq
    for node in (a, b):
        task = await api(http, "GET", f"{node.base_url}/api/v1/tasks/{task_id}", token)
        assert task["status"] == "cancelled"
        assert await metric(http, node, "progress_job_lease_takeovers_total") == 0
    assert await jobs_running(http, b) == 0
    assert_no_traceback(a, b)
