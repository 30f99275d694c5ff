"""Subscription history (who watched which task, from when until when), written in batches.

Subscribing must not wait for a disk write, so records are queued and flushed together
every FLUSH_INTERVAL seconds; the page's "resume" offer reads them back. Losing the last
fraction of a second of this history in a crash is acceptable; task events are not
written this way.
"""

from __future__ import annotations

import asyncio
import logging

from .models import utc_now
from .store import Store

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5


class SubscriptionHistory:
    def __init__(self, store: Store, node_id: str = "") -> None:
        self._store = store
        #: Recorded with each row; at start this node closes the rows it left open.
        self._node_id = node_id
        self._opened: list[tuple[str, int, str, str]] = []
        self._closed: list[tuple[str, str, str]] = []
        self._task: asyncio.Task[None] | None = None

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
        except Exception as exc:
            log.error(
                "history.flush_failed opened=%d closed=%d error=%r", len(opened), len(closed), exc
            )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._opened or self._closed:
                await self.flush()
