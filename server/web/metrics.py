"""GET /metrics: Prometheus text exposition, built when it is scraped.

Nothing on the hot paths touches prometheus_client: the tracker, hub and connections keep
plain ints and `stats.Histogram`s, and `ProgressCollector.collect` turns them into metric
families at scrape time. Task counts by status come from SQLite, read by the async
handler before the (synchronous) collect, so collect never does I/O.

Each app has its own `CollectorRegistry` (tests build many apps in one process; the
global registry would refuse the second app's names).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from .. import protocol
from ..auth import bearer_token
from ..broker import Broker
from ..errors import Unauthorized
from ..hub import Hub
from ..jobs import JobRunner
from ..models import TaskStatus
from ..refusals import LogLimiter, Refusals
from ..relay import Relay
from ..stats import ConnectionStats, Histogram, RequestStats
from ..store import Store, StoreUnavailable
from ..tracker import Tracker

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Task counts are re-read when the tracker has committed since, or when older than this
#: (seconds; the retention job deletes tasks without the tracker).
TASK_COUNTS_MAX_AGE = 5.0
#: Bound on the task-count query, in seconds; past it the previous counts are served.
TASK_COUNTS_TIMEOUT = 2.0
#: Close codes reported as themselves; any other code a client sends counts as "other".
KNOWN_CLOSE_CODES = frozenset(range(1000, 1016)) | frozenset(
    value
    for name, value in vars(protocol).items()
    if name.startswith("CLOSE_") and isinstance(value, int)
)
#: Label values always present, so rate() works from the first scrape.
AUTH_FAILURE_REASONS = (
    "invalid_credentials",
    "invalid_token",
    "missing_token",
    "origin_not_allowed",
    "registration_closed",
    "session_expired",
    "token_expired",
)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Listener(Protocol):
    """What the collector reads of serve.ConnectionGate."""

    open: int
    limit: int


def close_code_label(code: int | None) -> str:
    """The `code` label of a disconnect: known codes as such, "none", or "other"."""
    if code is None:
        return "none"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name,
        doc,
        buckets=[(floatToGoString(le), n) for le, n in hist.cumulative()],
        sum_value=hist.sum,
    )


class Metrics:
    """One app's registry, its plain counters, and what the collector reads at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        #: Bumped by the HTTP middlewares.
        self.requests = RequestStats()
        #: Everything shed or refused, by reason (rates, quotas, full queues, ...).
        self.refusals = Refusals()
        #: Throttles the auth.failed log line (the counts above are exact).
        self.auth_log = LogLimiter()
        #: Shared by every WebSocket connection of the app.
        self.connections = ConnectionStats()
        # Set by `bind` once the services have started.
        self.store: Store | None = None
        self.tracker: Tracker | None = None
        self.hub: Hub | None = None
        self.jobs: JobRunner | None = None
        self.broker: Broker | None = None
        self.relay: Relay | None = None
        #: Lateness of the event loop's probes (admission.LoopLag).
        self.loop_lag: Histogram | None = None
        #: The listening sockets' connection count (set by serve.py; not in test servers).
        self.listener: _Listener | None = None
        #: Tasks per status as last read from SQLite, and when (monotonic) / at which commit.
        self.task_counts: dict[str, int] = {}
        self._counted_at = -float("inf")
        self._counted_commits = -1
        self._counting: asyncio.Task[None] | None = None
        #: Sizes of the database file and its WAL, in bytes, as of the last scrape.
        self.db_bytes: dict[str, int] = {}
        self.registry.register(ProgressCollector(self))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def bind(
        self,
        *,
        store: Store,
        tracker: Tracker,
        hub: Hub,
        jobs: JobRunner,
        broker: Broker | None = None,
        relay: Relay | None = None,
        loop_lag: Histogram | None = None,
    ) -> None:
        self.store, self.tracker, self.hub, self.jobs = store, tracker, hub, jobs
        self.broker, self.relay = broker, relay
        self.loop_lag = loop_lag

    def bind_listener(self, listener: _Listener) -> None:
        self.listener = listener

    async def refresh(self) -> None:
        """Read what collect() must not: task counts (when stale) and file sizes."""
        tracker = self.tracker
        if self.store is not None:
            try:
                self.db_bytes = await self.store.size_bytes()
            except Exception as exc:  # the store is down: report the rest
                log.warning("metrics.size_failed error=%s", type(exc).__name__)
                self.db_bytes = {}
        if self.store is None or tracker is None:
            return
        fresh = time.monotonic() - self._counted_at < TASK_COUNTS_MAX_AGE
        if fresh and tracker.commits == self._counted_commits:
            return
        # Concurrent scrapes share one query.
        if self._counting is None or self._counting.done():
            self._counting = asyncio.create_task(self._count_tasks(tracker.commits))
        await asyncio.shield(self._counting)

    async def _count_tasks(self, commits: int) -> None:
        assert self.store is not None
        try:
            async with asyncio.timeout(TASK_COUNTS_TIMEOUT):
                counts = await self.store.count_tasks_by_status()
        except (TimeoutError, sqlite3.Error, ValueError, StoreUnavailable) as exc:
            # A database outage must not take /metrics down with it (the last counts stay).
            log.warning("metrics.task_count_failed error=%s", type(exc).__name__)
            return
        self.task_counts = counts
        self._counted_at = time.monotonic()
        self._counted_commits = commits


