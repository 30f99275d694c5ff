"""Where the analysis job gets prices: a small provider interface and a synthetic source.

This server has no market-data feed (and no network), so the default provider makes a
deterministic series from the stock code: the same code always gives the same prices,
and every result says `"data_source": "synthetic"`. A real source only has to implement
`PriceProvider.daily_closes`.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PriceSeries:
    code: str
    #: Closing prices, oldest first.
    closes: list[float]
    #: ISO date of each close.
    dates: list[str]
    #: Where the numbers came from ("synthetic" for the built-in source).
    source: str


class PriceProvider(Protocol):
    async def daily_closes(self, code: str, days: int) -> PriceSeries:
        """The last `days` daily closes of `code`, oldest first."""
        ...


class SyntheticPriceProvider:
    """A geometric random walk seeded by the code: deterministic, clearly not market data."""

    source = "synthetic"

    def __init__(self, end: date | None = None) -> None:
        #: Last trading day of every series; fixed so results are reproducible.
        self._end = end or date(2026, 1, 2)

    async def daily_closes(self, code: str, days: int) -> PriceSeries:
        seed = int.from_bytes(hashlib.sha256(code.upper().encode()).digest()[:8], "big")
        rng = random.Random(seed)
        price = 10 + rng.random() * 190
        drift = rng.uniform(-0.002, 0.002)
        volatility = rng.uniform(0.01, 0.03)
        closes = []
        for _ in range(days):
            price *= math.exp(drift + volatility * rng.gauss(0, 1))
            closes.append(round(price, 2))
        dates = []
        day = self._end
        while len(dates) < days:
            if day.weekday() < 5:
                dates.append(day.isoformat())
            day -= timedelta(days=1)
        dates.reverse()
        return PriceSeries(code=code.upper(), closes=closes, dates=dates, source=self.source)
