"""Brokers: the memory broker, and the Redis broker against a real redis-server.

Each "node" is a RedisBroker with its own node id, recording what it delivered and how
often it reported a reconnect. Outages are real: the server is killed with SIGKILL, or
frozen with SIGSTOP (a hung Redis), and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis

from server.broker import Message, broker_kind, open_broker
from server.broker.memory import MemoryBroker
from server.broker.redis import (
    RedisBroker,
    decode,
    encode,
    header_prefix,
    parse_url,
)

from .helpers import eventually
from .redis_server import RedisServer
from .redis_server import redis_server as _redis_server

#: The fixture, under its own name (tests/redis_server.py holds it for reuse).
redis_server = _redis_server

#: Short bounds for the outage tests (the defaults are 2 s and 1 s): same code paths.
FAST = {"timeout": 1.0, "ping_interval": 0.25, "backoff_cap": 0.3}
#: Bound on waiting for anything to happen over Redis, in seconds.
WAIT = 10.0


def message(origin: str, task_id: str, seq: int, event: str = "progress") -> Message:
    text = json.dumps(
        {"type": "event", "task_id": task_id, "seq": seq, "event": event, "data": {"p": seq}}
    )
    return Message(origin=origin, task_id=task_id, seq=seq, event=event, text=text)


class Node:
    """A broker as one server node: what it delivered, how often on_reconnect ran."""

    def __init__(self, url: str, node_id: str, **options: Any) -> None:
        self.broker = RedisBroker(url, node_id, **options)
        self.node_id = node_id
        self.got: list[Message] = []
        self.reconnects = 0

    def _on_reconnect(self) -> None:
        self.reconnects += 1

    async def start(self) -> Node:
        await self.broker.start(self.got.append, self._on_reconnect)
        return self

    def publish(self, task_id: str, seq: int) -> Message:
        sent = message(self.node_id, task_id, seq)
        self.broker.publish(sent)
        return sent


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[..., Node]]:
    """Make nodes (`nodes(url, "a", **options)`); all are closed after the test."""
    made: list[Node] = []

    def make(url: str, node_id: str, **options: Any) -> Node:
        made.append(Node(url, node_id, **options))
        return made[-1]

    yield make
    for node in made:
        await node.broker.close()


async def until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `check()` is true (fails after `timeout` seconds)."""

    async def ready() -> bool:
        return check()

    await eventually(ready, timeout)


async def _broker_clients(url: str) -> list[dict[str, Any]]:
    """The connections brokers opened (they name themselves progress-broker:<node>)."""
    async with redis.Redis.from_url(url) as raw:
        clients = await raw.client_list()
    return [c for c in clients if c.get("name", "").startswith("progress-broker:")]


def test_without_redis_server_tests_skip_locally_and_fail_in_ci(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing binary skips the Redis tests, unless CI=true: then they fail."""
    from . import redis_server as module

    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(module, "REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        module.redis_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        module.redis_binary()


# -- memory ---------------------------------------------------------------------------


async def test_memory_broker_publishes_nothing_and_is_healthy() -> None:
    """memory://: publish is a no-op, the broker is always healthy, nothing is delivered."""
    broker = await open_broker("memory://", "a")
    assert isinstance(broker, MemoryBroker) and broker.kind == "memory"
    got: list[Message] = []
    await broker.start(got.append, lambda: None)
    assert broker.publish(message("a", "t", 1)) is None
    assert broker.healthy and got == [] and broker.stats.published == 0
    await broker.close()


# -- URL and wire format (no server) -----------------------------------------------------


def test_the_url_names_the_channel() -> None:
    """The database number namespaces the channel; ?channel= names it outright."""
    assert parse_url("redis://127.0.0.1:6379/0").channel == "progress:events:0"
    assert parse_url("redis://h/3").channel == "progress:events:3"
    assert parse_url("redis://h?db=4").channel == "progress:events:4"
    assert parse_url("redis://h/1?channel=staging").channel == "staging"
    assert parse_url("unix:///run/redis.sock?db=2").channel == "progress:events:2"
    target = parse_url("rediss://user:s3cret@h:6380/5?ssl_cert_reqs=none")
    assert target.where == "h:6380/5" and "s3cret" not in target.where
    assert broker_kind("redis://h/0") == "redis"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:port/0",
        "redis://h/zero",
        "redis://h/0?socket_timeout=60",
        "redis://h/0?channel=",
        "redis://h/1?db=2",
        "redis://h/0?channel=a&channel=b",
        "unix://",
        "http://h/0",
    ],
)
def test_a_malformed_url_is_refused(url: str) -> None:
    """A URL redis-py would misread or that would override the broker's bounds: ValueError."""
    with pytest.raises(ValueError):
        RedisBroker(url, "a")


