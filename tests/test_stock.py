"""The stock analysis's report: its price series for the chart, beside the fields it had."""

from __future__ import annotations

from typing import Any

from server.jobs import indicators
from server.jobs.prices import SyntheticPriceProvider
from server.jobs.stock import HISTORY_DAYS, SERIES_DAYS, STEPS, StockAnalysis, price_series
from server.models import dumps

COLUMNS = {"dates", "close", "ma5", "ma10", "ma20"}


async def report_of(code: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every step of the analysis of `code` on the synthetic prices: (report, context)."""
    analysis = StockAnalysis(code, SyntheticPriceProvider())
    ctx: dict[str, Any] = {}
    for _, _, step in STEPS:
        await step(analysis, ctx)
    return ctx.pop("report"), ctx


async def test_the_series_is_the_last_60_days_with_their_moving_averages() -> None:
    """`series` holds the last 60 dates and closes of the history and, per day, its MA5,
    MA10 and MA20 over the whole history, rounded to 2 decimals."""
    report, ctx = await report_of("600519")
    series = report["series"]
    closes, dates = ctx["closes"], ctx["dates"]
    assert len(closes) == HISTORY_DAYS
    assert set(series) == COLUMNS
    assert {len(column) for column in series.values()} == {SERIES_DAYS}
    assert series["dates"] == dates[-SERIES_DAYS:]
    assert series["close"] == closes[-SERIES_DAYS:]
    for period in (5, 10, 20):
        whole = indicators.sma(closes, period)[-SERIES_DAYS:]
        assert series[f"ma{period}"] == [round(v, 2) for v in whole if v is not None]
    # The last day's averages are the report's own, to the series' precision.
    for name, value in report["indicators"]["ma"].items():
        assert series[name][-1] == round(value, 2)
    assert series["close"][-1] == report["last_close"]
    assert series["dates"][-1] == report["as_of"]


async def test_the_report_keeps_its_fields_and_grows_by_a_few_kilobytes() -> None:
    """The fields the report had are still there, unchanged in shape; the series adds
    under 3,000 bytes of compact JSON for each of four codes."""
    for code in ("600519", "AAPL", "BRK.B", "000001"):
        report, _ = await report_of(code)
        assert list(report) == [
            "code", "data_source", "as_of", "last_close", "change_20d_pct", "indicators",
            "signal", "score", "reasons", "series", "note",
        ]  # fmt: skip
        assert set(report["indicators"]) == {"ma", "rsi14", "macd"}
        size = len(dumps(report["series"]).encode())
        assert 2_000 < size < 3_000, (code, size)


def test_a_short_history_gives_nulls_where_no_average_exists() -> None:
    """With 12 closes, MA10 is null for the first 9 days and MA20 for all of them."""
    closes = [float(10 + i) for i in range(12)]
    dates = [f"2026-01-{i + 1:02d}" for i in range(12)]
    series = price_series(closes, dates)
    assert series["dates"] == dates and series["close"] == closes
    assert series["ma5"][:4] == [None] * 4 and series["ma5"][4] == 12.0
    assert series["ma10"][:9] == [None] * 9 and series["ma10"][9:] == [14.5, 15.5, 16.5]
    assert series["ma20"] == [None] * 12
