"""GET /metrics: Prometheus text from one registry per app, counters that move with the work."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.stats import Histogram
from server.web.metrics import close_code_label

from .helpers import (
    auth_headers,
    create_task,
    eventually,
    post_progress,
    receive_json,
    receive_until,
    register,
    ws_connect,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SERVER = Path(__file__).resolve().parent.parent / "server"


async def serve(aiohttp_client: Any, app: Any) -> TestClient:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def scrape(client: TestClient, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of GET /metrics, parsed by prometheus_client's own parser."""
    resp = await client.get("/metrics", headers=headers)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_is_prometheus_text_with_every_family(client):
    """/metrics answers Prometheus text holding the documented families and process metrics."""
    samples = await scrape(client)
    names = {name for name, _ in samples}
    for name in (
        "progress_ws_connections",
        "progress_ws_subscriptions",
        "progress_ws_messages_sent_total",
        "progress_ws_send_failures_total",
        "progress_ws_slow_consumer_drops_total",
        "progress_ws_heartbeat_drops_total",
        "progress_events_committed_total",
        "progress_commit_duration_seconds_bucket",
        "progress_commit_duration_seconds_count",
        "progress_commit_batch_size_sum",
        "progress_tasks",
        "progress_http_requests_total",
        "progress_auth_failures_total",
        "progress_commit_queue",
        "progress_db_size_bytes",
        "process_resident_memory_bytes",
    ):
        assert name in names, name
    for status in ("pending", "running", "completed", "failed", "cancelled"):
        assert ("progress_tasks", (("status", status),)) in samples
    assert value(samples, "progress_commit_duration_seconds_bucket", le="+Inf") == 0


async def test_counters_and_gauges_move_by_the_work_done(aiohttp_client, make_app):
    """Register, fail auth twice, subscribe, post progress, disconnect: exact deltas.

    (The slow-consumer counter is checked with real stalled sockets in test_slow_consumer.)"""
    client = await serve(aiohttp_client, make_app())
    before = await scrape(client)
    token = await register(client, "alice")
    resp = await client.get("/api/v1/tasks", headers=auth_headers("not.a.token"))
    assert resp.status == 401
    resp = await client.post(
        "/api/v1/auth/login", json={"username": "alice", "password": "wrong password!"}
    )
    assert resp.status == 401
    task = await create_task(client, token)
    ws = await ws_connect(client, token)
    await ws.send_json({"action": "subscribe", "task_id": task["id"]})
    assert (await receive_json(ws))["type"] == "snapshot"

    during = await scrape(client)
    assert value(during, "progress_ws_connections") == 1
    assert value(during, "progress_ws_users") == 1
    assert value(during, "progress_ws_subscriptions") == 1
    assert moved(before, during, "progress_ws_connections_opened_total") == 1
    assert moved(before, during, "progress_tasks", status="pending") == 1

    for progress in (10, 20, 30):
        await post_progress(client, token, task["id"], progress)
        await receive_until(ws, lambda m: m.get("event") == "progress")
    await post_progress(client, token, task["id"], 40)
    await receive_until(ws, lambda m: m.get("progress") == 40)
    await ws.close()

    async def disconnected() -> bool:
        return value(await scrape(client), "progress_ws_connections") == 0

    await eventually(disconnected)
    after = await scrape(client)

    # created + (started, progress) + progress + progress + progress
    assert moved(before, after, "progress_events_committed_total") == 6
    # One transaction per request: they were sent one after the other.
    assert moved(before, after, "progress_commit_duration_seconds_count") == 5
    assert moved(before, after, "progress_commit_duration_seconds_sum") > 0
    assert moved(before, after, "progress_commit_batch_size_count") == 5
    assert moved(before, after, "progress_commit_batch_size_sum") == 5
    assert moved(before, after, "progress_commit_batch_size_bucket", le="1.0") == 5
    # Snapshot, started and four progress events reached the socket.
    assert moved(before, after, "progress_ws_messages_sent_total") == 6
    assert moved(before, after, "progress_ws_sent_bytes_total") > 0
    assert moved(before, after, "progress_events_published_total") == 5
    assert moved(before, after, "progress_fanout_messages_total") == 5
    assert moved(before, after, "progress_ws_slow_consumer_drops_total") == 0
    assert moved(before, after, "progress_ws_disconnects_total", code="1000") == 1
    assert moved(before, after, "progress_ws_send_failures_total") == 0
    assert value(after, "progress_ws_subscriptions") == 0
    assert value(after, "progress_ws_users") == 0
    assert moved(before, after, "progress_tasks", status="pending") == 0
    assert moved(before, after, "progress_tasks", status="running") == 1
    assert moved(before, after, "progress_auth_failures_total", reason="invalid_token") == 1
    assert moved(before, after, "progress_auth_failures_total", reason="invalid_credentials") == 1
    assert moved(before, after, "progress_http_requests_total", status_class="4xx") == 2
    # register, login, create, 4 progress posts, and at least 2 scrapes.
    assert moved(before, after, "progress_http_requests_total", status_class="2xx") >= 9
    # The WebSocket upgrade (101) is counted once, as it is sent.
    assert moved(before, after, "progress_http_requests_total", status_class="1xx") == 1
    assert value(after, "progress_db_size_bytes", file="db") > 0


