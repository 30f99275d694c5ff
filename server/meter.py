"""Rate and ETA of a task's progress: moving averages of progress and time, in the spirit
of tqdm's smoothing, weighted by time rather than by update.

The meter keeps a reference point (time and progress of the last update it counted) and
exponentially decaying sums of the progress made and the time taken since: each sum loses
a factor e^(-interval / HORIZON) per interval, so the rate (their ratio, percent per
second) is about the progress of the last HORIZON seconds over their duration. One burst
or one stall moves it part of the way only, a pause makes it fall gradually rather than to
zero, and updates that come at uneven intervals (a parent whose children report a few
milliseconds apart) do not skew it, as a per-update average would. It is computed at
commit from the task's own history and stored with the task, so every watcher sees the
same numbers and they continue across restarts. Pure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Seconds over which the averages mostly look back (their decay's time constant).
HORIZON = 20.0
#: The rate is shown once the task has had this many updates ...
MIN_UPDATES = 2
#: ... over at least this many seconds.
MIN_SPAN = 1.0
#: Updates closer than this (seconds) are folded into the next interval (a batch shares one
#: timestamp).
MIN_INTERVAL = 0.001


@dataclass(frozen=True, slots=True)
class Meter:
    #: Epoch seconds and progress of the reference point (the last counted update).
    t: float
    p: float
    #: Epoch seconds of the first update, and updates seen.
    t0: float
    n: int
    #: Decaying sums of progress made (percent) and time taken (seconds) since `t0`.
    dp: float = 0.0
    dt: float = 0.0

    def to_json(self) -> str:
        """As a JSON array `[t, p, t0, n, dp, dt]` (built by hand: this runs for every
        progress event, inside the commit)."""
        return f"[{self.t!r},{self.p!r},{self.t0!r},{self.n},{self.dp!r},{self.dt!r}]"

    @staticmethod
    def from_json(text: str | None) -> Meter | None:
        if text is None:
            return None
        t, p, t0, n, dp, dt = text[1:-1].split(",")
        return Meter(float(t), float(p), float(t0), int(n), float(dp), float(dt))


def advance(
    meter: Meter | None, progress: float, now: float
) -> tuple[Meter, float | None, float | None]:
    """The meter after an update to `progress` at `now`, and the (rate, eta_s) to show:
    None until MIN_UPDATES over MIN_SPAN seconds; eta_s None at a rate of 0."""
    if meter is None:
        return Meter(t=now, p=progress, t0=now, n=1), None, None
    n = meter.n + 1
    interval = now - meter.t
    if interval < MIN_INTERVAL:
        meter = Meter(meter.t, meter.p, meter.t0, n, meter.dp, meter.dt)
    else:
        decay = math.exp(-interval / HORIZON)
        dp = meter.dp * decay + (progress - meter.p)
        dt = meter.dt * decay + interval
        meter = Meter(now, progress, meter.t0, n, dp, dt)
    if meter.dt == 0.0 or n < MIN_UPDATES or now - meter.t0 < MIN_SPAN:
        return meter, None, None
    rate = max(0.0, meter.dp / meter.dt)
    eta = round((100.0 - progress) / rate, 1) if rate > 0 else None
    return meter, round(rate, 4), eta
