"""Limits: the token buckets on a fake clock, their flags, and each limit against a server.

Each server test sets the limit low, trips it, checks the error (shape, code, close code,
Retry-After), that nothing was stored or subscribed, and that another client of the same
server goes on being served. Rates are set so low (one token per ~1000 s) that no token
comes back during a test: nothing here depends on timing.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient

from server.config import Config, from_args
from server.limits import (
    FLOOD_WINDOW,
    KeyedBuckets,
    MessageLimiter,
    TokenBucket,
    Verdict,
)
from server.web.keys import hub_key

from .helpers import (
    auth_headers,
    create_task,
    eventually,
    post_progress,
    receive_json,
    register,
    ws_connect,
)
from .test_error_shape import assert_error_shape

WS = "/api/v1/ws"
#: A rate at which no token comes back within a test (one per 1000 s).
NEVER = 0.001


class FakeClock:
    """Seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def assert_pong(ws: aiohttp.ClientWebSocketResponse, msg_id: str = "alive?") -> None:
    """`ws` is open, served, and has nothing else queued."""
    await ws.send_json({"action": "ping", "id": msg_id})
    assert await receive_json(ws) == {"type": "pong", "id": msg_id}


async def subscribe(ws: aiohttp.ClientWebSocketResponse, task_id: str, msg_id: Any = None) -> Any:
    message: dict[str, Any] = {"action": "subscribe", "task_id": task_id}
    if msg_id is not None:
        message["id"] = msg_id
    await ws.send_json(message)
    return await receive_json(ws)


def retry_after(headers: Any) -> int:
    """The Retry-After header, which must be whole seconds >= 1."""
    value = headers.get("Retry-After")
    assert value is not None and value.isdigit(), value
    assert int(value) >= 1
    return int(value)


# -- TokenBucket ---------------------------------------------------------------------------


