"""The built-in `stock_analysis` job, and the runner that starts, cancels and resumes jobs.

A job drives the tracker like any external worker would: it reports progress after each
finished step, with a checkpoint of what it computed, in the same transaction as the
progress event. After a restart the runner picks up every unfinished built-in task and
continues it from the step after its checkpoint, so no job is left "running" forever.
Cancelling over HTTP commits a `cancelled` event; the runner hears it and stops the job.
"""

from __future__ import annotations

import asyncio
import logging

from ..errors import TaskFinished
from ..models import Event, EventType, Task, TaskStatus
from ..schemas import STOCK_ANALYSIS
from ..tracker import Progress, Tracker
from .prices import PriceProvider
from .stock import STEPS, Context, StockAnalysis

log = logging.getLogger(__name__)


class JobRunner:
    """Runs built-in jobs as asyncio tasks; one per task id."""

    kinds = (STOCK_ANALYSIS,)

    def __init__(self, tracker: Tracker, provider: PriceProvider, step_delay: float) -> None:
        self._tracker = tracker
        self._provider = provider
        self._step_delay = step_delay
        self._running: dict[str, asyncio.Task[None]] = {}

    @property
    def running_count(self) -> int:
        """Built-in jobs running now."""
        return len(self._running)

    def is_builtin(self, kind: str) -> bool:
        return kind in self.kinds

    def start(self, task: Task) -> None:
        """Run (or resume) the job of `task` in the background."""
        if task.id in self._running or task.status.is_terminal:
            return
        job = asyncio.create_task(self._run(task), name=f"job-{task.id}")
        self._running[task.id] = job
        job.add_done_callback(lambda _: self._running.pop(task.id, None))

    def on_event(self, event: Event) -> None:
        """Tracker listener: a job whose task was cancelled or failed from outside stops."""
        if event.event in (EventType.CANCELLED, EventType.FAILED):
            job = self._running.get(event.task_id)
            if job is not None and job is not asyncio.current_task():
                job.cancel()

    async def resume_unfinished(self, store_tasks: list[Task]) -> int:
        for task in store_tasks:
            log.info("job.resume task=%s status=%s seq=%d", task.id, task.status.value, task.seq)
            self.start(task)
        return len(store_tasks)

    async def stop(self) -> None:
        """Stop every job where it is; checkpoints let them resume at the next start."""
        jobs = list(self._running.values())
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Wait for every running job to end (tests)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _run(self, task: Task) -> None:
        try:
            await self._analyse(task)
        except (asyncio.CancelledError, TaskFinished):
            return  # cancelled by the user, or stopped for shutdown
        except Exception as exc:
            log.exception("job.failed task=%s", task.id)
            try:
                await self._tracker.fail(task.id, f"analysis failed: {exc}")
            except Exception:
                log.exception("job.fail_not_recorded task=%s", task.id)

    async def _analyse(self, task: Task) -> None:
        analysis = StockAnalysis(str(task.params["code"]).upper(), self._provider)
        checkpoint = task.checkpoint or {}
        done = int(checkpoint.get("done", 0))
        ctx: Context = dict(checkpoint.get("ctx", {}))
        if task.status is TaskStatus.PENDING:
            await self._tracker.report_progress(
                task.id, Progress(progress=0, step=STEPS[0][0], message="starting analysis")
            )
        for index in range(done, len(STEPS)):
            name, percent, step = STEPS[index]
            await asyncio.sleep(self._step_delay)
            summary = await step(analysis, ctx)
            report = ctx.pop("report", None)
            if report is not None:
                await self._tracker.complete(task.id, report)
                return
            await self._tracker.report_progress(
                task.id,
                Progress(
                    progress=percent,
                    step=name,
                    message=summary,
                    checkpoint={"done": index + 1, "ctx": ctx},
                ),
            )
