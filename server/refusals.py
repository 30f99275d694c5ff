"""Everything the server sheds or refuses, counted by reason and logged once per spell.

Under a flood the same refusal happens thousands of times a second; a log line for each
would itself be the denial of service. So every refusal is counted (exported by /metrics
as `progress_refused_total{reason}`), and a reason is logged at most once per
`LOG_EVERY` seconds, with how many happened since its last line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Seconds between two log lines for the same reason.
LOG_EVERY = 60.0


class LogLimiter:
    """At most one log line per key per `every` seconds; counts what it held back.

    Keys are bounded (`max_keys`, oldest forgotten first), so a flood from many sources
    costs bounded memory; a forgotten key simply logs again.
    """

    def __init__(
        self,
        every: float = LOG_EVERY,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._every = every
        self._max_keys = max_keys
        self._clock = clock
        #: key -> (when last logged, lines held back since)
        self._seen: dict[object, tuple[float, int]] = {}

    def allow(self, key: object) -> int | None:
        """None: hold this line back; else log it, noting how many were held back before."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self._every:
            self._seen[key] = (seen[0], seen[1] + 1)
            return None
        if seen is None and len(self._seen) >= self._max_keys:
            del self._seen[next(iter(self._seen))]
        self._seen.pop(key, None)
        self._seen[key] = (now, 0)
        return 0 if seen is None else seen[1]


class Refusals:
    """Refusal counts by reason (e.g. `auth_rate`, `commit_queue_full`, `quota_tasks`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Refusals since start, by reason.
        self.counts: Counter[str] = Counter()
        #: When each reason was last logged, and its count then.
        self._logged: dict[str, tuple[float, int]] = {}

    def note(self, reason: str, detail: str = "") -> None:
        """Count one refusal; log it if this reason has not been logged for a while.

        `detail` is `key=value ...` text for the log line (never a secret or a password).
        """
        self.counts[reason] += 1
        now = self._clock()
        last = self._logged.get(reason)
        if last is not None and now - last[0] < LOG_EVERY:
            return
        since = self.counts[reason] - (last[1] if last else 0)
        self._logged[reason] = (now, self.counts[reason])
        log.warning(
            "server.refused reason=%s count=%d since_last_log=%d%s",
            reason,
            self.counts[reason],
            since,
            f" {detail}" if detail else "",
        )