def test_the_password_stays_out_of_url_errors() -> None:
    """The error for a bad URL does not repeat its password."""
    with pytest.raises(ValueError) as info:
        parse_url("redis://u:hunter2hunter2@h/0?bogus=1")
    assert "hunter2" not in str(info.value)


def test_the_wire_format_round_trips_any_ids_and_text() -> None:
    """Newlines, quotes and non-ASCII in ids or text survive encode/decode."""
    sent = Message(
        origin='node "a"\n',
        task_id="t\n1",
        seq=2**40,
        event="progress",
        text='{"type":"event","data":"line1\\nline2 é ✓"}\nnot json either',
    )
    assert decode(encode(sent)) == sent
    head = encode(sent).split(b"\n", 1)[0]
    assert json.loads(head)[0] == 1
    # The subscriber skips its own messages by this prefix, without decoding them.
    assert encode(sent).startswith(header_prefix(sent.origin))
    assert not encode(sent).startswith(header_prefix('node "a"'))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no header",
        b'[1,"a","t",1,"progress"]',
        b'{"v":1}\n{}',
        b'[2,"a","t",1,"progress"]\n{}',
        b'[1,"a","t","1","progress"]\n{}',
        b'[1,"a","t",true,"progress"]\n{}',
        b'[1,"a","t",1]\n{}',
        b'[1,"a","t",1,"progress"]\n\xff\xfe',
        b"\xff\n{}",
    ],
)
def test_decode_refuses_anything_but_a_version_1_message(data: bytes) -> None:
    """Every malformed shape raises ValueError (the subscriber counts and skips those)."""
    with pytest.raises(ValueError):
        decode(data)


# -- two nodes on one Redis ------------------------------------------------------------