def test_bucket_starts_full_and_refuses_when_empty() -> None:
    """A fresh bucket gives `burst` tokens at once, then says how long until the next."""
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, now=clock.now)
    assert [bucket.take(clock.now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(clock.now) == pytest.approx(0.5)
    assert bucket.take(clock.now) == pytest.approx(0.5)  # a refusal takes nothing


def test_bucket_refills_at_rate_up_to_burst() -> None:
    """Tokens come back at `rate` per second and never pile up beyond `burst`."""
    clock = FakeClock()
    bucket = TokenBucket(rate=8.0, burst=5, now=clock.now)  # binary fractions: exact
    for _ in range(5):
        bucket.take(clock.now)
    assert bucket.take(clock.advance(0.0625)) == 0.0625  # half a token
    assert bucket.take(clock.advance(0.0625)) == 0.0
    assert not bucket.is_full(clock.now)
    assert bucket.is_full(clock.advance(3600))
    assert [bucket.take(clock.now) for _ in range(6)][-2:] == [0.0, 0.125]


def test_bucket_sustained_rate_is_rate() -> None:
    """Offered 3x its rate for 10 s, a bucket admits burst + rate x 10 messages."""
    clock = FakeClock()
    bucket = TokenBucket(rate=20.0, burst=40, now=clock.now)
    admitted = 0
    for _ in range(600):  # 60 per second for 10 s
        admitted += bucket.take(clock.advance(1 / 60)) == 0.0
    assert admitted == pytest.approx(40 + 200, abs=1)


# -- MessageLimiter ------------------------------------------------------------------------


def test_limiter_refuses_then_closes_a_flood() -> None:
    """After the burst: `flood_limit` refusals, then CLOSE."""
    clock = FakeClock()
    limiter = MessageLimiter(rate=1.0, burst=2, flood_limit=3, now=clock.now)
    verdicts = [limiter.check(clock.now) for _ in range(6)]
    assert verdicts == [Verdict.ADMIT] * 2 + [Verdict.REFUSE] * 3 + [Verdict.CLOSE]


def test_limiter_forgets_refusals_after_the_window() -> None:
    """Refusals spread over more than FLOOD_WINDOW seconds never add up to a flood."""
    clock = FakeClock()
    limiter = MessageLimiter(rate=NEVER, burst=1, flood_limit=2, now=clock.now)
    assert limiter.check(clock.now) is Verdict.ADMIT
    for _ in range(5):
        assert limiter.check(clock.now) is Verdict.REFUSE
        assert limiter.check(clock.now) is Verdict.REFUSE
        clock.advance(FLOOD_WINDOW)
    assert [limiter.check(clock.now) for _ in range(3)][-1] is Verdict.CLOSE


def test_limiter_slightly_over_the_rate_gets_errors_but_is_not_closed() -> None:
    """A client at 1.1x the rate (10 refusals per window) is refused now and then, never
    closed by a flood limit of 15."""
    clock = FakeClock()
    limiter = MessageLimiter(rate=10.0, burst=10, flood_limit=15, now=clock.now)
    verdicts = [limiter.check(clock.advance(1 / 11)) for _ in range(11 * 60)]
    assert Verdict.REFUSE in verdicts
    assert Verdict.CLOSE not in verdicts


def test_limiter_flood_limit_zero_closes_at_the_first_refusal() -> None:
    """--ws-flood-limit 0: no error replies, the first message over the rate closes."""
    clock = FakeClock()
    limiter = MessageLimiter(rate=NEVER, burst=1, flood_limit=0, now=clock.now)
    assert [limiter.check(clock.now) for _ in range(2)] == [Verdict.ADMIT, Verdict.CLOSE]


# -- KeyedBuckets --------------------------------------------------------------------------


def test_keyed_buckets_are_independent() -> None:
    """Each key has its own bucket."""
    clock = FakeClock()
    buckets = KeyedBuckets(rate=NEVER, burst=2)
    assert [buckets.take("a", clock.now) for _ in range(3)][:2] == [0.0, 0.0]
    assert buckets.take("a", clock.now) > 0
    assert buckets.take("b", clock.now) == 0.0


def test_keyed_buckets_rate_zero_is_unlimited() -> None:
    """rate 0 turns the limit off and keeps no state."""
    buckets = KeyedBuckets(rate=0.0, burst=1)
    assert all(buckets.take(("u", i % 3), 0.0) == 0.0 for i in range(1000))
    assert len(buckets) == 0


def test_keyed_buckets_drop_idle_keys() -> None:
    """Buckets of keys unused long enough to refill are forgotten: memory follows activity."""
    clock = FakeClock()
    buckets = KeyedBuckets(rate=8.0, burst=20)  # refills in 2.5 s; binary fractions: exact
    for i in range(1000):
        buckets.take(f"task-{i}", clock.now)
    assert len(buckets) == 1000
    clock.advance(2.5)
    for _ in range(9):  # 3 posts per 1/8 s: 2 more than come back, so never full
        for _ in range(3):
            assert buckets.take("busy", clock.now) == 0.0
        clock.advance(0.125)
    assert len(buckets) == 1  # the idle ones were swept; the busy one kept its state:
    assert [buckets.take("busy", clock.now) for _ in range(3)] == [0.0, 0.0, 0.125]


def test_keyed_buckets_hard_bound() -> None:
    """Past max_keys the oldest bucket is forgotten; the count never exceeds the bound."""
    clock = FakeClock()
    buckets = KeyedBuckets(rate=NEVER, burst=1, max_keys=100)
    for i in range(1000):
        buckets.take(i, clock.now)
        assert len(buckets) <= 100
    assert buckets.take(999, clock.now) > 0  # recent keys are still limited


# -- per-user reservations in the hub ------------------------------------------------------


def test_hub_reservations_limit_per_user() -> None:
    """At most `limit` places per user (reserved or connected); a cancelled one is free
    again; 0 is no limit."""
    from server.hub import Hub

    hub = Hub(encode=str)
    assert [hub.reserve(1, 2) for _ in range(3)] == [True, True, False]
    assert hub.reserve(2, 2)
    hub.cancel_reservation(1)
    assert hub.reserve(1, 2)
    assert all(hub.reserve(7, 0) for _ in range(500))


# -- configuration -------------------------------------------------------------------------


def test_limit_flags_and_environment_variables() -> None:
    """Each limit has a flag and a PROGRESS_* variable; the flag wins."""
    config = from_args(
        [
            "--ws-rate", "5", "--ws-burst", "7", "--ws-flood-limit", "0",
            "--max-subscriptions", "3", "--max-connections-per-user", "4",
            "--task-rate", "0.5",
        ],
        env={"PROGRESS_TASK_BURST": "9", "PROGRESS_TASK_RATE": "99"},
    )  # fmt: skip
    assert (config.ws_rate, config.ws_burst, config.ws_flood_limit) == (5.0, 7, 0)
    assert (config.max_subscriptions, config.max_connections_per_user) == (3, 4)
    assert (config.task_rate, config.task_burst) == (0.5, 9)
    env = {
        "PROGRESS_WS_RATE": "0",
        "PROGRESS_MAX_SUBSCRIPTIONS": "0",
        "PROGRESS_MAX_CONNECTIONS_PER_USER": "0",
    }
    config = from_args([], env=env)
    assert (config.ws_rate, config.max_subscriptions, config.max_connections_per_user) == (0, 0, 0)


def test_limit_defaults_are_generous() -> None:
    """Defaults leave room for a dashboard resubscribing all it may hold at once."""
    config = Config()
    assert config.ws_burst >= config.max_subscriptions + 10
    assert config.max_connections_per_user >= 20
    assert config.task_rate >= 50 and config.task_burst >= config.task_rate


@pytest.mark.parametrize(
    "argv",
    [
        ["--ws-rate", "-1"],
        ["--ws-rate", "nan"],
        ["--ws-rate", "inf"],
        ["--ws-burst", "0"],
        ["--ws-flood-limit", "-1"],
        ["--max-subscriptions", "-1"],
        ["--max-connections-per-user", "-5"],
        ["--task-rate", "-0.5"],
        ["--task-burst", "0"],
        ["--max-subscriptions", "many"],
    ],
)
def test_bad_limit_values_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad limit is argparse's usage error (status 2) naming the flag."""
    with pytest.raises(SystemExit) as exc_info:
        from_args(argv, env={})
    assert exc_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


# -- client messages per connection (--ws-rate) -------------------------------------------


async def test_ws_rate_limit_refuses_then_closes_1008(aiohttp_client, make_app):
    """Over the rate: rate_limited errors (message not acted on), then close 1008; another
    connection of the same user is unaffected; protocol pings are not counted."""
    client = await serve(aiohttp_client, make_app(ws_rate=NEVER, ws_burst=3, ws_flood_limit=2))
    token = await register(client, "alice")
    task = await create_task(client, token)
    hub = client.app[hub_key]
    other = await ws_connect(client, token)
    offender = await ws_connect(client, token)
    for _ in range(5):
        await offender.ping()  # control frames: answered, not counted
    for i in range(3):
        await assert_pong(offender, f"ok{i}")
    await offender.send_json({"action": "subscribe", "task_id": task["id"], "id": "sub"})
    error = await receive_json(offender)
    assert error["type"] == "error" and error["code"] == "rate_limited", error
    assert error["id"] == "sub" and error["message"]
    assert not hub.has_subscribers(task["id"])  # not acted on
    await offender.send_str("not even JSON")
    assert (await receive_json(offender))["code"] == "rate_limited"
    await offender.send_bytes(b"binary counts too")
    assert (await receive_json(offender))["code"] == "rate_limited"  # the closing notice
    msg = await offender.receive(timeout=5)
    assert msg.type is WSMsgType.CLOSE and msg.data == 1008, msg
    assert "rate" in msg.extra
    await offender.close()
    assert offender.close_code == 1008

    async def offender_gone() -> bool:
        return hub.connection_count == 1

    await eventually(offender_gone)
    assert (await subscribe(other, task["id"]))["type"] == "snapshot"
    seq = await post_progress(client, token, task["id"], 10)  # "started", then this
    assert [(await receive_json(other))["seq"] for _ in range(2)] == [seq - 1, seq]
    await assert_pong(other)
    await other.close()


async def test_ws_rate_zero_is_unlimited(aiohttp_client, make_app):
    """--ws-rate 0: a burst far over any bucket is answered in full."""
    client = await serve(aiohttp_client, make_app(ws_rate=0.0, ws_burst=1))
    token = await register(client, "alice")
    ws = await ws_connect(client, token)
    for i in range(300):
        await ws.send_json({"action": "ping", "id": i})
    assert [(await receive_json(ws))["id"] for _ in range(300)] == list(range(300))
    await ws.close()


# -- subscriptions per connection (--max-subscriptions) ------------------------------------


async def test_max_subscriptions_per_connection(aiohttp_client, make_app):
    """One subscription too many: too_many_subscriptions, nothing subscribed; a
    re-subscribe does not count; the limit is per connection."""
    client = await serve(aiohttp_client, make_app(max_subscriptions=2))
    token = await register(client, "alice")
    hub = client.app[hub_key]
    t1, t2, t3 = [(await create_task(client, token))["id"] for _ in range(3)]
    ws = await ws_connect(client, token)
    assert (await subscribe(ws, t1))["type"] == "snapshot"
    assert (await subscribe(ws, t2))["type"] == "snapshot"
    error = await subscribe(ws, t3, msg_id=7)
    assert error["type"] == "error" and error["code"] == "too_many_subscriptions", error
    assert error["id"] == 7 and error["message"]
    assert not hub.has_subscribers(t3)
    await post_progress(client, token, t3, 50)
    await assert_pong(ws)  # no event of t3 arrived
    # Re-subscribing to a task already subscribed is not a new subscription.
    assert (await subscribe(ws, t1, msg_id="again"))["type"] == "snapshot"
    # Another connection of the same user has its own allowance.
    other = await ws_connect(client, token)
    assert (await subscribe(other, t3))["type"] == "snapshot"
    seq = await post_progress(client, token, t3, 60)
    assert (await receive_json(other))["seq"] == seq
    # Unsubscribing frees a place.
    await ws.send_json({"action": "unsubscribe", "task_id": t2})
    assert (await receive_json(ws))["type"] == "unsubscribed"
    assert (await subscribe(ws, t3))["type"] == "snapshot"
    await ws.close()
    await other.close()


# -- connections per user (--max-connections-per-user) -------------------------------------


async def test_max_connections_per_user_refuses_the_new_one_with_429(aiohttp_client, make_app):
    """One connection too many is refused before the upgrade (429, too_many_connections,
    Retry-After); the open ones keep working; other users are unaffected."""
    client = await serve(aiohttp_client, make_app(max_connections_per_user=2))
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    hub = client.app[hub_key]
    first = await ws_connect(client, alice)
    second = await ws_connect(client, alice)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await ws_connect(client, alice)
    assert info.value.status == 429
    retry_after(info.value.headers)
    # The same refusal as plain HTTP: the documented error body.
    resp = await client.get(WS, headers=auth_headers(alice))
    error = await assert_error_shape(resp, 429, "too_many_connections")
    assert "2" in error["message"]
    retry_after(resp.headers)
    assert hub.connection_count == 2
    # The oldest is not dropped.
    await assert_pong(first)
    await assert_pong(second)
    # Someone else connects as usual.
    bobs = [await ws_connect(client, bob) for _ in range(2)]
    await assert_pong(bobs[0])
    # A closed connection gives its place back.
    await first.close()

    async def reconnects() -> bool:
        try:
            ws = await ws_connect(client, alice)
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 429
            return False
        await assert_pong(ws)
        await ws.close()
        return True

    await eventually(reconnects)
    for ws in (second, *bobs):
        await ws.close()


async def test_concurrent_handshakes_do_not_exceed_the_limit(aiohttp_client, make_app):
    """Many simultaneous handshakes of one user: exactly the limit get through."""
    client = await serve(aiohttp_client, make_app(max_connections_per_user=3))
    token = await register(client, "alice")
    results = await asyncio.gather(
        *(ws_connect(client, token) for _ in range(12)), return_exceptions=True
    )
    opened = [r for r in results if isinstance(r, aiohttp.ClientWebSocketResponse)]
    refused = [r for r in results if isinstance(r, aiohttp.WSServerHandshakeError)]
    assert len(opened) == 3, results
    assert len(refused) == 9 and {r.status for r in refused} == {429}
    assert client.app[hub_key].connection_count == 3
    for ws in opened:
        await assert_pong(ws)
        await ws.close()


async def test_per_task_endpoint_counts_towards_the_limit(aiohttp_client, make_app):
    """The per-task endpoint is limited the same way, and its refusal subscribes nothing."""
    client = await serve(aiohttp_client, make_app(max_connections_per_user=1))
    token = await register(client, "alice")
    task = await create_task(client, token)
    ws = await ws_connect(client, token)
    resp = await client.get(f"/api/v1/stock/ws/analyze/{task['id']}", headers=auth_headers(token))
    await assert_error_shape(resp, 429, "too_many_connections")
    assert not client.app[hub_key].has_subscribers(task["id"])
    await assert_pong(ws)
    await ws.close()


# -- progress posts per task (--task-rate) -------------------------------------------------


async def test_task_rate_limit_is_429_with_retry_after_and_stores_nothing(aiohttp_client, make_app):
    """Over the task's rate: 429 rate_limited with Retry-After, no event stored or sent;
    other tasks, other users and the task's other actions are unaffected."""
    client = await serve(aiohttp_client, make_app(task_rate=NEVER, task_burst=2))
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    task = await create_task(client, alice)
    watcher = await ws_connect(client, alice)
    assert (await subscribe(watcher, task["id"]))["type"] == "snapshot"
    url = f"/api/v1/tasks/{task['id']}/progress"
    for p in (10, 20):
        await post_progress(client, alice, task["id"], p)
    got = [await receive_json(watcher) for _ in range(3)]
    assert [(m["event"], m["progress"]) for m in got] == [
        ("started", 0),
        ("progress", 10),
        ("progress", 20),
    ]
    resp = await client.post(url, json={"progress": 30}, headers=auth_headers(alice))
    error = await assert_error_shape(resp, 429, "rate_limited")
    assert "progress" in error["message"]
    retry_after(resp.headers)
    events = await client.get(f"/api/v1/tasks/{task['id']}/events", headers=auth_headers(alice))
    assert [e["seq"] for e in (await events.json())["events"]] == [1, 2, 3, 4]
    await assert_pong(watcher)  # nothing was sent for the refused post
    # Another task of the same user, and another user's task, post as usual.
    await post_progress(client, alice, (await create_task(client, alice))["id"], 5)
    await post_progress(client, bob, (await create_task(client, bob))["id"], 5)
    # Completing is not rate-limited: a worker can always finish.
    resp = await client.post(
        f"/api/v1/tasks/{task['id']}/complete", json={}, headers=auth_headers(alice)
    )
    assert resp.status == 200, await resp.text()
    await watcher.close()


async def test_task_rate_of_a_stranger_does_not_spend_the_owners(aiohttp_client, make_app):
    """Someone else posting to a task spends only their own allowance, not the owner's."""
    client = await serve(aiohttp_client, make_app(task_rate=NEVER, task_burst=2))
    alice = await register(client, "alice")
    mallory = await register(client, "mallory")
    task = await create_task(client, alice)
    url = f"/api/v1/tasks/{task['id']}/progress"
    statuses = []
    for _ in range(4):
        resp = await client.post(url, json={"progress": 1}, headers=auth_headers(mallory))
        statuses.append(resp.status)
    assert statuses == [404, 404, 429, 429]
    assert [await post_progress(client, alice, task["id"], p) for p in (1, 2)] == [3, 4]
