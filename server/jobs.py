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
from collections.abc import Awaitable, Callable
from typing import Any

from . import indicators
from .errors import TaskFinished
from .models import Event, EventType, Task, TaskStatus
from .prices import PriceProvider
from .schemas import STOCK_ANALYSIS
from .tracker import Progress, Tracker

log = logging.getLogger(__name__)

HISTORY_DAYS = 120
Context = dict[str, Any]
StepFn = Callable[["StockAnalysis", Context], Awaitable[str]]


class StockAnalysis:
    """Steps of the analysis; each fills the context and returns a one-line summary."""

    def __init__(self, code: str, provider: PriceProvider) -> None:
        self.code = code
        self.provider = provider

    async def load_prices(self, ctx: Context) -> str:
        series = await self.provider.daily_closes(self.code, HISTORY_DAYS)
        ctx.update(closes=series.closes, dates=series.dates, source=series.source)
        last = series.closes[-1]
        return f"{len(series.closes)} daily closes ({series.source} data), last {last:.2f}"

    async def moving_averages(self, ctx: Context) -> str:
        closes = ctx["closes"]
        ma = {f"ma{p}": round(indicators.sma(closes, p)[-1] or 0.0, 4) for p in (5, 10, 20)}
        ctx["ma"] = ma
        return "MA5 {ma5:.2f}, MA10 {ma10:.2f}, MA20 {ma20:.2f}".format(**ma)

    async def rsi(self, ctx: Context) -> str:
        ctx["rsi"] = round(indicators.rsi(ctx["closes"], 14), 2)
        return f"RSI(14) {ctx['rsi']:.2f}"

    async def macd(self, ctx: Context) -> str:
        line, signal, hist = indicators.macd(ctx["closes"])
        ctx["macd"] = {
            "macd": round(line[-1], 4),
            "signal": round(signal[-1], 4),
            "histogram": round(hist[-1], 4),
            "previous_histogram": round(hist[-2], 4),
        }
        return f"MACD {line[-1]:.3f}, signal {signal[-1]:.3f}"

    async def signal(self, ctx: Context) -> str:
        macd = ctx["macd"]
        signal, score, reasons = indicators.trading_signal(
            ctx["closes"][-1],
            ctx["ma"],
            ctx["rsi"],
            [macd["previous_histogram"], macd["histogram"]],
        )
        ctx["signal"] = {"signal": signal, "score": score, "reasons": reasons}
        return f"signal {signal.upper()} (score {score:+d})"

    async def report(self, ctx: Context) -> str:
        closes = ctx["closes"]
        change = (closes[-1] / closes[-21] - 1) * 100 if len(closes) > 21 else 0.0
        ctx["report"] = {
            "code": self.code,
            "data_source": ctx["source"],
            "as_of": ctx["dates"][-1],
            "last_close": closes[-1],
            "change_20d_pct": round(change, 2),
            "indicators": {
                "ma": ctx["ma"],
                "rsi14": ctx["rsi"],
                "macd": {k: v for k, v in ctx["macd"].items() if k != "previous_histogram"},
            },
            "signal": ctx["signal"]["signal"],
            "score": ctx["signal"]["score"],
            "reasons": ctx["signal"]["reasons"],
            "note": "Synthetic prices for demonstration; not investment advice."
            if ctx["source"] == "synthetic"
            else "Not investment advice.",
        }
        return f"report ready: {ctx['signal']['signal'].upper()}"


#: (step name, progress % once done, method); the order is the job's order.
STEPS: list[tuple[str, int, StepFn]] = [
    ("load_prices", 20, StockAnalysis.load_prices),
    ("moving_averages", 40, StockAnalysis.moving_averages),
    ("rsi", 55, StockAnalysis.rsi),
    ("macd", 70, StockAnalysis.macd),
    ("signal", 85, StockAnalysis.signal),
    ("report", 95, StockAnalysis.report),
]


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
