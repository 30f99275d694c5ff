"""Subscription history (who watched which task, from when until when), written in batches.

Subscribing must not wait for a disk write, so records are queued and flushed together
every FLUSH_INTERVAL seconds; the page's "resume" offer reads them back. Losing the last
fraction of a second of this history in a crash is acceptable; task events are not
written this way. A flush the store cannot take (StoreUnavailable: down, busy, full)
keeps its rows for the next one, up to MAX_PENDING rows, so an outage of a minute loses
none of them; any other error drops that flush's rows, as retrying them would fail again.
"""

from __future__ import annotations

import asyncio
import logging

from .models import utc_now
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5
#: Rows (opened and closed) kept while the store refuses them; beyond, the oldest go.
MAX_PENDING = 100_000


class SubscriptionHistory:
    def __init__(self, store: Store, node_id: str = "") -> None:
        self._store = store
        #: Recorded with each row; at start this node closes the rows it left open.
        self._node_id = node_id
        self._opened: list[tuple[str, int, str, str]] = []
        self._closed: list[tuple[str, str, str]] = []
        self._task: asyncio.Task[None] | None = None
        #: Flushes refused in a row (the outage's length, in flushes), and rows dropped.
        self._failures = 0
        self._dropped = 0

    def opened(self, connection_id: str, user_id: int, task_id: str) -> None:
        self._opened.append((connection_id, user_id, task_id, utc_now()))

    def closed(self, connection_id: str, task_id: str) -> None:
        self._closed.append((connection_id, task_id, utc_now()))

    async def start(self) -> None:
        await self._store.close_open_subscriptions(utc_now(), self._node_id)
        self._task = asyncio.create_task(self._run(), name="subscription-history")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.flush()

    async def flush(self) -> None:
        opened, self._opened = self._opened, []
        closed, self._closed = self._closed, []
        try:
            await self._store.record_subscriptions(opened, closed, self._node_id)
        except StoreUnavailable as exc:
            # Kept, before whatever came meanwhile, for the next flush to try again.
            self._opened = opened + self._opened
            self._closed = closed + self._closed
            self._bound()
            self._failures += 1
            if self._failures == 1:  # once per outage, not every FLUSH_INTERVAL
                log.error(
                    "history.flush_failed opened=%d closed=%d error=%r (kept for a retry)",
                    len(opened),
                    len(closed),
                    exc,
                )
            return
        except Exception as exc:  # not an outage: trying the same rows again would not help
            log.error(
                "history.flush_failed opened=%d closed=%d error=%r (dropped)",
                len(opened),
                len(closed),
                exc,
            )
            return
        if self._failures:
            log.info(
                "history.flush_recovered after_failures=%d opened=%d closed=%d dropped=%d",
                self._failures,
                len(opened),
                len(closed),
                self._dropped,
            )
            self._failures = self._dropped = 0

    def _bound(self) -> None:
        """At most MAX_PENDING rows wait: the oldest go first (a close without its open
        finds no row to close, which is harmless)."""
        excess = len(self._opened) + len(self._closed) - MAX_PENDING
        if excess <= 0:
            return
        from_opened = min(excess, len(self._opened))
        del self._opened[:from_opened]
        del self._closed[: excess - from_opened]
        self._dropped += excess

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._opened or self._closed:
                await self.flush()