async def test_handshake_refusals_count_as_auth_failures(client):
    """WebSocket handshakes refused with 401 (token) and 403 (origin) are counted by reason."""
    before = await scrape(client)
    token = await register(client, "bob")
    for kwargs in (
        {"params": {"token": "forged"}},
        {},
        {"headers": {**auth_headers(token), "Origin": "https://evil.example"}},
    ):
        resp = await client.get("/api/v1/ws", **kwargs)
        assert resp.status in (401, 403)
    after = await scrape(client)
    assert moved(before, after, "progress_auth_failures_total", reason="invalid_token") == 1
    assert moved(before, after, "progress_auth_failures_total", reason="missing_token") == 1
    assert moved(before, after, "progress_auth_failures_total", reason="origin_not_allowed") == 1
    assert moved(before, after, "progress_ws_connections_opened_total") == 0


async def test_heartbeat_drop_is_counted(aiohttp_client, make_app):
    """A client that never answers pings is dropped: heartbeat drops +1, disconnect code 1006."""
    client = await serve(aiohttp_client, make_app(heartbeat_interval=0.1, heartbeat_timeout=0.1))
    token = await register(client, "carol")
    ws = await ws_connect(client, token, autoping=False)  # and never reads

    async def dropped() -> bool:
        samples = await scrape(client)
        return (
            value(samples, "progress_ws_heartbeat_drops_total") == 1
            and value(samples, "progress_ws_connections") == 0
        )

    await eventually(dropped)
    samples = await scrape(client)
    assert value(samples, "progress_ws_disconnects_total", code="1006") == 1
    await ws.close()


async def test_each_app_has_its_own_registry(aiohttp_client, make_app, tmp_path):
    """Two apps in one process: work on one does not move the other's counters."""
    first = await serve(aiohttp_client, make_app())
    second = await serve(aiohttp_client, make_app(db_path=tmp_path / "second.db"))
    token = await register(first, "dave")
    task = await create_task(first, token)
    await post_progress(first, token, task["id"], 50)
    first_samples, second_samples = await scrape(first), await scrape(second)
    assert value(first_samples, "progress_events_committed_total") == 3
    assert value(first_samples, "progress_tasks", status="running") == 1
    assert value(second_samples, "progress_events_committed_total") == 0
    assert value(second_samples, "progress_tasks", status="running") == 0


async def test_metrics_token_required_when_set(aiohttp_client, make_app):
    """--metrics-token: /metrics answers 401 (error shape) without it or with another one."""
    secret = "metrics-token-0123456789"
    client = await serve(aiohttp_client, make_app(metrics_token=secret))
    for headers in ({}, auth_headers("wrong-token-0123456789"), {"Authorization": secret}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_token"
    samples = await scrape(client, auth_headers(secret))
    assert value(samples, "progress_auth_failures_total", reason="invalid_token") == 3


def test_histogram_buckets_are_cumulative_and_inclusive():
    """Histogram: a value equal to a bound lands in that bucket; counts are cumulative."""
    hist = Histogram([0.1, 1.0])
    for v in (0.05, 0.1, 0.5, 3.0):
        hist.observe(v)
    assert hist.cumulative() == [(0.1, 2), (1.0, 3), (float("inf"), 4)]
    assert (hist.count, hist.sum) == (4, 3.65)


def test_close_code_labels_are_bounded():
    """Known close codes are labels of their own; anything a client invents is "other"."""
    assert close_code_label(1000) == "1000"
    assert close_code_label(4008) == "4008"
    assert close_code_label(None) == "none"
    assert close_code_label(4999) == "other"
    assert close_code_label(3123) == "other"


def test_hot_modules_do_not_import_prometheus():
    """Storage, tracker, hub and connections keep plain counters; only metrics.py exports."""
    for name in ("store/sqlite.py", "tracker.py", "hub.py", "web/connection.py", "stats.py"):
        tree = ast.parse((SERVER / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m.startswith("prometheus_client") for m in modules), name
