"""Backoff with full jitter, and the Retry-After rule, shared by HTTP calls and watch."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays, in seconds, before retry number `attempt` (1 for the first retry).

    Full jitter (uniform in 0..min(maximum, initial * factor ** (attempt - 1))), so that
    clients dropped together do not come back together. A `Retry-After` from the server
    is a floor: the wait is that many seconds plus a random part of up to half of it.
    """

    initial: float = 0.25
    maximum: float = 10.0
    factor: float = 2.0

    def ceiling(self, attempt: int) -> float:
        """The largest delay retry `attempt` may draw (without a Retry-After)."""
        return min(self.maximum, self.initial * self.factor ** max(0, attempt - 1))

    def delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The wait before retry `attempt`, never shorter than `retry_after`."""
        if retry_after is None:
            return rand() * self.ceiling(attempt)
        return retry_after + rand() * min(self.ceiling(attempt), retry_after / 2)


@dataclass(frozen=True)
class RetryNotice:
    """Told to an `on_retry` hook before the client waits and sends a request again."""

    method: str
    #: The path under /api/v1, e.g. "/tasks/3f6c.../progress".
    path: str
    #: 1 for the first retry of this call.
    attempt: int
    #: Seconds the client waits before sending again.
    delay: float
    #: Why: the ApiError (429, 503, ...) or ServerUnreachable of the attempt just made.
    error: Exception
