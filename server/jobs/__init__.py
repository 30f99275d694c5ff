"""The job runner: starts, queues, cancels and resumes the built-in jobs.

A job drives the tracker like any external worker would: it reports progress after each
finished step, with a checkpoint of what it computed, in the same transaction as the
progress event. After a restart the runner picks up every unfinished built-in task and
continues it from the step after its checkpoint, so no job is left "running" forever.
Cancelling over HTTP commits a `cancelled` event; the runner hears it and stops the job.

On several nodes a job runs on one of them at a time: it holds a lease in the store (node
id and expiry, by the store's clock), renewed every few seconds and checked before every
step it writes. When a node dies, its leases expire and another node's periodic scan
(every `lease_ttl / 2` seconds) takes them over and resumes the jobs from their last
checkpoint; a node that lost a lease (it was paused longer than the lease) stops that job
before writing another step. Cancelling from any node reaches the node running the job
(the relay delivers every committed event to every node).

Jobs cost CPU and database writes, so at most `max_running` run at once, and at most
`max_per_user` of one user; the others wait as `pending`, in the order they were started,
and start as slots free (a user at their limit does not hold up the others). After a
restart the unfinished jobs are queued a page at a time and started at most
`RESUME_RATE` per second, so a restart is not a thundering herd on the writer. A step
whose write fails for a passing reason (503: the database is busy, the queue is full) is
retried with backoff; only a real error fails the task.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from ..errors import NotFound, TaskFinished, Unavailable
from ..lifecycle import FINISHERS, Progress
from ..models import EventType, Task, TaskStatus, dumps
from ..relay import Notice
from ..schemas import STOCK_ANALYSIS, STOCK_ANALYSIS_BATCH
from ..store import StoreUnavailable
from ..tracker import Tracker
from .prices import PriceProvider
from .stock import STEPS, Context, StockAnalysis, rank_codes

log = logging.getLogger(__name__)

# A multi-code analysis completes by itself (auto_finish) with its codes ranked.
FINISHERS[STOCK_ANALYSIS_BATCH] = rank_codes

#: Jobs resumed per second after a restart.
RESUME_RATE = 20.0
#: Unfinished tasks read per page when resuming.
RESUME_PAGE = 100
#: Backoff of a step whose write failed for a passing reason: first and longest wait (s).
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
#: Seconds a job lease lasts unless renewed (renewed every third of it).
LEASE_TTL = 15.0


class LeaseLost(Exception):
    """Another node took this job's lease over: stop without writing another step."""


class JobStore(Protocol):
    """What the runner needs of the store: unfinished tasks and job leases."""

    async def tasks_to_resume(
        self, kinds: tuple[str, ...], after: tuple[str, str] | None, limit: int
    ) -> list[Task]: ...

    async def acquire_lease(self, task_id: str, node_id: str, ttl: float) -> bool: ...

    async def renew_leases(self, node_id: str, task_ids: Sequence[str], ttl: float) -> set[str]: ...

    async def release_lease(self, task_id: str, node_id: str) -> None: ...


