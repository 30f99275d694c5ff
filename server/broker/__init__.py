"""Fan-out between server nodes: the Broker interface and `open_broker(url)`.

A broker carries committed events from the node that committed them to every other node;
it is pub/sub only, history is the store's. Local delivery never goes through it: the
node that commits an event hands it to its own subscribers directly (relay.py), then
publishes it for the others. So `memory://` (one process, the default) publishes
nothing, and the single-process fast path costs what it did before there was a broker.

A broker may lose messages (a restart, a dropped connection, a full queue): receivers
notice the gap by seq, or by the periodic check, and read what they missed from the store
(relay.py). It must never deliver a message of one task out of order relative to another
message of the same task from the same origin; nothing else is assumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from ..stats import Histogram

#: Upper bounds of the publish-lag histogram, in seconds from commit to Redis' answer.
PUBLISH_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True, slots=True)
class Message:
    """One committed event, as it travels between nodes."""

    #: The node that committed it (receivers skip their own).
    origin: str
    task_id: str
    seq: int
    #: The event type (`progress`, `cancelled`, ...): job runners stop on `cancelled`.
    event: str
    #: The event's wire text, exactly as subscribers receive it (protocol.event_message).
    text: str


@dataclass
class BrokerStats:
    """Plain counters for /metrics (read at scrape time)."""

    published: int = 0
    received: int = 0
    #: Messages dropped unsent (queue full, broker down): receivers repair from the store.
    dropped: int = 0
    reconnects: int = 0
    #: Seconds from `publish()` to the broker's acknowledgement.
    publish_lag: Histogram = field(default_factory=lambda: Histogram(PUBLISH_LAG_BUCKETS))


Deliver = Callable[[Message], None]


class Broker(Protocol):
    #: "memory" or "redis".
    kind: str
    stats: BrokerStats

    async def start(self, deliver: Deliver, on_reconnect: Callable[[], None]) -> None:
        """Begin receiving: `deliver(message)` for every message of another node, in the
        order published per origin; `on_reconnect()` after the broker was lost and is back
        (messages in between may be lost: the caller re-checks from the store)."""

    def publish(self, message: Message) -> None:
        """Send to the other nodes; never blocks, never raises (a message that cannot be
        sent is dropped and counted)."""

    @property
    def healthy(self) -> bool:
        """True while the broker is reachable (/healthz)."""

    async def close(self) -> None: ...


def broker_kind(url: str) -> str:
    """`memory` or `redis` for a broker URL; ValueError with a message otherwise."""
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return "memory"
    if parts.scheme in ("redis", "rediss", "unix"):
        return "redis"
    raise ValueError(f"{url!r}: the broker must be memory:// or redis://host:port/db")


async def open_broker(url: str, node_id: str) -> Broker:
    """The broker at `url` (not started)."""
    if broker_kind(url) == "memory":
        from .memory import MemoryBroker

        return MemoryBroker()
    from .redis import RedisBroker

    return RedisBroker(url, node_id)
