"""Retention: deletes old history in small transactions and keeps the SQLite file compact.

Every `interval` seconds one run (on one node at a time: the store's `exclusive` lock) applies
four rules, oldest data first:

1. a finished task older than `task_retention` (by its finished_at) is deleted with its
   events and subscription rows: GET answers 404 from then on;
2. a finished task older than `event_retention` keeps only its last event (the terminal
   one): its state is in the task row, and a client resuming from before gets a snapshot
   with "recovered": false;
3. no task keeps more than `max_events_per_task` events: the oldest go, running tasks too;
4. idempotency answers older than 24 h and share tokens that expired or were revoked go.

0 switches a rule off. Running tasks are never touched by the age rules, and a task's
latest event is never deleted while the task exists, so what is kept of a history is
always the gapless run of seqs first_kept..seq (`store.EventSpan`).

Deletes take the writer connection's lock like any producer, one transaction of at most
`batch_rows` rows at a time, yielding in between: a big purge delays an event by one small
transaction, never by the whole purge. Afterwards free pages are given back to the file
system (`PRAGMA incremental_vacuum`, in steps) and the WAL is checkpointed and truncated.

Only finished tasks are deleted, and the tracker caches unfinished ones only, so it never
serves a deleted task; an update to one is answered 404, and a client still subscribed to
it simply gets no more events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .idempotency import KEEP_SECONDS
from .models import Event
from .store import EventSpan, Grants, Store
from .store.records import iso_time

log = logging.getLogger(__name__)

#: Most rows (events, tasks, subscription rows) deleted in one transaction.
BATCH_ROWS = 1000
#: Tasks read per page while planning.
SCAN_PAGE = 1000
#: How far back each run looks again for finished tasks whose history to trim: a task's
#: finished_at is taken just before its commit, so it can land behind the last run's cutoff.
RESCAN_MARGIN = timedelta(minutes=10)
#: How often the event-age rule looks at every old finished task, not only those that
#: crossed the cutoff since the last run (in case the wall clock jumped back).
FULL_SCAN_EVERY = timedelta(hours=1)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """The timestamp format of tasks.finished_at (models.utc_now), which sorts as text."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class RetentionReport:
    """What one run did."""

    tasks_deleted: int = 0
    events_deleted: int = 0
    subscriptions_deleted: int = 0
    #: Idempotency answers past 24 h and ended share tokens.
    grants_deleted: int = 0
    #: Delete transactions committed (each at most `batch_rows` rows).
    transactions: int = 0
    #: Pages given back to the file system by incremental vacuum.
    pages_freed: int = 0

    @property
    def rows_deleted(self) -> int:
        return (
            self.tasks_deleted
            + self.events_deleted
            + self.subscriptions_deleted
            + self.grants_deleted
        )


class _Stopped(Exception):
    """The job is stopping: raised between two transactions, never inside one."""


