"""When `track()` reports: by count (each whole percent) and by time (at most once per
interval), plus the first and the last item; never once per item."""

from __future__ import annotations

import time
from collections.abc import Callable

from .models import Update


class Progression:
    """Turns "n items done" into the occasional progress update.

    Progress runs linearly from `start` to `end` (percent) as n goes from 0 to `total`;
    with no `total` it stays at `start` and only the message counts items.
    """

    def __init__(
        self,
        total: int | None,
        *,
        start: float = 0.0,
        end: float = 100.0,
        step: str | None = None,
        unit: str = "",
        interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= start <= end <= 100:
            raise ValueError("need 0 <= start <= end <= 100")
        if total is not None and total < 0:
            raise ValueError("total must be >= 0")
        self.total = total
        self.start = start
        self.end = end
        self.step = step
        self.unit = unit
        self.interval = interval
        self._clock = clock
        #: Time and whole percent of the latest update handed out.
        self._last_time = float("-inf")
        self._last_percent: int | None = None

    def percent(self, n: int) -> float:
        if not self.total:
            return self.end if self.total == 0 else self.start
        fraction = min(1.0, n / self.total)
        return round(self.start + (self.end - self.start) * fraction, 2)

    def message(self, n: int) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total is None:
            return f"{n:,}{unit}"
        return f"{n:,} of {self.total:,}{unit}"

    def update(self, n: int, *, final: bool = False) -> Update | None:
        """The update to report after `n` items, or None when it is not yet time."""
        percent = self.percent(n)
        whole = int(percent)
        now = self._clock()
        if not final and self._last_percent is not None:
            moved = whole != self._last_percent or self.total is None
            if not moved or now - self._last_time < self.interval:
                return None
        self._last_time = now
        self._last_percent = whole
        return Update(percent, self.step, self.message(n))
