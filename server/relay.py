"""The relay: committed events to this node's subscribers and job runner, exactly once,
in order, whichever node committed them.

An event committed here is delivered to the local hub at once (a tracker listener: no
broker on the way, so one process costs what it always did), then published through the
broker for the other nodes. An event from another node arrives through the broker. Either
way the hub checks each subscription's seqs: a repeat is dropped, and a seq beyond the
next one means events were lost on the way (a broker restart, a dropped connection, a
publisher that died between commit and publish), so the subscription buffers while the
missing events are read from the store (`Replayer.catch_up`), then goes live again.

A lost event is noticed when a later one of the same task arrives; if none does, the
periodic check finds it: every `check_interval` seconds the latest seq of every task
with local subscribers is read from the store (one query per 500 tasks), and a
subscription still behind a seq it was already behind at the previous check is caught up
(the one-check grace lets events in flight arrive first). After the broker reconnects,
every subscription is checked at once. With the memory broker nothing can be lost and
the check does not run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from . import protocol
from .broker import Broker, Message
from .hub import Hub, Subscription
from .models import Event
from .replay import Replayer
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

#: Seconds between two periodic checks (a lost event is repaired within about twice this).
CHECK_INTERVAL = 2.0
#: Tasks whose seq is read per query by the periodic check.
CHECK_PAGE = 500
#: Seconds before a failed catch-up (the store unreachable) is tried again, at most.
RETRY_MAX = 5.0


class Notice(Protocol):
    """What listeners learn of each committed event (an `Event` or a broker `Message`)."""

    task_id: str
    seq: int
    event: str


Listener = Callable[[Notice], None]


class Relay:
    """Delivers committed events to this node and publishes them for the others."""

    def __init__(
        self,
        node_id: str,
        broker: Broker,
        hub: Hub,
        replayer: Replayer,
        store: Store,
        *,
        check_interval: float | None = CHECK_INTERVAL,
    ) -> None:
        self.node_id = node_id
        self._broker = broker
        self._hub = hub
        self._replayer = replayer
        self._store = store
        #: None: no periodic check (one process: nothing can be lost on the way).
        self._check_interval = check_interval
        self._listeners: list[Listener] = []
        #: Subscriptions being caught up (at most one repair each at a time).
        self._repairing: set[Subscription] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Subscriptions found behind at the last check, with the seq they were behind.
        self._behind: dict[Subscription, int] = {}
        self._checker: asyncio.Task[None] | None = None
        self._check_now = asyncio.Event()
        #: Counters for /metrics.
        self.gaps_repaired = 0
        self.repair_failures = 0
        self.checks = 0
        self.received = 0
        hub.on_gap = self._on_gap

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(notice)` for every committed event this node learns of."""
        self._listeners.append(listener)

    async def start(self) -> None:
        await self._broker.start(self._remote, self._reconnected)
        if self._check_interval is not None:
            self._checker = asyncio.create_task(self._check_loop(), name="relay-check")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._checker is not None:
            tasks.append(self._checker)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._broker.close()

    # -- events in -----------------------------------------------------------------------

    def committed(self, event: Event) -> None:
        """A tracker listener: deliver here, then publish for the other nodes."""
        text = protocol.event_message(event)  # once, for every subscriber and every node
        self._deliver(event.task_id, event.seq, text, event)
        self._broker.publish(
            Message(self.node_id, event.task_id, event.seq, event.event.value, text)
        )

    def _remote(self, message: Message) -> None:
        """The broker's callback: an event another node committed."""
        self.received += 1
        self._deliver(message.task_id, message.seq, message.text, message)

    def _deliver(self, task_id: str, seq: int, text: str, notice: Notice) -> None:
        self._hub.deliver(task_id, seq, text)
        for listener in self._listeners:
            try:
                listener(notice)
            except Exception:
                log.exception("relay.listener_failed task=%s seq=%d", task_id, seq)

    # -- repairs -------------------------------------------------------------------------

    def _on_gap(self, sub: Subscription) -> None:
        if sub in self._repairing:
            return
        self._repairing.add(sub)
        task = asyncio.get_running_loop().create_task(self._repair(sub))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _repair(self, sub: Subscription) -> None:
        delay = 0.1
        try:
            while True:
                if sub not in self._hub.subscriptions_to(sub.task_id):
                    return  # unsubscribed, re-subscribed or disconnected meanwhile
                try:
                    await self._replayer.catch_up(sub)
                except (StoreUnavailable, OSError) as exc:
                    self.repair_failures += 1
                    log.warning("relay.repair_failed task=%s error=%s", sub.task_id, exc)
                    await asyncio.sleep(delay)
                    delay = min(RETRY_MAX, delay * 2)
                    continue
                self.gaps_repaired += 1
                if sub.buffering:
                    # Going live found another gap (events of several nodes arrive out of
                    # order: one buffered during the read may be ahead of the next that
                    # has not come yet). Its on_gap was ignored because this repair still
                    # held the subscription, and the periodic check skips buffering ones:
                    # repair again, or it would buffer for good.
                    continue
                return
        finally:
            self._repairing.discard(sub)

    def _reconnected(self) -> None:
        """The broker is back: what it carried meanwhile may be lost; check everything."""
        self._behind = {}
        self._check_now.set()

    async def _check_loop(self) -> None:
        assert self._check_interval is not None
        while True:
            try:
                await asyncio.wait_for(self._check_now.wait(), self._check_interval)
                urgent = True
            except TimeoutError:
                urgent = False
            self._check_now.clear()
            try:
                await self.check(urgent=urgent)
            except (StoreUnavailable, OSError) as exc:
                log.warning("relay.check_failed error=%s", exc)

    async def check(self, *, urgent: bool = False) -> int:
        """Compare every local subscription with the store's latest seq; catch up those
        behind (at once when `urgent`, else only if already behind at the last check).
        Returns how many repairs were started."""
        self.checks += 1
        task_ids = self._hub.active_tasks()
        latest: dict[str, int] = {}
        for start in range(0, len(task_ids), CHECK_PAGE):
            latest.update(await self._store.task_seqs(task_ids[start : start + CHECK_PAGE]))
        behind: dict[Subscription, int] = {}
        started = 0
        for task_id, seq in latest.items():
            for sub in self._hub.subscriptions_to(task_id):
                if sub.buffering or sub.last_seq >= seq:
                    continue
                previous = self._behind.get(sub)
                if urgent or (previous is not None and sub.last_seq < previous):
                    # Still short of what it lacked a check ago: nothing is on its way.
                    self._on_gap_found(sub)
                    started += 1
                else:
                    behind[sub] = seq
        self._behind = behind
        return started

    def _on_gap_found(self, sub: Subscription) -> None:
        """Put the subscription back to buffering and repair it (as a seen gap would)."""
        if sub.buffering or sub in self._repairing:
            return
        sub.buffer = []
        sub.buffered_bytes = 0
        sub.overflows = 0
        sub.gaps += 1
        self._on_gap(sub)