class JobRunner:
    """Runs built-in jobs as asyncio tasks, one per task id, within the running limits."""

    kinds = (STOCK_ANALYSIS,)

    def __init__(
        self,
        tracker: Tracker,
        provider: PriceProvider,
        step_delay: float,
        *,
        store: JobStore,
        node_id: str = "node",
        lease_ttl: float = LEASE_TTL,
        max_running: int = 0,
        max_per_user: int = 0,
    ) -> None:
        self._tracker = tracker
        self._provider = provider
        self._step_delay = step_delay
        self._store = store
        self.node_id = node_id
        self.lease_ttl = lease_ttl
        #: Most jobs running at once, in all and per user (0: no limit).
        self.max_running = max_running
        self.max_per_user = max_per_user
        self._running: dict[str, asyncio.Task[None]] = {}
        self._running_by_user: dict[int, int] = {}
        #: Jobs waiting for a slot, in the order they were started.
        self._waiting: OrderedDict[str, Task] = OrderedDict()
        self._resumer: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._stopping = False
        #: Jobs started by the scan for unleased tasks (after a restart or another node's
        #: death), and leases lost to another node, for /metrics.
        self.resumed = 0
        self.takeovers = 0
        self.leases_lost = 0
        #: True once the first scan (at start) is over: later finds are takeovers.
        self._first_scan_done = False
        self._rescan = asyncio.Event()

    @property
    def running_count(self) -> int:
        """Built-in jobs running now."""
        return len(self._running)

    @property
    def waiting_count(self) -> int:
        """Built-in jobs waiting for a slot (their tasks are pending)."""
        return len(self._waiting)

    def is_builtin(self, kind: str) -> bool:
        return kind in self.kinds

    def start(self, task: Task) -> None:
        """Run (or resume) the job of `task` now if a slot is free, else when one frees."""
        if task.id in self._running or task.id in self._waiting or task.status.is_terminal:
            return
        self._waiting[task.id] = task
        self._start_waiting()

    def on_event(self, event: Notice) -> None:
        """Relay listener: a job whose task was cancelled or failed from outside stops."""
        if event.event in (EventType.CANCELLED, EventType.FAILED):
            self._waiting.pop(event.task_id, None)
            job = self._running.get(event.task_id)
            if job is not None and job is not asyncio.current_task():
                job.cancel()

    def resume_unfinished(self) -> None:
        """Scan for unfinished built-in tasks nobody runs now, and keep doing so, every
        `lease_ttl / 2` seconds (a dead node's jobs are taken over); renew our leases."""
        self._resumer = asyncio.create_task(self._scan_loop(), name="job-resume")
        self._renewer = asyncio.create_task(self._renew_loop(), name="job-leases")

    async def stop(self) -> None:
        """Stop every job where it is; checkpoints let them resume at the next start."""
        self._stopping = True
        self._waiting.clear()
        jobs = list(self._running.values())
        for background in (self._resumer, self._renewer):
            if background is not None:
                jobs.append(background)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait for every running and waiting job to end, and the first scan (tests)."""
        while self._running or self._waiting or (self._resumer and not self._first_scan_done):
            pending = list(self._running.values())
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            else:
                await asyncio.sleep(0.01)

    # -- slots ---------------------------------------------------------------------------

    def _has_slot(self, user_id: int) -> bool:
        if self.max_running and len(self._running) >= self.max_running:
            return False
        return not (
            self.max_per_user and self._running_by_user.get(user_id, 0) >= self.max_per_user
        )

    def _start_waiting(self) -> None:
        """Start waiting jobs in order, skipping users at their limit, while slots are free."""
        if self._stopping:
            return
        for task_id, task in list(self._waiting.items()):
            if self.max_running and len(self._running) >= self.max_running:
                return
            if not self._has_slot(task.user_id):
                continue
            del self._waiting[task_id]
            job = asyncio.create_task(self._run(task), name=f"job-{task.id}")
            self._running[task.id] = job
            self._running_by_user[task.user_id] = self._running_by_user.get(task.user_id, 0) + 1
            job.add_done_callback(lambda _, t=task: self._finished(t))

    def _finished(self, task: Task) -> None:
        self._running.pop(task.id, None)
        left = self._running_by_user.get(task.user_id, 0) - 1
        if left > 0:
            self._running_by_user[task.user_id] = left
        else:
            self._running_by_user.pop(task.user_id, None)
        self._start_waiting()

    def rescan(self) -> None:
        """Look for unfinished jobs nobody runs now, without waiting for the next round."""
        self._rescan.set()

    async def _scan_loop(self) -> None:
        while True:
            self._rescan.clear()
            try:
                await self._scan()
            except Exception as exc:  # the store unreachable: try again at the next round
                log.warning("job.scan_failed error=%s", exc)
            self._first_scan_done = True
            try:
                await asyncio.wait_for(self._rescan.wait(), self.lease_ttl / 2)
            except TimeoutError:
                pass

    async def _scan(self) -> None:
        """Start every unfinished built-in task whose lease is free, RESUME_RATE a second."""
        after: tuple[str, str] | None = None
        found = 0
        while True:
            page = await self._store.tasks_to_resume(self.kinds, after, RESUME_PAGE)
            if not page:
                break
            for task in page:
                if task.id in self._running or task.id in self._waiting:
                    continue
                log.info(
                    "job.resume task=%s status=%s seq=%d", task.id, task.status.value, task.seq
                )
                self.resumed += 1
                if self._first_scan_done:
                    self.takeovers += 1
                found += 1
                self.start(task)
                await asyncio.sleep(1 / RESUME_RATE)
            after = (page[-1].created_at, page[-1].id)
        if found:
            log.info("job.resumed count=%d", found)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            running = list(self._running)
            if not running:
                continue
            try:
                held = await self._store.renew_leases(self.node_id, running, self.lease_ttl)
            except Exception as exc:
                log.warning("job.lease_renew_failed jobs=%d error=%s", len(running), exc)
                continue
            for task_id in set(running) - held:
                self._lost(task_id)

    def _lost(self, task_id: str) -> None:
        job = self._running.get(task_id)
        if job is not None:
            self.leases_lost += 1
            log.warning("job.lease_lost task=%s node=%s", task_id, self.node_id)
            job.cancel()

    # -- one job -------------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        try:
            if not await self._store.acquire_lease(task.id, self.node_id, self.lease_ttl):
                return  # another node runs it
        except Exception as exc:  # the store unreachable: the scan tries again later
            log.warning("job.lease_failed task=%s error=%s", task.id, exc)
            return
        try:
            await self._analyse(task)
        except (asyncio.CancelledError, TaskFinished, NotFound, LeaseLost):
            return  # cancelled, stopped for shutdown, the task is gone, or taken over
        except Exception as exc:
            log.exception("job.failed task=%s", task.id)
            try:
                await self._tracker.fail(task.id, f"analysis failed: {exc}", lane=task.user_id)
            except Exception:
                log.exception("job.fail_not_recorded task=%s", task.id)
        finally:
            # Shielded: released even when cancelled for shutdown, so another node (or the
            # next start) resumes it at once instead of after the lease's expiry.
            try:
                await asyncio.shield(self._store.release_lease(task.id, self.node_id))
            except (asyncio.CancelledError, Exception):
                pass

    async def _write(
        self, task: Task, *, progress: Progress | None = None, result: str = ""
    ) -> None:
        """Report progress (or completion) with backoff while the failure is a passing one."""
        delay = RETRY_FIRST
        while True:
            try:
                # Still ours? A node paused past its lease must not write a step that the
                # node which took over writes too.
                held = await self._store.renew_leases(self.node_id, [task.id], self.lease_ttl)
                if task.id not in held:
                    self.leases_lost += 1
                    raise LeaseLost(task.id)
                if progress is not None:
                    await self._tracker.report_progress(task.id, progress, lane=task.user_id)
                else:
                    await self._tracker.complete(task.id, result, lane=task.user_id)
                return
            except (Unavailable, StoreUnavailable) as exc:
                log.warning("job.write_retry task=%s wait_s=%.1f error=%s", task.id, delay, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)

    async def _analyse(self, task: Task) -> None:
        params = json.loads(task.params)
        analysis = StockAnalysis(str(params["code"]).upper(), self._provider)
        checkpoint = task.checkpoint_value() or {}
        done = int(checkpoint.get("done", 0))
        ctx: Context = dict(checkpoint.get("ctx", {}))
        if task.status is TaskStatus.PENDING:
            await self._write(
                task, progress=Progress(progress=0, step=STEPS[0][0], message="starting analysis")
            )
        for index in range(done, len(STEPS)):
            name, percent, step = STEPS[index]
            await asyncio.sleep(self._step_delay)
            summary = await step(analysis, ctx)
            report = ctx.pop("report", None)
            if report is not None:
                await self._write(task, result=dumps(report))
                return
            await self._write(
                task,
                progress=Progress(
                    progress=percent,
                    step=name,
                    message=summary,
                    checkpoint=dumps({"done": index + 1, "ctx": ctx}),
                ),
            )
