"""Task lifecycle: validates each transition, allocates seq, commits, then tells listeners.

Every change to a task goes through `Tracker`. Changes are queued and committed by one
loop in batches: while one transaction is being committed, the next requests gather, and
the next transaction takes them all (group commit). A caller's await returns only after
its event is committed, so an acknowledged event is on disk. Listeners (the hub, the job
runner) are called after the commit, in seq order, synchronously: they must not block.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import NotFound, TaskFinished, Unavailable
from .models import Event, EventType, Task, TaskStatus, utc_now
from .stats import Histogram
from .store.sqlite import Store, TaskWrite

log = logging.getLogger(__name__)

Listener = Callable[[Event], None]

#: Most requests folded into one transaction.
MAX_BATCH = 512
#: Unfinished tasks whose state is kept in memory, so the write path rarely reads.
CACHE_SIZE = 10_000
#: Upper bounds of the commit-latency histogram, in seconds per transaction.
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
#: Upper bounds of the batch-size histogram, in requests per transaction.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_BATCH)


@dataclass(frozen=True, slots=True)
class Create:
    user_id: int
    kind: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Progress:
    progress: float
    step: str | None = None
    message: str | None = None
    checkpoint: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Complete:
    result: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    error: str


@dataclass(frozen=True, slots=True)
class Cancel:
    reason: str = "cancelled by user"


Change = Progress | Complete | Fail | Cancel


@dataclass(slots=True)
class _Request:
    task_id: str
    owner_id: int | None  # None: the server itself (built-in jobs)
    change: Create | Change
    future: asyncio.Future[list[Event]]


def _event(task: Task, kind: EventType, ts: str) -> Event:
    return Event(
        task_id=task.id,
        seq=task.seq,
        event=kind,
        status=task.status,
        progress=task.progress,
        step=task.step,
        message=task.message,
        ts=ts,
        result=task.result if kind is EventType.COMPLETED else None,
        error=task.error if kind in (EventType.FAILED, EventType.CANCELLED) else None,
    )


def _start(task: Task, ts: str) -> tuple[Task, Event]:
    task = dataclasses.replace(
        task, status=TaskStatus.RUNNING, seq=task.seq + 1, started_at=ts, updated_at=ts
    )
    return task, _event(task, EventType.STARTED, ts)


def apply_change(task: Task, change: Change, ts: str) -> tuple[Task, list[Event]]:
    """The task after `change` and the events it produces. Pure.

    Raises:
        TaskFinished: the task is already completed, failed or cancelled.
    """
    if task.status.is_terminal:
        raise TaskFinished(f"task is already {task.status.value}")
    events: list[Event] = []
    if isinstance(change, Progress):
        if task.status is TaskStatus.PENDING:
            task, started = _start(task, ts)
            events.append(started)
        task = dataclasses.replace(
            task,
            progress=change.progress,
            seq=task.seq + 1,
            updated_at=ts,
            step=change.step if change.step is not None else task.step,
            message=change.message,
            checkpoint=change.checkpoint if change.checkpoint is not None else task.checkpoint,
        )
        events.append(_event(task, EventType.PROGRESS, ts))
        return task, events
    if isinstance(change, Complete):
        if task.status is TaskStatus.PENDING:
            task, started = _start(task, ts)
            events.append(started)
        task = dataclasses.replace(
            task,
            status=TaskStatus.COMPLETED,
            progress=100,
            result=change.result or {},
            seq=task.seq + 1,
            updated_at=ts,
            finished_at=ts,
            message=None,
            checkpoint=None,
        )
        events.append(_event(task, EventType.COMPLETED, ts))
        return task, events
    if isinstance(change, Fail):
        status, kind, error = TaskStatus.FAILED, EventType.FAILED, change.error
    else:
        status, kind, error = TaskStatus.CANCELLED, EventType.CANCELLED, change.reason
    task = dataclasses.replace(
        task,
        status=status,
        error=error,
        seq=task.seq + 1,
        updated_at=ts,
        finished_at=ts,
        checkpoint=None,
    )
    events.append(_event(task, kind, ts))
    return task, events


def _new_task(create: Create, ts: str) -> tuple[Task, list[Event]]:
    task = Task(
        id=uuid.uuid4().hex,
        user_id=create.user_id,
        kind=create.kind,
        params=create.params,
        status=TaskStatus.PENDING,
        progress=0,
        step=None,
        message=None,
        result=None,
        error=None,
        seq=1,
        created_at=ts,
        updated_at=ts,
    )
    return task, [_event(task, EventType.CREATED, ts)]


class Tracker:
    """The only writer of tasks and events."""

    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._listeners: list[Listener] = []
        #: Requests waiting for the commit loop; None asks the loop to stop.
        self._queue: asyncio.Queue[_Request | None] = asyncio.Queue()
        #: Committed state of recently written unfinished tasks (LRU).
        self._cache: OrderedDict[str, Task] = OrderedDict()
        self._loop_task: asyncio.Task[None] | None = None
        self._accepting = False
        #: Transactions committed and events written, for benchmarks and metrics.
        self.commits = 0
        self.events_committed = 0
        #: Transactions that failed and were rolled back (their callers got 503).
        self.commit_failures = 0
        #: Seconds per committed transaction, write-lock wait and fsync included.
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        #: Requests folded into each committed transaction (group commit at work).
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)

    @property
    def queued(self) -> int:
        """Requests waiting for the commit loop (a growing number: the disk is behind)."""
        return self._queue.qsize()

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(event)` after each committed event, in seq order per task."""
        self._listeners.append(listener)

    def start(self) -> None:
        self._accepting = True
        self._loop_task = asyncio.create_task(self._commit_loop(), name="tracker-commit-loop")

    async def stop(self) -> None:
        """Refuse new work, commit everything already queued, then stop the loop."""
        self._accepting = False
        if self._loop_task is None:
            return
        self._queue.put_nowait(None)
        await self._loop_task
        self._loop_task = None

    # -- public operations ---------------------------------------------------------------

    async def create_task(self, user_id: int, kind: str, params: dict[str, Any]) -> Task:
        """Create a pending task (its `created` event is seq 1) and return it once committed."""
        events = await self._submit("", None, Create(user_id, kind, params))
        task = self._cache.get(events[0].task_id)
        if task is None:  # evicted already; read it back
            task = await self._store.get_task(events[0].task_id)
            assert task is not None
        return task

    async def report_progress(
        self, task_id: str, progress: Progress, *, owner_id: int | None = None
    ) -> list[Event]:
        return await self._submit(task_id, owner_id, progress)

    async def complete(
        self, task_id: str, result: dict[str, Any] | None, *, owner_id: int | None = None
    ) -> list[Event]:
        return await self._submit(task_id, owner_id, Complete(result))

    async def fail(self, task_id: str, error: str, *, owner_id: int | None = None) -> list[Event]:
        return await self._submit(task_id, owner_id, Fail(error))

    async def cancel(
        self, task_id: str, *, owner_id: int | None = None, reason: str = "cancelled by user"
    ) -> list[Event]:
        return await self._submit(task_id, owner_id, Cancel(reason))

    async def _submit(
        self, task_id: str, owner_id: int | None, change: Create | Change
    ) -> list[Event]:
        if not self._accepting:
            raise Unavailable("server is shutting down", headers={"Retry-After": "1"})
        future: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(task_id, owner_id, change, future))
        # shield: a caller that goes away must not cancel a commit other callers share.
        return await asyncio.shield(future)

    # -- the commit loop -----------------------------------------------------------------

    async def _commit_loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            batch: list[_Request] = []
            if first is None:
                stopping = True
            else:
                batch.append(first)
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    continue
                batch.append(item)
            if batch:
                try:
                    await self._commit_batch(batch)
                except Exception:  # never let the loop die: later requests would hang
                    log.exception("tracker.batch_failed size=%d", len(batch))
                    for req in batch:
                        if not req.future.done():
                            req.future.set_exception(Unavailable("could not store the event"))

    async def _load(self, task_id: str, staged: dict[str, Task]) -> Task | None:
        task = staged.get(task_id) or self._cache.get(task_id)
        if task is None:
            task = await self._store.get_task(task_id, for_write=True)
        return task

    async def _commit_batch(self, batch: list[_Request]) -> None:
        staged: dict[str, Task] = {}
        new_ids: set[str] = set()
        events_by_task: dict[str, list[Event]] = {}
        accepted: list[tuple[_Request, list[Event]]] = []
        for req in batch:
            ts = utc_now()
            try:
                if isinstance(req.change, Create):
                    task, events = _new_task(req.change, ts)
                    new_ids.add(task.id)
                else:
                    current = await self._load(req.task_id, staged)
                    if current is None or (
                        req.owner_id is not None and current.user_id != req.owner_id
                    ):
                        raise NotFound("task not found")
                    task, events = apply_change(current, req.change, ts)
            except Exception as exc:
                req.future.set_exception(exc)
                continue
            staged[task.id] = task
            events_by_task.setdefault(task.id, []).extend(events)
            accepted.append((req, events))
        if not accepted:
            return
        writes = [
            TaskWrite(task=task, events=events_by_task[tid], is_new=tid in new_ids)
            for tid, task in staged.items()
        ]
        started = time.perf_counter()
        try:
            await self._store.commit(writes)
        except Exception as exc:
            self.commit_failures += 1
            log.error("tracker.commit_failed tasks=%d error=%r", len(writes), exc)
            if len(accepted) > 1:
                # One bad request must not fail the others it happened to share a
                # transaction with: nothing was stored or cached, so commit each alone.
                for req, _ in accepted:
                    await self._commit_batch([req])
                return
            for req, _ in accepted:
                req.future.set_exception(Unavailable("could not store the event"))
            return
        self.commit_seconds.observe(time.perf_counter() - started)
        self.batch_sizes.observe(len(accepted))
        self.commits += 1
        for tid, task in staged.items():
            if task.status.is_terminal:
                self._cache.pop(tid, None)
            else:
                self._cache[tid] = task
                self._cache.move_to_end(tid)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        for req, events in accepted:
            self.events_committed += len(events)
            req.future.set_result(events)
            for event in events:
                for listener in self._listeners:
                    try:
                        listener(event)
                    except Exception:
                        log.exception(
                            "tracker.listener_failed task=%s seq=%d", event.task_id, event.seq
                        )