class _EventDeleter:
    """Collects event ranges and deletes them in transactions of at most `rows` events."""

    def __init__(
        self,
        store: Store,
        rows: int,
        report: RetentionReport,
        pause: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._rows = rows
        self._report = report
        self._pause = pause
        #: (task_id, first_seq, last_seq) not yet deleted.
        self._ranges: list[tuple[str, int, int]] = []
        #: Events the current transaction may still take.
        self._room = rows

    async def add(self, task_id: str, first: int, last: int) -> None:
        """Delete seqs first..last (inclusive) of a task, flushing whenever a batch is full."""
        while first <= last:
            take = min(last - first + 1, self._room)
            self._ranges.append((task_id, first, first + take - 1))
            first += take
            self._room -= take
            if self._room == 0:
                await self.flush()

    async def flush(self) -> None:
        if not self._ranges:
            return
        ranges, self._ranges, self._room = self._ranges, [], self._rows
        self._report.events_deleted += await self._store.delete_event_ranges(ranges)
        self._report.transactions += 1
        await self._pause()


class Retention:
    """The periodic retention job; `run_once` is one run, `start`/`stop` the loop."""

    def __init__(
        self,
        store: Store,
        *,
        event_retention: float,
        task_retention: float,
        max_events_per_task: int,
        interval: float,
        batch_rows: int = BATCH_ROWS,
        clock: Callable[[], datetime] = _utc_now,
        grants: Grants | None = None,
    ) -> None:
        if batch_rows < 2:
            raise ValueError("batch_rows must be at least 2")
        self._store = store
        #: API keys, share tokens and idempotency answers (rule 4); None: not purged.
        self._grants = grants
        #: Seconds after finished_at; 0 = off.
        self.event_retention = event_retention
        #: Seconds after finished_at; 0 = off.
        self.task_retention = task_retention
        #: Events kept per task; 0 = off.
        self.max_events_per_task = max_events_per_task
        #: Seconds between runs.
        self.interval = interval
        self._batch_rows = batch_rows
        #: The current time as an aware datetime; tests pass a fake one.
        self.clock = clock
        #: Tasks that may hold more than max_events_per_task events (fed by on_event).
        self._cap_candidates: set[str] = set()
        #: Whether all tasks were looked at once for the cap (at the first run).
        self._cap_scanned = False
        #: Event-age cutoff of the last complete run: older tasks are trimmed already.
        self._trimmed_before: datetime | None = None
        #: Clock time of the last complete run of the event-age rule over all old tasks.
        self._full_scan_at: datetime | None = None
        self._loop_task: asyncio.Task[None] | None = None
        #: Set by stop(): the loop ends at the next pause between two transactions.
        self._stopping = False
        #: Wakes the loop's sleep early when stopping.
        self._wake = asyncio.Event()
        #: Runs finished, and runs that failed (logged, and retried at the next interval).
        self.runs = 0
        self.failures = 0

    # -- the loop --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        """End the loop after the transaction in progress, if any (each one is small).

        Not a cancel: cancelling aiosqlite mid-transaction can leave the writer's
        transaction open after the lock is released, and the next BEGIN would fail.
        """
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await self._loop_task
            self._loop_task = None

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except TimeoutError:
                pass
            if self._stopping:
                return
            try:
                # One node at a time: on a shared store the others skip this interval.
                async with self._store.exclusive("retention") as mine:
                    if mine:
                        await self.run_once()
            except _Stopped:
                return
            except Exception:  # a bad run must not end retention for the process's life
                self.failures += 1
                log.exception("retention.failed")

    async def _pause(self) -> None:
        """Between two transactions: let waiting producers take the write lock; stop here."""
        await asyncio.sleep(0)
        if self._stopping:
            raise _Stopped

    def on_event(self, event: Event) -> None:
        """Tracker listener: remember tasks that may have grown past the per-task cap."""
        if self.max_events_per_task and event.seq > self.max_events_per_task:
            self._cap_candidates.add(event.task_id)

    # -- one run ---------------------------------------------------------------------------

    async def run_once(self) -> RetentionReport:
        """Apply every rule once, then compact; returns what was done."""
        started = time.perf_counter()
        now = self.clock()
        report = RetentionReport()
        if self.task_retention > 0:
            await self._delete_old_tasks(now - timedelta(seconds=self.task_retention), report)
        if self.event_retention > 0:
            await self._trim_finished(now, report)
        if self.max_events_per_task > 0:
            await self._cap_events(report)
        if self._grants is not None:
            await self._purge_grants(now, report)
        await self._compact(report)
        self.runs += 1
        log.log(
            logging.INFO if report.rows_deleted or report.pages_freed else logging.DEBUG,
            "retention.run tasks=%d events=%d subscriptions=%d transactions=%d"
            " pages_freed=%d seconds=%.3f",
            report.tasks_deleted,
            report.events_deleted,
            report.subscriptions_deleted,
            report.transactions,
            report.pages_freed,
            time.perf_counter() - started,
        )
        return report

    async def _purge_grants(self, now: datetime, report: RetentionReport) -> None:
        """Rule 4: idempotency answers older than KEEP_SECONDS, share tokens that ended."""
        assert self._grants is not None
        before = iso_time((now - timedelta(seconds=KEEP_SECONDS)).timestamp())
        while True:
            deleted = await self._grants.purge(before, now.timestamp(), self._batch_rows)
            report.grants_deleted += deleted
            report.transactions += 1
            if deleted < self._batch_rows:
                return
            await self._pause()

    async def _delete_old_tasks(self, cutoff: datetime, report: RetentionReport) -> None:
        """Rule 1: whole tasks, as many per transaction as fit in the row budget."""
        deleter = _EventDeleter(self._store, self._batch_rows, report, self._pause)
        while True:
            spans = await self._store.finished_task_spans(
                _iso(cutoff), None, self._batch_rows, count_subscriptions=True
            )
            if not spans:
                return
            chosen: list[str] = []
            room = self._batch_rows
            for span in spans:
                cost = 1 + span.kept + span.subscriptions
                if cost > room:
                    break
                chosen.append(span.task_id)
                room -= cost
            if chosen:
                tasks, events, subscriptions = await self._store.delete_finished_tasks(chosen)
                report.tasks_deleted += tasks
                report.events_deleted += events
                report.subscriptions_deleted += subscriptions
                report.transactions += 1
                await self._pause()
            elif not await self._shrink(spans[0], deleter, report):
                log.warning("retention.stuck task=%s", spans[0].task_id)
                return

    async def _shrink(
        self, span: EventSpan, deleter: _EventDeleter, report: RetentionReport
    ) -> bool:
        """Make a task too big for one transaction smaller; False if nothing could go."""
        if span.kept > 1 and span.first_kept is not None:
            before = report.events_deleted
            await deleter.add(span.task_id, span.first_kept, span.seq - 1)
            await deleter.flush()
            return report.events_deleted > before
        deleted = await self._store.delete_subscriptions_of(span.task_id, self._batch_rows)
        report.subscriptions_deleted += deleted
        report.transactions += 1
        await self._pause()
        return deleted > 0

    async def _trim_finished(self, now: datetime, report: RetentionReport) -> None:
        """Rule 2: finished tasks past event_retention keep their last event only."""
        cutoff = now - timedelta(seconds=self.event_retention)
        deleter = _EventDeleter(self._store, self._batch_rows, report, self._pause)
        after: tuple[str, str] | None = None
        full = (
            self._full_scan_at is None
            or self._trimmed_before is None
            or not timedelta(0) <= now - self._full_scan_at < FULL_SCAN_EVERY
        )
        if not full and self._trimmed_before is not None:
            # Tasks that finished before the last run's cutoff were trimmed then: a run
            # reads the tasks that aged since, not every old task again.
            after = (_iso(min(cutoff, self._trimmed_before) - RESCAN_MARGIN), "")
        while True:
            spans = await self._store.finished_task_spans(_iso(cutoff), after, SCAN_PAGE)
            for span in spans:
                if span.first_kept is not None and span.first_kept < span.seq:
                    await deleter.add(span.task_id, span.first_kept, span.seq - 1)
            if len(spans) < SCAN_PAGE:
                break
            last = spans[-1]
            after = (last.finished_at or "", last.task_id)
        await deleter.flush()
        self._trimmed_before = cutoff
        if full:
            self._full_scan_at = now

    async def _cap_events(self, report: RetentionReport) -> None:
        """Rule 3: the oldest events of tasks above max_events_per_task."""
        cap = self.max_events_per_task
        if not self._cap_scanned:
            after_id: str | None = ""
            while after_id is not None:
                after_id, ids = await self._store.tasks_with_seq_over(cap, after_id, SCAN_PAGE)
                self._cap_candidates.update(ids)
            self._cap_scanned = True
        # Tasks that grow during this run land in the new set, for the next run.
        pending, self._cap_candidates = self._cap_candidates, set()
        deleter = _EventDeleter(self._store, self._batch_rows, report, self._pause)
        try:
            ids = sorted(pending)
            for start in range(0, len(ids), SCAN_PAGE):
                for span in await self._store.task_spans(ids[start : start + SCAN_PAGE]):
                    if span.first_kept is not None and span.kept > cap:
                        await deleter.add(span.task_id, span.first_kept, span.seq - cap)
            await deleter.flush()
        except BaseException:
            self._cap_candidates |= pending  # looked at again next run
            raise

    async def _compact(self, report: RetentionReport) -> None:
        """Hand free space back (the store knows how: SQLite vacuums in steps)."""
        report.pages_freed = await self._store.reclaim(self._pause)
