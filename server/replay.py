"""Replay: send a subscriber what it is missing from the store, then let it go live.

Used for a client's subscribe with `last_seq` (web/ws.py, and any other transport) and
for the node's own repairs when a subscription sees a gap (relay.py): both are the same
merge. The subscription buffers live events from before the first read, so an event
committed during the replay is either in what is read or in the buffer; `Hub.go_live`
then delivers the buffered ones newer than what was sent, by seq: no gap, no duplicate.

No I/O of its own: the store reads, the peer sends (paced by what it takes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import protocol
from .hub import Hub, Subscription
from .models import Task
from .store import Store

#: Events read per query during a replay, at most, and bytes, about.
REPLAY_PAGE = 500
REPLAY_PAGE_BYTES = 256 * 1024


class Replayer:
    """Replays history from the store to one subscription at a time."""

    def __init__(self, store: Store, hub: Hub) -> None:
        self._store = store
        self._hub = hub

    async def replay(
        self,
        sub: Subscription,
        task: Task,
        last_seq: int | None,
        msg_id: Any = None,
        *,
        charge: Callable[[], None] | None = None,
    ) -> int:
        """Send what the subscriber is missing after `last_seq` (None: a snapshot); returns
        the last seq it has been given. `charge()` is called for each page after the first
        (a client's replay costs it rate tokens)."""
        peer = sub.peer
        if last_seq is None:
            peer.push(protocol.snapshot_message(task, msg_id))
            return task.seq
        if last_seq >= task.seq:
            if last_seq > task.seq:  # the client is ahead of us: its history is not ours
                peer.push(protocol.snapshot_message(task, msg_id, recovered=False))
            return task.seq
        first_kept = await self._store.first_kept_seq(task.id)
        if first_kept is None or first_kept > last_seq + 1:
            peer.push(protocol.snapshot_message(task, msg_id, recovered=False))
            return task.seq
        delivered = last_seq
        pages = 0
        while True:
            if pages and charge is not None:
                charge()
            pages += 1
            page = await self._store.list_events(
                task.id, delivered, REPLAY_PAGE, max_bytes=REPLAY_PAGE_BYTES
            )
            events = page.events
            if sub.overflows or (events and events[0].seq != delivered + 1):
                # Live events came faster than the replay could be sent (the buffer holding
                # them overflowed), or retention trimmed the history meanwhile: rather than
                # a gap, the current state; live events after it are held by the buffer.
                return await self._recover(sub, task, msg_id, delivered)
            for event in events:
                # Pace by what the peer takes, not by the page: a page may be longer than
                # the send queue, and a client that reads is not a slow consumer.
                await peer.wait_for_room()
                peer.push(protocol.event_message(event))
                delivered = event.seq
            if not page.more:
                return delivered

    async def _recover(self, sub: Subscription, task: Task, msg_id: Any, delivered: int) -> int:
        """End a replay that cannot go on with a `recovered: false` snapshot of now."""
        overflows = sub.overflows
        latest = await self._store.get_task(task.id) or task
        if sub.overflows != overflows:
            # Overflowed again while reading: what was dropped may be newer than `latest`.
            sub.peer.close(protocol.CLOSE_SLOW_CONSUMER, "slow consumer: replay overrun")
            return max(latest.seq, delivered)
        sub.peer.push(protocol.snapshot_message(latest, msg_id, recovered=False))
        return max(latest.seq, delivered)

    async def catch_up(self, sub: Subscription) -> None:
        """Repair a subscription that saw a gap: replay from its last seq, then go live.

        Raises what the store raises (the caller retries later; the subscription keeps
        buffering meanwhile, within its bounds).
        """
        task = await self._store.get_task(sub.task_id)
        if task is None:  # deleted meanwhile: nothing more will come for it
            self._hub.go_live(sub, sub.last_seq)
            return
        delivered = await self.replay(sub, task, sub.last_seq)
        self._hub.go_live(sub, delivered)
