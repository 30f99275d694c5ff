"""Indicator math and the synthetic price source."""

from __future__ import annotations

import pytest

from server.jobs import indicators
from server.jobs.prices import SyntheticPriceProvider


def test_sma():
    """SMA is None until the window is full, then the window mean."""
    assert indicators.sma([1, 2, 3, 4], 2) == [None, 1.5, 2.5, 3.5]


def test_rsi_extremes_and_midpoint():
    """RSI is 100 for only gains, 0 for only losses, 50 for equal alternating moves."""
    assert indicators.rsi(list(range(1, 30)), 14) == 100.0
    assert indicators.rsi(list(range(30, 1, -1)), 14) == pytest.approx(0.0)
    assert indicators.rsi([10, 11] * 20, 14) == pytest.approx(50.0, abs=5)
    with pytest.raises(ValueError):
        indicators.rsi([1, 2, 3], 14)


def test_macd_of_flat_series_is_zero():
    """A flat series has MACD, signal and histogram of zero."""
    line, signal, hist = indicators.macd([5.0] * 40)
    assert line[-1] == signal[-1] == hist[-1] == 0


def test_signal_rules():
    """Bullish order, close above MA20 and an upward MACD cross give buy; the mirror gives sell."""
    buy = indicators.trading_signal(11, {"ma5": 10.5, "ma10": 10, "ma20": 9}, 55, [-0.1, 0.2])
    sell = indicators.trading_signal(8, {"ma5": 8.5, "ma10": 9, "ma20": 10}, 45, [0.1, -0.2])
    assert buy[0] == "buy" and sell[0] == "sell"


async def test_synthetic_prices_are_deterministic_and_labelled():
    """The same code gives the same series; different codes differ; the source says synthetic."""
    provider = SyntheticPriceProvider()
    a1, a2 = await provider.daily_closes("600519", 60), await provider.daily_closes("600519", 60)
    b = await provider.daily_closes("AAPL", 60)
    assert a1 == a2 and a1.closes != b.closes
    assert a1.source == "synthetic" and len(a1.closes) == len(a1.dates) == 60
    assert all(p > 0 for p in a1.closes) and a1.dates == sorted(a1.dates)
