"""Plain counters for metrics: ints and bucket lists, no prometheus_client.

The hot modules (tracker, hub, connections) bump these as ordinary attributes; the
collector in `metrics.py` reads them only when /metrics is scraped. Nothing here
allocates or locks per update, so counting costs an attribute increment.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable


class Histogram:
    """Fixed-bucket histogram: counts per upper bound (`le`, inclusive), sum and count."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: Iterable[float]) -> None:
        #: Upper bounds, ascending; the implicit last bucket is +Inf.
        self.bounds: tuple[float, ...] = tuple(sorted(bounds))
        #: Observations per bucket (not cumulative); one more slot than bounds, for +Inf.
        self.counts = [0] * (len(self.bounds) + 1)
        #: Sum of all observed values.
        self.sum = 0.0
        #: Number of observations.
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound) for every bucket, ending with +Inf."""
        out: list[tuple[float, int]] = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class ConnectionStats:
    """Totals over every WebSocket connection of one app (shared by its Connections)."""

    __slots__ = (
        "opened",
        "closed_by_code",
        "messages_sent",
        "bytes_sent",
        "send_failures",
        "slow_consumer_drops",
        "handshakes_shed",
    )

    def __init__(self) -> None:
        #: Connections accepted (after a successful handshake).
        self.opened = 0
        #: Ended connections by close code (None: no code, e.g. the peer vanished); the
        #: collector folds codes it does not know into "other".
        self.closed_by_code: Counter[int | None] = Counter()
        #: Text frames written to sockets by the writers (events, snapshots, replies).
        self.messages_sent = 0
        #: Characters of those frames (wire JSON is ASCII, so bytes).
        self.bytes_sent = 0
        #: Writers that failed to send (connection reset or closed under them).
        self.send_failures = 0
        #: Connections dropped because their outbox overflowed (close 4008).
        self.slow_consumer_drops = 0
        #: Handshakes refused with 503 because the server was overloaded or full.
        self.handshakes_shed = 0


class RequestStats:
    """HTTP responses by status class and refused credentials, for one app."""

    __slots__ = ("responses", "auth_failures")

    def __init__(self) -> None:
        #: Responses by status class, "1xx" (WebSocket upgrades) to "5xx", counted as
        #: their headers are sent.
        self.responses: Counter[str] = Counter()
        #: Refused requests by error code (invalid_token, token_expired, missing_token,
        #: invalid_credentials, origin_not_allowed, ...).
        self.auth_failures: Counter[str] = Counter()
