"""The built-in `stock_analysis` job: its steps, each filling a context and summarising itself."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ..lifecycle import ChildResult
from ..models import TaskStatus
from . import indicators
from .prices import PriceProvider

HISTORY_DAYS = 120
#: Days of the price series in the report (for its chart): the last SERIES_DAYS closes with
#: their dates and MA5/10/20: 2,244-2,476 bytes of compact JSON for 600519, AAPL, BRK.B and
#: 000001, which makes the whole report about 2.9 KB (0.5 KB without it).
SERIES_DAYS = 60
#: The moving averages the report carries, by period.
MA_PERIODS = (5, 10, 20)
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
            "series": price_series(closes, ctx["dates"]),
            "note": "Synthetic prices for demonstration; not investment advice."
            if ctx["source"] == "synthetic"
            else "Not investment advice.",
        }
        return f"report ready: {ctx['signal']['signal'].upper()}"


def price_series(closes: list[float], dates: list[str]) -> dict[str, list[Any]]:
    """The last SERIES_DAYS days as columns (oldest first): `dates`, `close` and `ma5`,
    `ma10`, `ma20` rounded to 2 decimals (null where the history is too short for one).

    Columns rather than one object per day: the same numbers in about half the bytes, and
    what a chart reads anyway.
    """
    start = max(0, len(closes) - SERIES_DAYS)
    series: dict[str, list[Any]] = {"dates": dates[start:], "close": closes[start:]}
    for period in MA_PERIODS:
        values = indicators.sma(closes, period)[start:]
        series[f"ma{period}"] = [None if v is None else round(v, 2) for v in values]
    return series


#: (step name, progress % once done, method); the order is the job's order.
STEPS: list[tuple[str, int, StepFn]] = [
    ("load_prices", 20, StockAnalysis.load_prices),
    ("moving_averages", 40, StockAnalysis.moving_averages),
    ("rsi", 55, StockAnalysis.rsi),
    ("macd", 70, StockAnalysis.macd),
    ("signal", 85, StockAnalysis.signal),
    ("report", 95, StockAnalysis.report),
]


def rank_codes(children: list[ChildResult]) -> dict[str, object]:
    """A multi-code analysis's result: its codes ranked by signal score, best first (ties
    by code); a child that did not complete is listed last with its status."""
    ranked = []
    missing = []
    for child in children:
        report = json.loads(child.result) if child.result else None
        if child.status is TaskStatus.COMPLETED and isinstance(report, dict):
            ranked.append(
                {
                    "code": report.get("code"),
                    "task_id": child.id,
                    "signal": report.get("signal"),
                    "score": report.get("score"),
                    "last_close": report.get("last_close"),
                    "change_20d_pct": report.get("change_20d_pct"),
                }
            )
        else:
            missing.append({"task_id": child.id, "status": child.status.value})
    ranked.sort(key=lambda r: (-(r["score"] or 0), str(r["code"])))
    for rank, row in enumerate(ranked, start=1):
        row["rank"] = rank
    return {"ranking": ranked, "not_ranked": missing}
