"""Admission control for new WebSocket connections: shed load instead of falling over.

After a restart every client comes back at once. Each handshake costs a token check and
each subscribe a replay from SQLite; accepted all together they can stall the event loop
for everyone, and a stalled loop misses heartbeats, which makes more clients reconnect.
So new connections are refused with 503 + Retry-After while the event loop is lagging
(it is measured, not guessed) or while the server holds its maximum of connections;
clients retry with jittered backoff, which spreads the storm. Open sockets are never
dropped for this.
"""

from __future__ import annotations

import asyncio
import random

from .stats import Histogram

#: Upper bounds of the loop-lag histogram, in seconds of lateness per probe.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class LoopLag:
    """Measures how late the event loop wakes a sleeping task, smoothed."""

    def __init__(self, interval: float = 0.05, smoothing: float = 0.3) -> None:
        #: Seconds between probes.
        self.interval = interval
        self._smoothing = smoothing
        #: Smoothed lateness of the last probes, in seconds.
        self.lag = 0.0
        #: Every probe's lateness (for /metrics: how often the loop ran late, by how much).
        self.histogram = Histogram(LAG_BUCKETS)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            late = max(0.0, loop.time() - before - self.interval)
            self.lag += self._smoothing * (late - self.lag)
            self.histogram.observe(late)


class Admission:
    """Decides whether a new WebSocket may be accepted now."""

    def __init__(self, lag: LoopLag, max_lag: float, max_connections: int) -> None:
        #: The event-loop probe (started and stopped with the app's services).
        self.lag = lag
        #: Shed while the smoothed loop lag is at least this, in seconds (0: never).
        self.max_lag = max_lag
        #: Most open WebSocket connections in all (0: no limit).
        self.max_connections = max_connections

    def refusal(self, open_connections: int) -> tuple[str, int] | None:
        """None to accept, else (reason, seconds to wait before retrying)."""
        if self.max_connections and open_connections >= self.max_connections:
            return "server_full", random.randint(2, 10)
        if self.max_lag and self.lag.lag >= self.max_lag:
            return "overloaded", random.randint(1, 3)
        return None
