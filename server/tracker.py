"""The tracker: the only writer of tasks and events, by group commit, fair across users.

Every change to a task goes through `Tracker`. Requests wait in a bounded queue with one
lane per user; the commit loop takes them round-robin across lanes (so one user's burst
delays another user's single post by at most one batch), and commits each batch in one
transaction in four steps:

1. stage: the store's writer plans the batch on the committed state (`lifecycle`), inside
   the transaction, so seqs are allocated where they are stored;
2. commit: the plan is written and committed (one thread hand-off on SQLite);
3. remember: the store's caches follow what was committed, nothing else;
4. notify: callers get their answers, then listeners (the hub, the job runner) hear the
   committed events, in seq order per task, synchronously: they must not block.

A caller's await returns only after its event is committed: an acknowledged event is on
disk. When a batch fails, nothing of it happened: a database that cannot commit (busy,
full, read-only, I/O) fails the whole batch fast with 503; any other error may belong to
one request, so the requests are planned and committed again one by one, and only the bad
one fails. Either way every refusal of the failed plan is thrown away with it, so no
request is refused because of a change that was rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .errors import QuotaExceeded, Unavailable
from .lifecycle import (
    Cancel,
    Change,
    Complete,
    Create,
    Fail,
    Outcome,
    Progress,
    ProgressBatch,
    Quotas,
    Request,
)
from .models import Event, RawJson, Task, utc_now
from .refusals import Refusals
from .stats import Histogram
from .store import Store, StoreUnavailable

log = logging.getLogger(__name__)

__all__ = [
    "Cancel",
    "Complete",
    "Create",
    "Fail",
    "Progress",
    "ProgressBatch",
    "Request",
    "Tracker",
]

Listener = Callable[[Event], None]

#: Most requests folded into one transaction.
MAX_BATCH = 512
#: Most requests waiting for the commit loop, in all.
QUEUE_MAX = 10_000
#: Share of the queue one user's lane may fill (so one user cannot fill it for all).
LANE_SHARE = 8
#: Retry-After (seconds) when the queue is full or the database cannot commit.
RETRY_AFTER = 1
#: Upper bounds of the commit-latency histogram, in seconds per transaction.
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: Upper bounds of the batch-size histogram, in requests per transaction.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_BATCH)


def _not_stored() -> Unavailable:
    """A request whose transaction failed for a reason of its own: nothing of it was
    stored, and a retry after a second may well pass (as for the other 503s here)."""
    return Unavailable(
        "could not store the event; nothing was stored",
        headers={"Retry-After": str(RETRY_AFTER)},
    )


@dataclass(slots=True)
class _Pending:
    request: Request
    lane: int
    future: asyncio.Future[Outcome]


class Tracker:
    """The only writer of tasks and events."""

    def __init__(
        self,
        store: Store,
        max_batch: int = MAX_BATCH,
        *,
        queue_max: int = QUEUE_MAX,
        quotas: Quotas | None = None,
        refusals: Refusals | None = None,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue_max = queue_max
        self._lane_max = max(1, queue_max // LANE_SHARE)
        self._quotas = quotas or Quotas()
        self._refusals = refusals or Refusals()
        self._listeners: list[Listener] = []
        #: Waiting requests by lane (the user they act for), and the lanes in turn order.
        self._lanes: dict[int, deque[_Pending]] = {}
        self._turns: deque[int] = deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        #: Transactions committed and events written, for benchmarks and metrics.
        self.commits = 0
        self.events_committed = 0
        #: Transactions that failed and were rolled back (their callers got 503 or a retry).
        self.commit_failures = 0
        #: Seconds per committed transaction, planning and fsync included.
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        #: Requests folded into each committed transaction (group commit at work).
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)

    @property
    def queued(self) -> int:
        """Requests waiting for the commit loop (a growing number: the disk is behind)."""
        return self._queued

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` after each committed event, in seq order per task."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._accepting = True
        self._stopping = False
        self._loop_task = asyncio.create_task(self._commit_loop(), name="tracker-commit-loop")

    async def stop(self) -> None:
        """Refuse new work, commit everything already queued, then stop the loop."""
        self._accepting = False
        if self._loop_task is None:
            return
        self._stopping = True
        self._wakeup.set()
        await self._loop_task
        self._loop_task = None

    # -- public operations ---------------------------------------------------------------

    async def create_task(self, user_id: int, kind: str, params: RawJson) -> Task:
        """Create a pending task (its `created` event is seq 1); returns it once committed.

        `params` is the compact JSON text of an object (see `budget.compact`).
        """
        outcome = await self.submit(Request("", None, Create(user_id, kind, params)), user_id)
        assert outcome.created is not None
        return outcome.created

    async def report_progress(
        self,
        task_id: str,
        progress: Progress,
        *,
        owner_id: int | None = None,
        lane: int | None = None,
    ) -> list[Event]:
        return await self._change(task_id, progress, owner_id, lane)

    async def complete(
        self,
        task_id: str,
        result: RawJson | None,
        *,
        owner_id: int | None = None,
        lane: int | None = None,
    ) -> list[Event]:
        return await self._change(task_id, Complete(result), owner_id, lane)

    async def fail(
        self, task_id: str, error: str, *, owner_id: int | None = None, lane: int | None = None
    ) -> list[Event]:
        return await self._change(task_id, Fail(error), owner_id, lane)

    async def cancel(
        self,
        task_id: str,
        *,
        owner_id: int | None = None,
        reason: str = "cancelled by user",
        lane: int | None = None,
    ) -> list[Event]:
        return await self._change(task_id, Cancel(reason), owner_id, lane)

    async def _change(
        self, task_id: str, change: Change, owner_id: int | None, lane: int | None
    ) -> list[Event]:
        """`owner_id` is checked against the task's owner (None: the server itself);
        `lane` is whose share of the queue the request takes (default: the owner's)."""
        lane_key = lane if lane is not None else (owner_id if owner_id is not None else 0)
        outcome = await self.submit(Request(task_id, owner_id, change), lane_key)
        return outcome.events

    async def submit(self, request: Request, lane: int) -> Outcome:
        """Queue one request for the commit loop; its outcome once committed (an error is
        raised; an idempotent replay comes back as `outcome.replayed`)."""
        if not self._accepting:
            raise Unavailable("server is shutting down", headers={"Retry-After": str(RETRY_AFTER)})
        waiting = self._lanes.get(lane)
        if self._queued >= self._queue_max or (
            waiting is not None and len(waiting) >= self._lane_max
        ):
            self._refusals.note("commit_queue_full", f"queued={self._queued} lane={lane}")
            raise Unavailable(
                "too many writes waiting for the disk; retry shortly",
                code="overloaded",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        if waiting is None:
            waiting = self._lanes[lane] = deque()
            self._turns.append(lane)
        waiting.append(_Pending(request, lane, future))
        self._queued += 1
        self._wakeup.set()
        # shield: a caller that goes away must not cancel a commit other callers share.
        outcome = await asyncio.shield(future)
        if outcome.error is not None:
            raise outcome.error
        return outcome

    # -- the commit loop -----------------------------------------------------------------

    def _take_batch(self) -> list[_Pending]:
        """Up to max_batch requests, one per lane in turn: fair across users, FIFO within."""
        batch: list[_Pending] = []
        while self._turns and len(batch) < self._max_batch:
            lane = self._turns.popleft()
            waiting = self._lanes[lane]
            batch.append(waiting.popleft())
            if waiting:
                self._turns.append(lane)
            else:
                del self._lanes[lane]
        self._queued -= len(batch)
        return batch

    async def _commit_loop(self) -> None:
        while True:
            if not self._queued:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            try:
                await self._commit(batch)
            except Exception:  # never let the loop die: later requests would hang
                log.exception("tracker.batch_failed size=%d", len(batch))
                _answer_all(batch, _not_stored())

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            plan = await self._store.apply([p.request for p in batch], self._quotas, utc_now)
        except StoreUnavailable as exc:
            self.commit_failures += 1
            self._refusals.note("store_unavailable", f"error={exc}")
            _answer_all(
                batch,
                Unavailable(
                    "the database cannot store events right now; nothing was stored",
                    headers={"Retry-After": str(RETRY_AFTER)},
                ),
            )
            return
        except Exception as exc:
            self.commit_failures += 1
            log.error("tracker.commit_failed requests=%d error=%r", len(batch), exc)
            if len(batch) > 1:
                # It may belong to one request: plan and commit each alone.
                for pending in batch:
                    await self._commit([pending])
                return
            _answer_all(batch, _not_stored())
            return
        self.commit_seconds.observe(time.perf_counter() - started)
        self.batch_sizes.observe(len(batch))
        self.commits += 1
        for pending, outcome in zip(batch, plan.outcomes, strict=True):
            if isinstance(outcome.error, QuotaExceeded):
                quota = outcome.error.fields.get("quota", "")
                self._refusals.note(f"quota_{quota}", f"lane={pending.lane}")
            self.events_committed += len(outcome.events) + len(outcome.related)
            if not pending.future.done():
                pending.future.set_result(outcome)
        for outcome in plan.outcomes:
            for event in (*outcome.events, *outcome.related):
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:
                        log.exception(
                            "tracker.listener_failed task=%s seq=%d", event.task_id, event.seq
                        )


def _answer_all(batch: list[_Pending], error: Exception) -> None:
    for pending in batch:
        if not pending.future.done():
            pending.future.set_result(Outcome(error=error))  # type: ignore[arg-type]