class ProgressCollector:
    """Turns the app's plain counters into metric families; reads memory only."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        yield from self._http(m.requests)
        refused = CounterMetricFamily(
            "progress_refused",
            "Requests and connections refused or shed, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(m.refusals.counts.items()):
            refused.add_metric([reason], n)
        yield refused
        if m.listener is not None:
            yield GaugeMetricFamily(
                "progress_http_connections",
                "Open TCP connections (HTTP and WebSocket) on this node.",
                value=m.listener.open,
            )
            yield GaugeMetricFamily(
                "progress_http_connections_limit",
                "--max-http-connections in force (0: no limit); more are refused with 503.",
                value=m.listener.limit,
            )
        yield from self._connections(m.connections)
        if m.hub is not None:
            yield from self._hub(m.hub)
        if m.broker is not None:
            yield from self._broker(m.broker)
        if m.relay is not None:
            yield CounterMetricFamily(
                "progress_gaps_repaired",
                "Subscriptions that missed events on the way (broker) and were caught up"
                " from the store.",
                value=m.relay.gaps_repaired,
            )
            yield CounterMetricFamily(
                "progress_gap_repair_failures",
                "Catch-ups that failed (the store unreachable) and were tried again.",
                value=m.relay.repair_failures,
            )
        if m.tracker is not None:
            yield from self._tracker(m.tracker)
        if m.store is not None:
            tasks = GaugeMetricFamily(
                "progress_tasks", "Tasks stored, by status.", labels=["status"]
            )
            for status in TaskStatus:
                tasks.add_metric([status.value], m.task_counts.get(status.value, 0))
            yield tasks
        if m.jobs is not None:
            yield GaugeMetricFamily(
                "progress_jobs_running", "Built-in jobs running.", value=m.jobs.running_count
            )
            yield CounterMetricFamily(
                "progress_job_lease_takeovers",
                "Jobs taken over from a node whose lease expired (it died or stalled).",
                value=m.jobs.takeovers,
            )
            yield CounterMetricFamily(
                "progress_job_leases_lost",
                "Jobs this node stopped because another node took their lease.",
                value=m.jobs.leases_lost,
            )
            yield GaugeMetricFamily(
                "progress_jobs_waiting",
                "Built-in jobs waiting for a slot (their tasks are pending).",
                value=m.jobs.waiting_count,
            )
        if m.hub is not None:
            yield GaugeMetricFamily(
                "progress_ws_backlog_bytes",
                "Bytes waiting to be sent to WebSocket clients (outboxes + socket buffers).",
                value=sum(getattr(p, "backlog_bytes", 0) for p in m.hub.peers()),
            )
        if m.loop_lag is not None:
            yield _histogram(
                "progress_event_loop_lag_seconds",
                "How late the event loop woke a probe sleeping 50 ms (everything else waits"
                " as long).",
                m.loop_lag,
            )
        if m.db_bytes:
            size = GaugeMetricFamily(
                "progress_db_size_bytes", "Size of the SQLite files.", labels=["file"]
            )
            for name, value in m.db_bytes.items():
                size.add_metric([name], value)
            yield size

    @staticmethod
    def _http(stats: RequestStats) -> Iterator[Metric]:
        responses = CounterMetricFamily(
            "progress_http_requests",
            "HTTP requests answered, by status class (WebSocket upgrades are 1xx).",
            labels=["status_class"],
        )
        for cls in sorted(set(STATUS_CLASSES) | set(stats.responses)):
            responses.add_metric([cls], stats.responses[cls])
        yield responses
        failures = CounterMetricFamily(
            "progress_auth_failures",
            "Requests and WebSocket handshakes refused with 401 or 403, by error code.",
            labels=["reason"],
        )
        for reason in sorted(set(AUTH_FAILURE_REASONS) | set(stats.auth_failures)):
            failures.add_metric([reason], stats.auth_failures[reason])
        yield failures

    @staticmethod
    def _connections(stats: ConnectionStats) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "progress_ws_connections_opened",
            "WebSocket connections accepted.",
            value=stats.opened,
        )
        closed = CounterMetricFamily(
            "progress_ws_disconnects",
            "WebSocket connections ended, by close code (none: the peer vanished).",
            labels=["code"],
        )
        by_label: dict[str, int] = {}
        for code, n in list(stats.closed_by_code.items()):
            label = close_code_label(code)
            by_label[label] = by_label.get(label, 0) + n
        for label, n in sorted(by_label.items()):
            closed.add_metric([label], n)
        yield closed
        yield CounterMetricFamily(
            "progress_ws_messages_sent",
            "Text messages written to WebSocket clients (events, snapshots, replies).",
            value=stats.messages_sent,
        )
        yield CounterMetricFamily(
            "progress_ws_sent_bytes",
            "Bytes of text messages written to WebSocket clients.",
            value=stats.bytes_sent,
        )
        yield CounterMetricFamily(
            "progress_ws_send_failures",
            "Sends that failed because the connection broke under the writer.",
            value=stats.send_failures,
        )
        yield CounterMetricFamily(
            "progress_ws_slow_consumer_drops",
            "Connections dropped because their send queue overflowed (close 4008).",
            value=stats.slow_consumer_drops,
        )
        yield CounterMetricFamily(
            "progress_ws_handshakes_shed",
            "WebSocket handshakes refused with 503 (event loop lagging or server full).",
            value=stats.handshakes_shed,
        )

    @staticmethod
    def _hub(hub: Hub) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "progress_ws_connections", "Open WebSocket connections.", value=hub.connection_count
        )
        yield GaugeMetricFamily(
            "progress_ws_users", "Users with at least one open connection.", value=hub.user_count
        )
        yield GaugeMetricFamily(
            "progress_ws_subscriptions",
            "Subscriptions (one connection watching one task).",
            value=hub.subscription_count,
        )
        yield CounterMetricFamily(
            "progress_ws_heartbeat_drops",
            "Connections dropped for not answering a ping in time.",
            value=hub.heartbeat_drops,
        )
        yield CounterMetricFamily(
            "progress_events_published",
            "Committed events fanned out to at least one subscriber.",
            value=hub.events_published,
        )
        yield CounterMetricFamily(
            "progress_fanout_messages",
            "Event messages queued for subscribers (one per subscriber per event).",
            value=hub.messages_pushed,
        )

    @staticmethod
    def _broker(broker: Broker) -> Iterator[Metric]:
        stats = broker.stats
        yield GaugeMetricFamily(
            "progress_broker_up", "1 while the broker is reachable.", value=int(broker.healthy)
        )
        yield CounterMetricFamily(
            "progress_broker_published", "Events published to other nodes.", value=stats.published
        )
        yield CounterMetricFamily(
            "progress_broker_received",
            "Events received from other nodes.",
            value=stats.received,
        )
        yield CounterMetricFamily(
            "progress_broker_dropped",
            "Events not published (broker down or queue full); other nodes repair them.",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            "progress_broker_reconnects",
            "Times the broker was lost and found.",
            value=stats.reconnects,
        )
        yield CounterMetricFamily(
            "progress_broker_malformed",
            "Messages on the broker's channel that were not ours to read (ignored).",
            value=getattr(stats, "malformed", 0),
        )
        yield GaugeMetricFamily(
            "progress_broker_queue",
            "Events waiting to be published to other nodes.",
            value=getattr(broker, "queued", 0),
        )
        yield _histogram(
            "progress_broker_publish_lag_seconds",
            "Seconds from commit to the broker's acknowledgement of the publish.",
            stats.publish_lag,
        )

    @staticmethod
    def _tracker(tracker: Tracker) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "progress_events_committed",
            "Events committed to the store.",
            value=tracker.events_committed,
        )
        yield CounterMetricFamily(
            "progress_commit_failures",
            "Transactions that failed and were rolled back (callers got 503).",
            value=tracker.commit_failures,
        )
        yield GaugeMetricFamily(
            "progress_commit_queue",
            "Requests waiting for the commit loop.",
            value=tracker.queued,
        )
        yield _histogram(
            "progress_commit_duration_seconds",
            "Seconds per group-commit transaction, write-lock wait and fsync included.",
            tracker.commit_seconds,
        )
        yield _histogram(
            "progress_commit_batch_size",
            "Requests folded into one group-commit transaction.",
            tracker.batch_sizes,
        )


def response_counter(
    stats: RequestStats,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An `on_response_prepare` hook counting responses by status class as headers go out.

    A signal rather than a middleware: it sees every response, errors and WebSocket
    upgrades (101) included, even when the handler is later cancelled.
    """

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        stats.responses[f"{response.status // 100}xx"] += 1

    return count


def metrics_handler(metrics: Metrics, token: str | None) -> Handler:
    """GET /metrics; with `token` set, only for `Authorization: Bearer <token>`."""
    expose = make_aiohttp_handler(metrics.registry)
    expected = token.encode() if token is not None else None

    async def handler(request: web.Request) -> web.StreamResponse:
        if expected is not None:
            given = bearer_token(request.headers.get("Authorization"))
            # aiohttp decodes header bytes as UTF-8 with surrogateescape, so a non-UTF-8
            # byte arrives as a lone surrogate: strict encoding would raise (a 500).
            given_bytes = given.encode("utf-8", "surrogatepass") if given else None
            if given_bytes is None or not hmac.compare_digest(given_bytes, expected):
                raise Unauthorized("metrics token required", code="invalid_token")
        await metrics.refresh()
        return await expose(request)

    return handler
