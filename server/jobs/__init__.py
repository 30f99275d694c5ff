"""The job runner: starts, queues, cancels and resumes the built-in jobs.

A job drives the tracker like any external worker would: it reports progress after each
finished step, with a checkpoint of what it computed, in the same transaction as the
progress event. After a restart the runner picks up every unfinished built-in task and
continues it from the step after its checkpoint, so no job is left "running" forever.
Cancelling over HTTP commits a `cancelled` event; the runner hears it and stops the job.

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
from typing import Protocol

from ..errors import NotFound, TaskFinished, Unavailable
from ..lifecycle import Progress
from ..models import Event, EventType, Task, TaskStatus, dumps
from ..schemas import STOCK_ANALYSIS
from ..tracker import Tracker
from .prices import PriceProvider
from .stock import STEPS, Context, StockAnalysis

log = logging.getLogger(__name__)

#: Jobs resumed per second after a restart.
RESUME_RATE = 20.0
#: Unfinished tasks read per page when resuming.
RESUME_PAGE = 100
#: Backoff of a step whose write failed for a passing reason: first and longest wait (s).
RETRY_FIRST, RETRY_MAX = 0.5, 30.0


class ResumeSource(Protocol):
    """Where unfinished tasks come from (the store), a page at a time, oldest first."""

    async def tasks_to_resume(
        self, kinds: tuple[str, ...], after: tuple[str, str] | None, limit: int
    ) -> list[Task]: ...


class JobRunner:
    """Runs built-in jobs as asyncio tasks, one per task id, within the running limits."""

    kinds = (STOCK_ANALYSIS,)

    def __init__(
        self,
        tracker: Tracker,
        provider: PriceProvider,
        step_delay: float,
        *,
        max_running: int = 0,
        max_per_user: int = 0,
    ) -> None:
        self._tracker = tracker
        self._provider = provider
        self._step_delay = step_delay
        #: Most jobs running at once, in all and per user (0: no limit).
        self.max_running = max_running
        self.max_per_user = max_per_user
        self._running: dict[str, asyncio.Task[None]] = {}
        self._running_by_user: dict[int, int] = {}
        #: Jobs waiting for a slot, in the order they were started.
        self._waiting: OrderedDict[str, Task] = OrderedDict()
        self._resumer: asyncio.Task[None] | None = None
        self._stopping = False

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

    def on_event(self, event: Event) -> None:
        """Tracker listener: a job whose task was cancelled or failed from outside stops."""
        if event.event in (EventType.CANCELLED, EventType.FAILED):
            self._waiting.pop(event.task_id, None)
            job = self._running.get(event.task_id)
            if job is not None and job is not asyncio.current_task():
                job.cancel()

    def resume_unfinished(self, store_pages: ResumeSource) -> None:
        """Queue every unfinished built-in task, gradually, in the background."""
        self._resumer = asyncio.create_task(self._resume(store_pages), name="job-resume")

    async def stop(self) -> None:
        """Stop every job where it is; checkpoints let them resume at the next start."""
        self._stopping = True
        self._waiting.clear()
        jobs = list(self._running.values())
        if self._resumer is not None:
            jobs.append(self._resumer)
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait for every running and waiting job to end (tests)."""
        while self._running or self._waiting or (self._resumer and not self._resumer.done()):
            pending = list(self._running.values())
            if self._resumer is not None and not self._resumer.done():
                pending.append(self._resumer)
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

    async def _resume(self, source: ResumeSource) -> None:
        after: tuple[str, str] | None = None
        resumed = 0
        while True:
            page = await source.tasks_to_resume(self.kinds, after, RESUME_PAGE)
            if not page:
                break
            for task in page:
                log.info(
                    "job.resume task=%s status=%s seq=%d", task.id, task.status.value, task.seq
                )
                self.start(task)
                resumed += 1
                await asyncio.sleep(1 / RESUME_RATE)
            after = (page[-1].created_at, page[-1].id)
        if resumed:
            log.info("job.resumed count=%d", resumed)

    # -- one job -------------------------------------------------------------------------

    async def _run(self, task: Task) -> None:
        try:
            await self._analyse(task)
        except (asyncio.CancelledError, TaskFinished, NotFound):
            return  # cancelled by the user, stopped for shutdown, or the task is gone
        except Exception as exc:
            log.exception("job.failed task=%s", task.id)
            try:
                await self._tracker.fail(task.id, f"analysis failed: {exc}", lane=task.user_id)
            except Exception:
                log.exception("job.fail_not_recorded task=%s", task.id)

    async def _write(
        self, task: Task, *, progress: Progress | None = None, result: str = ""
    ) -> None:
        """Report progress (or completion) with backoff while the failure is a passing one."""
        delay = RETRY_FIRST
        while True:
            try:
                if progress is not None:
                    await self._tracker.report_progress(task.id, progress, lane=task.user_id)
                else:
                    await self._tracker.complete(task.id, result, lane=task.user_id)
                return
            except Unavailable as exc:
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