async def test_a_message_reaches_the_other_node_once_and_not_its_own(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """Published on A: delivered on B once; A never delivers its own."""
    a = await nodes(redis_server.url, "a").start()
    b = await nodes(redis_server.url, "b").start()
    assert a.broker.healthy and b.broker.healthy
    first, marker = a.publish("t1", 1), a.publish("t1", 2)
    await until(lambda: marker in b.got)
    assert b.got == [first, marker]
    # B's reply is published after A's two (B had them): had A kept its own, they would
    # have reached A before it.
    reply = b.publish("t2", 1)
    await until(lambda: reply in a.got and b.broker.stats.published == 1)
    assert a.got == [reply]
    assert (a.broker.stats.published, a.broker.stats.received) == (2, 1)
    assert (b.broker.stats.published, b.broker.stats.received) == (1, 2)
    assert a.broker.stats.dropped == b.broker.stats.dropped == 0
    assert a.broker.stats.publish_lag.count == 2


async def test_a_thousand_messages_arrive_in_publish_order_per_origin(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """1,000 messages of 5 tasks from two nodes reach a third in each origin's order."""
    a = await nodes(redis_server.url, "a").start()
    c = await nodes(redis_server.url, "c").start()
    b = await nodes(redis_server.url, "b").start()
    sent: dict[str, list[Message]] = {"a": [], "c": []}
    for i in range(500):
        for node in (a, c):
            sent[node.node_id].append(node.publish(f"task-{i % 5}", i // 5 + 1))
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the publishers send while more are queued
    await until(lambda: len(b.got) == 1000)
    # Counted when Redis' replies are read, which may be after B has the messages.
    await until(lambda: a.broker.stats.published == c.broker.stats.published == 500)
    for origin, messages in sent.items():
        assert [m for m in b.got if m.origin == origin] == messages
    assert b.broker.stats.received == 1000
    assert a.broker.stats.dropped == c.broker.stats.dropped == 0


async def test_a_malformed_message_is_ignored_and_the_next_delivered(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """Garbage on the channel is counted and skipped; the good message after it arrives."""
    a = await nodes(redis_server.url, "a").start()
    b = await nodes(redis_server.url, "b").start()
    junk = [b"hello", b'[9,"x","t",1,"progress"]\n{}', b"\xff\xfe\n", b"[1,2,3,4,5]\n{}"]
    async with redis.Redis.from_url(redis_server.url) as raw:
        for data in junk:
            await raw.publish(b.broker.channel, data)
    good = a.publish("t1", 1)
    await until(lambda: b.got != [])
    assert b.got == [good]
    assert b.broker.stats.malformed == len(junk)
    assert b.broker.stats.received == 1


async def test_a_failing_deliver_does_not_stop_the_subscriber(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """deliver() raising on one message is logged; the next message is delivered."""
    a = await nodes(redis_server.url, "a").start()
    b = nodes(redis_server.url, "b")
    got: list[Message] = []

    def deliver(m: Message) -> None:
        if m.seq == 1:
            raise RuntimeError("a bug in the relay")
        got.append(m)

    await b.broker.start(deliver, lambda: None)
    a.publish("t", 1)
    second = a.publish("t", 2)
    await until(lambda: got != [])
    assert got == [second]


async def test_deployments_on_other_databases_or_channels_do_not_hear_each_other(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """db 1, db 2 and ?channel=x on one Redis are separate; the same URL is shared."""
    url1, url2 = redis_server.url_for(1), redis_server.url_for(2)
    url_x = redis_server.url_for(1) + "?channel=x"
    sender1 = await nodes(url1, "s1").start()
    sender2 = await nodes(url2, "s2").start()
    sender_x = await nodes(url_x, "sx").start()
    on1 = await nodes(url1, "r1").start()
    on2 = await nodes(url2, "r2").start()
    on_x = await nodes(url_x, "rx").start()
    # Every sender's first message is sent before any marker: a receiver that heard another
    # deployment would have that message before its own marker.
    first = [s.publish("t", 1) for s in (sender1, sender2, sender_x)]
    await until(lambda: all(s.broker.stats.published == 1 for s in (sender1, sender2, sender_x)))
    markers = [s.publish("t", 2) for s in (sender1, sender2, sender_x)]
    await until(lambda: all(m in r.got for m, r in zip(markers, (on1, on2, on_x), strict=True)))
    assert on1.got == [first[0], markers[0]]
    assert on2.got == [first[1], markers[1]]
    assert on_x.got == [first[2], markers[2]]


async def test_a_full_queue_drops_and_counts(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """Past the queue limit publish() drops (counted), then what was queued is sent."""
    a = await nodes(redis_server.url, "a", queue_limit=100).start()
    b = await nodes(redis_server.url, "b").start()
    sent = [a.publish("t", seq) for seq in range(1, 351)]  # no await: nothing is sent yet
    assert a.broker.queued == 100
    assert a.broker.stats.dropped == 250
    await until(lambda: len(b.got) == 100)
    assert b.got == sent[:100]
    await until(lambda: a.broker.stats.published == 100)
    assert a.broker.queued == 0 and a.broker.stats.dropped == 250


# -- outages -----------------------------------------------------------------------------


async def test_redis_killed_mid_stream_then_restarted(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """kill -9: publish drops (counted), both nodes turn unhealthy; restart: healthy,
    on_reconnect once each, and what is published afterwards is delivered."""
    a = await nodes(redis_server.url, "a", **FAST).start()
    b = await nodes(redis_server.url, "b", **FAST).start()
    before = [a.publish("t", seq) for seq in range(1, 101)]
    await until(lambda: len(b.got) == 100)

    redis_server.kill()
    for seq in range(101, 1101):
        assert a.broker.publish(message("a", "t", seq)) is None
        if seq % 100 == 0:
            await asyncio.sleep(0)
    await until(lambda: not a.broker.healthy and not b.broker.healthy)
    stats = a.broker.stats
    await until(lambda: stats.published + stats.dropped == 1100 and a.broker.queued == 0)
    assert stats.published == 100 and stats.dropped == 1000
    for seq in range(1101, 1201):  # while down: dropped at once, nothing queued
        a.publish("t", seq)
    assert a.broker.queued == 0 and stats.dropped == 1100
    assert a.reconnects == b.reconnects == 0

    redis_server.start()
    await until(lambda: a.broker.healthy and b.broker.healthy)
    assert a.reconnects == b.reconnects == 1
    assert a.broker.stats.reconnects == b.broker.stats.reconnects == 1
    after = [a.publish("t", seq) for seq in range(1201, 1211)]
    await until(lambda: len(b.got) == 110)
    assert b.got == before + after
    assert a.reconnects == b.reconnects == 1


async def test_a_hung_redis_is_detected_and_recovers(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """SIGSTOP: both nodes turn unhealthy (PINGs unanswered, a send times out); SIGCONT:
    healthy again, on_reconnect once each, delivery resumes."""
    a = await nodes(redis_server.url, "a", **FAST).start()
    b = await nodes(redis_server.url, "b", **FAST).start()
    first = a.publish("t", 1)
    await until(lambda: b.got == [first])

    redis_server.pause()
    during = a.publish("t", 2)  # written to the socket, never answered: a timeout
    await until(lambda: not a.broker.healthy and not b.broker.healthy)
    assert a.broker.stats.dropped == 1

    redis_server.resume()
    await until(lambda: a.broker.healthy and b.broker.healthy)
    assert a.reconnects == b.reconnects == 1
    last = a.publish("t", 3)
    await until(lambda: last in b.got)
    # The frozen PUBLISH may still run when Redis wakes (counted as dropped, delivered
    # late or not at all); either way the order holds.
    assert b.got in ([first, last], [first, during, last])
    assert a.reconnects == b.reconnects == 1


async def test_a_quiet_channel_stays_subscribed(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    """With nothing published the subscriber PINGs, Redis answers, and it keeps its
    connection (silence is not taken for a hung Redis)."""
    b = await nodes(redis_server.url, "b", **FAST).start()
    subscriber = [c["id"] for c in await _broker_clients(redis_server.url) if c["sub"] == "1"]
    assert len(subscriber) == 1

    async def pings() -> int:
        async with redis.Redis.from_url(redis_server.url) as raw:
            stats = await raw.info("commandstats")
        return int(stats.get("cmdstat_ping", {}).get("calls", 0))

    async def pinged_thrice() -> bool:
        return await pings() >= 3

    await eventually(pinged_thrice, WAIT)
    assert b.broker.healthy and b.reconnects == 0 and b.broker.stats.reconnects == 0
    now = [c["id"] for c in await _broker_clients(redis_server.url) if c["sub"] == "1"]
    assert now == subscriber


async def test_a_node_starts_while_redis_is_unreachable(
    tmp_path: Any, unused_tcp_port_factory: Callable[[], int], nodes: Callable[..., Node]
) -> None:
    """start() returns without Redis (unhealthy, publish drops); once Redis is up the
    node subscribes, reports one reconnect, and sends and receives."""
    server = RedisServer(tmp_path / "redis", unused_tcp_port_factory())
    try:
        a = await nodes(server.url, "a", **FAST).start()
        assert not a.broker.healthy
        a.publish("t", 1)
        await until(lambda: a.broker.stats.dropped == 1)

        server.start()
        await until(lambda: a.broker.healthy)
        assert a.reconnects == 1
        b = await nodes(server.url, "b", **FAST).start()
        assert b.reconnects == 0
        to_b, to_a = a.publish("t", 2), b.publish("u", 1)
        await until(lambda: b.got == [to_b] and a.got == [to_a])
    finally:
        server.stop()


# -- shutdown ----------------------------------------------------------------------------


async def test_close_sends_the_queue_and_leaves_nothing_behind(
    redis_server: RedisServer,
) -> None:
    """close() sends what is queued, ends both tasks and both connections, no warnings."""
    before = asyncio.all_tasks()
    a = RedisBroker(redis_server.url, "a")
    b = RedisBroker(redis_server.url, "b")
    got: list[Message] = []
    await a.start(lambda m: None, lambda: None)
    await b.start(got.append, lambda: None)
    sent = [message("a", "t", seq) for seq in range(1, 501)]
    for m in sent:
        a.publish(m)
    await a.close()
    assert a.stats.published == 500 and not a.healthy
    await until(lambda: len(got) == 500)
    assert got == sent
    await b.close()
    a.publish(message("a", "t", 501))  # after close: dropped, never raises
    assert a.stats.dropped == 1
    assert asyncio.all_tasks() == before
    assert await _broker_clients(redis_server.url) == []
    gc.collect()  # an unclosed connection would warn now (filterwarnings=error)


async def test_close_while_redis_is_down_returns(
    redis_server: RedisServer,
) -> None:
    """close() on a broker whose Redis is dead or frozen ends without leftovers."""
    before = asyncio.all_tasks()
    a = RedisBroker(redis_server.url, "a", **FAST)
    await a.start(lambda m: None, lambda: None)
    redis_server.pause()
    a.publish(message("a", "t", 1))
    await a.close()
    redis_server.kill()
    assert asyncio.all_tasks() == before
    gc.collect()
