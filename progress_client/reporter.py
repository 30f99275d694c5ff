"""Coalescing of `report()` calls: at most `rate` posts per second per task, always the
latest value, each step's last update kept, posted in order by one sender.

`offer()` may be called from any thread (the sync `Client` calls it from the caller's
thread); everything else runs on the event loop that owns the reporter.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from .errors import ApiError, ProgressError
from .models import Update

log = logging.getLogger(__name__)

#: Most updates one batch post may carry (the server's limit).
MAX_BATCH = 100

#: Posts a batch (one update or several) and returns the seq of the last event stored.
PostFn = Callable[[list[Update]], Awaitable[int]]


class Reporter:
    """The pending updates of one task and the task that posts them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        post: PostFn,
        *,
        rate: float | None,
        coalesce: bool = True,
    ) -> None:
        self._loop = loop
        self._post = post
        #: Seconds between the starts of two posts (0: no limit).
        self._interval = 1.0 / rate if rate else 0.0
        #: True: between two posts keep only the latest update of each run of one step;
        #: False: keep every update (sent in batches of up to MAX_BATCH).
        self._coalesce = coalesce
        #: Guards _pending, _active and _error (offer() runs on other threads too).
        self._lock = threading.Lock()
        self._pending: list[Update] = []
        #: True from the first pending update until the sender has nothing left: only
        #: one sender runs, and offer() wakes the loop only when none is.
        self._active = False
        #: A refusal (4xx) of an earlier post, raised by the next offer() or flush().
        self._error: ApiError | None = None
        #: The sender task (loop thread only).
        self._task: asyncio.Task[None] | None = None
        #: loop.time() when the latest post started.
        self._last_post = float("-inf")
        #: Set by flush(): post what is pending now, without waiting for the rate.
        self._urgent = asyncio.Event()
        #: Set by close(): no sender starts again.
        self._closed = False
        #: Posts made, and seq of the latest event they stored (for tests and the CLI).
        self.posts = 0
        self.last_seq: int | None = None

    def offer(self, update: Update) -> None:
        """Queue `update`; raises (once) the error that refused an earlier post."""
        with self._lock:
            error, self._error = self._error, None
            if error is not None:
                raise error
            self._merge(update)
            if self._active:
                return
            self._active = True
        self._loop.call_soon_threadsafe(self._start)

    def _merge(self, update: Update) -> None:
        pending = self._pending
        if self._coalesce and pending:
            last = pending[-1]
            if update.step is None or update.step == last.step:
                # `step` is sticky on the server: an update without one keeps the step of
                # the update it replaces, not whatever the server had before that.
                pending[-1] = Update(update.progress, last.step, update.message)
                return
            if len(pending) >= MAX_BATCH:
                # Over a hundred step changes in one interval: the oldest run goes.
                del pending[0]
        pending.append(update)

    def _start(self) -> None:
        if self._task is None and not self._closed:
            self._task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._active = False
                        return
                wait = self._last_post + self._interval - self._loop.time()
                if wait > 0 and not self._urgent.is_set():
                    try:
                        await asyncio.wait_for(self._urgent.wait(), wait)
                    except TimeoutError:
                        pass
                with self._lock:
                    batch = self._pending[:MAX_BATCH]
                    del self._pending[:MAX_BATCH]
                if not batch:
                    continue
                self._last_post = self._loop.time()
                await self._send(batch)
        finally:
            self._task = None
            with self._lock:
                # An offer() from another thread may have slipped in after the empty check.
                self._active = again = bool(self._pending)
            if again and not self._closed:
                self._loop.call_soon(self._start)

    async def _send(self, batch: list[Update]) -> None:
        try:
            self.last_seq = await self._post(batch)
            self.posts += 1
        except ApiError as exc:
            if exc.status < 500 and exc.status != 429:
                # Refused for good (task finished or gone, invalid update): the caller
                # learns it from its next report() or flush().
                log.warning("progress report refused: %s", exc)
                with self._lock:
                    self._error = exc
            else:
                log.warning("progress report dropped after retries: %s", exc)
        except ProgressError as exc:
            # Unreachable until the deadline: newer updates will carry the state anyway.
            log.warning("progress report dropped after retries: %s", exc)
        except Exception:
            log.exception("progress report failed")

    async def flush(self) -> None:
        """Post everything pending now (skipping the rate wait) and wait until it is done.

        Raises the error that refused a post, if one did (once).
        """
        self._urgent.set()
        try:
            while True:
                with self._lock:
                    if not self._active:
                        break
                self._start()
                task = self._task
                if task is None:  # closed
                    break
                await asyncio.shield(task)
        finally:
            self._urgent.clear()
        self.raise_error()

    def raise_error(self) -> None:
        """Raise (once) the error that refused an earlier post, if any."""
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def discard(self) -> None:
        """Drop what is pending (the task is finished: nothing more can be stored)."""
        with self._lock:
            self._pending.clear()
            self._error = None

    def close(self) -> None:
        """Stop for good: cancel the sender, drop what is pending (loop thread)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        self.discard()
