"""The connection hub: this node's registry of open connections, who watches which task,
and fan-out of events.

The hub is the one place that knows which connections are open: the per-user connection
limit (`reserve` before the upgrade, `connect` after), shutdown, session revocation and
metrics all ask it. It knows peers only through the small `Peer` interface (push a
ready-made text message, ping, drop), never HTTP or a socket. Nothing here awaits:
`deliver` puts one pre-serialised message into each subscriber's own bounded outbox and
returns, so a slow or dead subscriber cannot delay the others; a peer whose outbox
overflows drops itself.

Each subscription checks seqs: a repeat is dropped, and a seq beyond the next one (an
event this node never got, e.g. lost by the broker) puts the subscription back to
buffering and calls `on_gap`, whose owner (relay.py) reads the missing events from the
store and lets it go live again: the same merge as a subscribe with `last_seq`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Protocol

from .models import Event

log = logging.getLogger(__name__)


class Peer(Protocol):
    """One connected client, as the hub sees it."""

    id: str
    user_id: int
    #: loop.time() of the last frame received from the peer.
    last_seen: float
    #: loop.time() of an unanswered ping, or None.
    ping_sent_at: float | None

    def push(self, data: str) -> None:
        """Queue a text message; never blocks (an overflowing peer drops itself)."""

    async def wait_for_room(self) -> None:
        """Wait until the peer has taken enough of what was sent (paces replays)."""

    def close(self, code: int, reason: str, notice: str | None = None) -> None:
        """Close after what is queued (with `notice` first, if any)."""

    def ping(self) -> None:
        """Queue a protocol-level ping."""

    def abort(self, reason: str) -> None:
        """Drop the peer at once, discarding anything unsent."""


def limit_key(peer: Peer) -> Hashable:
    """What a peer counts under for the per-user connection limit: its `limit_key` if it
    has one (share-token viewers count apart from their owner's own sockets), else its user."""
    return getattr(peer, "limit_key", peer.user_id)


class Subscription:
    """One peer watching one task.

    While `buffer` is a list the subscription is replaying history and live events wait
    there; `go_live` drains it. `last_seq` is the highest seq handed to the peer, so no
    seq is ever delivered twice or out of order.

    The buffer is bounded (`max_messages`, `max_bytes`): a replay that takes long while
    the task moves fast would otherwise hold every live event meanwhile. When it would
    overflow, it is emptied and `overflows` counted; the replay then gives up on the
    history and ends with a fresh snapshot (`recovered: false`), after which the events
    buffered since are delivered as usual.
    """

    __slots__ = (
        "peer",
        "task_id",
        "last_seq",
        "buffer",
        "buffered_bytes",
        "overflows",
        "max_messages",
        "max_bytes",
        "on_gap",
        "gaps",
    )

    def __init__(
        self,
        peer: Peer,
        task_id: str,
        max_messages: int,
        max_bytes: int,
        on_gap: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.peer = peer
        self.task_id = task_id
        self.last_seq = 0
        self.buffer: list[tuple[int, str]] | None = []
        #: Bytes (UTF-8) of the messages in `buffer`.
        self.buffered_bytes = 0
        #: Times the buffer overflowed during this replay.
        self.overflows = 0
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        #: Called when an event arrives beyond the next seq (None: the caller has no store
        #: to repair from, e.g. tests; the event is then delivered anyway).
        self.on_gap = on_gap
        #: Gaps seen (each repaired from the store).
        self.gaps = 0

    @property
    def buffering(self) -> bool:
        return self.buffer is not None

    def deliver(self, seq: int, data: str) -> None:
        if self.buffer is not None:
            size = len(data.encode())
            if len(self.buffer) >= self.max_messages or self.buffered_bytes + size > self.max_bytes:
                self.buffer.clear()
                self.buffered_bytes = 0
                self.overflows += 1
            self.buffer.append((seq, data))
            self.buffered_bytes += size
        elif seq == self.last_seq + 1 or (seq > self.last_seq and self.on_gap is None):
            self.last_seq = seq
            self.peer.push(data)
        elif seq > self.last_seq:
            # Missed seqs in between: hold this one and have them read from the store.
            self.gaps += 1
            self.buffer = [(seq, data)]
            self.buffered_bytes = len(data.encode())
            self.overflows = 0
            self.on_gap(self)


class Hub:
    def __init__(
        self,
        encode: Callable[[Event], str],
        *,
        buffer_messages: int = 1000,
        buffer_bytes: int = 1024 * 1024,
    ) -> None:
        self._encode = encode
        #: Bounds of the live-event buffer a replaying subscription holds.
        self._buffer_messages = buffer_messages
        self._buffer_bytes = buffer_bytes
        #: Called with a subscription that saw a gap (set by the relay; None: no repair).
        self.on_gap: Callable[[Subscription], None] | None = None
        #: Handshakes that passed the per-user limit and have not connected yet, by the key
        #: they count under (see `limit_key`).
        self._reserved: dict[Hashable, int] = {}
        #: Every live peer, by id.
        self._peers: dict[str, Peer] = {}
        #: Peer ids by the key they count under for the per-user limit.
        self._by_user: dict[Hashable, set[str]] = {}
        #: task id -> peer id -> subscription.
        self._by_task: dict[str, dict[str, Subscription]] = {}
        #: peer id -> task id -> subscription (for cleanup on disconnect).
        self._by_peer: dict[str, dict[str, Subscription]] = {}
        #: Events fanned out and messages pushed, for metrics and benchmarks.
        self.events_published = 0
        self.messages_pushed = 0
        #: Peers dropped for not answering a ping, and the ids of those still registered.
        self.heartbeat_drops = 0
        self._dropped: set[str] = set()

    # -- registry ------------------------------------------------------------------------

    def reserve(self, user_id: Hashable, limit: int) -> bool:
        """Hold a place for a handshake of `user_id` under `limit` connections (0: none).

        `user_id` is what the connection counts under (`limit_key`): the user, or for
        connections opened with a share token ("shared", the owner).

        Taken before the upgrade, with no await since the check, and turned into the
        connection by `connect` (or given back by `cancel_reservation`): concurrent
        handshakes of one user cannot all slip under the limit.
        """
        held = len(self._by_user.get(user_id, ())) + self._reserved.get(user_id, 0)
        if limit and held >= limit:
            return False
        self._reserved[user_id] = self._reserved.get(user_id, 0) + 1
        return True

    def cancel_reservation(self, user_id: Hashable) -> None:
        left = self._reserved.get(user_id, 0) - 1
        if left > 0:
            self._reserved[user_id] = left
        else:
            self._reserved.pop(user_id, None)

    def connect(self, peer: Peer) -> None:
        """Register an open connection (turning its user's reservation, if any, into it)."""
        key = limit_key(peer)
        if self._reserved.get(key):
            self.cancel_reservation(key)
        self._peers[peer.id] = peer
        self._by_user.setdefault(key, set()).add(peer.id)
        self._by_peer[peer.id] = {}

    def disconnect(self, peer: Peer) -> list[str]:
        """Forget the peer and release its subscriptions; returns the task ids it watched."""
        if self._peers.pop(peer.id, None) is None:
            return []
        self._dropped.discard(peer.id)
        key = limit_key(peer)
        ids = self._by_user.get(key)
        if ids is not None:
            ids.discard(peer.id)
            if not ids:
                del self._by_user[key]
        subs = self._by_peer.pop(peer.id, {})
        for task_id in subs:
            self._remove_from_task(task_id, peer.id)
        return list(subs)

    @property
    def connection_count(self) -> int:
        return len(self._peers)

    @property
    def user_count(self) -> int:
        """Users with at least one connection."""
        return len(self._by_user)

    @property
    def subscription_count(self) -> int:
        return sum(len(s) for s in self._by_task.values())

    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    def connections_of(self, user_id: Hashable) -> int:
        return len(self._by_user.get(user_id, ()))

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, peer: Peer, task_id: str) -> Subscription:
        """Subscribe (or re-subscribe) in buffering mode; call `go_live` after the replay."""
        sub = Subscription(
            peer, task_id, self._buffer_messages, self._buffer_bytes, on_gap=self.on_gap
        )
        self._by_task.setdefault(task_id, {})[peer.id] = sub
        self._by_peer.setdefault(peer.id, {})[task_id] = sub
        return sub

    def restart_buffer(self, sub: Subscription) -> None:
        """Forget what the buffer holds (the replay is replaced by a snapshot read after)."""
        if sub.buffer is not None:
            sub.buffer.clear()
            sub.buffered_bytes = 0

    def go_live(self, sub: Subscription, delivered_seq: int) -> None:
        """End the replay: `delivered_seq` was the last seq sent; flush newer buffered events."""
        buffered = sub.buffer or []
        sub.buffer = None
        sub.buffered_bytes = 0
        sub.last_seq = max(sub.last_seq, delivered_seq)
        for seq, data in buffered:
            sub.deliver(seq, data)

    def unsubscribe(self, peer: Peer, task_id: str, only: Subscription | None = None) -> bool:
        """Drop the peer's subscription to the task (only if it is `only`, when given)."""
        subs = self._by_peer.get(peer.id)
        if subs is None or task_id not in subs or (only is not None and subs[task_id] is not only):
            return False
        del subs[task_id]
        self._remove_from_task(task_id, peer.id)
        return True

    def is_subscribed(self, peer: Peer, task_id: str) -> bool:
        return task_id in self._by_peer.get(peer.id, {})

    def subscriptions_of(self, peer: Peer) -> int:
        return len(self._by_peer.get(peer.id, ()))

    def _remove_from_task(self, task_id: str, peer_id: str) -> None:
        watchers = self._by_task.get(task_id)
        if watchers is not None:
            watchers.pop(peer_id, None)
            if not watchers:
                del self._by_task[task_id]

    def has_subscribers(self, task_id: str) -> bool:
        return task_id in self._by_task

    def active_tasks(self) -> list[str]:
        """Task ids that have at least one subscriber."""
        return list(self._by_task)

    # -- sending -------------------------------------------------------------------------

    def publish(self, event: Event) -> None:
        """Fan a committed event out to the task's subscribers, encoding it once."""
        if event.task_id in self._by_task:
            self.deliver(event.task_id, event.seq, self._encode(event))

    def deliver(self, task_id: str, seq: int, data: str) -> None:
        """Fan an event's wire text out to the task's subscribers (the relay calls this)."""
        watchers = self._by_task.get(task_id)
        if not watchers:
            return
        self.events_published += 1
        self.messages_pushed += len(watchers)
        # Copy: a peer that overflows drops itself, which may change the dict.
        for sub in list(watchers.values()):
            sub.deliver(seq, data)

    def subscriptions_to(self, task_id: str) -> list[Subscription]:
        return list(self._by_task.get(task_id, {}).values())

    def send_personal(self, peer_id: str, data: str) -> bool:
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        peer.push(data)
        return True

    def send_to_user(self, user_id: int, data: str) -> int:
        """Push to every connection of one user; returns how many."""
        ids = list(self._by_user.get(user_id, ()))
        for peer_id in ids:
            self._peers[peer_id].push(data)
        return len(ids)

    def broadcast(self, data: str, peers: Iterable[Peer] | None = None) -> None:
        for peer in list(peers if peers is not None else self._peers.values()):
            peer.push(data)

    # -- liveness ------------------------------------------------------------------------

    def check_liveness(self, now: float, interval: float, timeout: float) -> int:
        """Ping peers silent for `interval` s; drop those whose ping went unanswered for
        `timeout` s. Returns how many were dropped."""
        dropped = 0
        for peer in list(self._peers.values()):
            if peer.id in self._dropped:
                continue  # aborted already; its handler has not called disconnect yet
            if peer.ping_sent_at is not None:
                if now - peer.ping_sent_at >= timeout:
                    peer.abort("heartbeat timeout")
                    self._dropped.add(peer.id)
                    self.heartbeat_drops += 1
                    dropped += 1
            elif now - peer.last_seen >= interval:
                peer.ping_sent_at = now
                peer.ping()
        return dropped
