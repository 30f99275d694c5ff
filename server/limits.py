"""Rate and count limits: token buckets and per-user connection slots. Pure: no I/O, no clock.

Callers pass the time (any monotonic clock, in seconds), so tests drive these with a fake one.

- `TokenBucket`: `rate` tokens per second, at most `burst` saved up; one message takes one.
- `MessageLimiter`: a bucket for one WebSocket connection that also notices a client that
  keeps sending into an empty bucket (a flood), so the caller can close it.
- `KeyedBuckets`: one bucket per key (a user's task), forgetting buckets that are full again,
  so memory follows the number of recently active keys.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable

#: Seconds over which a connection's refused messages are counted (from the first refusal).
FLOOD_WINDOW = 10.0


class TokenBucket:
    """`rate` tokens per second, holding at most `burst`; starts full."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        #: Tokens added per second (> 0).
        self.rate = rate
        #: Most tokens held: how many messages may come at once after a quiet spell.
        self.burst = burst
        #: Tokens held at `stamp`.
        self.tokens = float(burst)
        #: Clock reading (seconds) of the last update.
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token. Returns 0.0 if there was one, else the seconds until there will
        be one (and takes nothing): the caller refuses the message, or says when to retry."""
        tokens = self.tokens + (now - self.stamp) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (1.0 - tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """True once refilled to `burst`: the bucket is then the same as a fresh one."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class Verdict(enum.Enum):
    """What to do with one client message."""

    ADMIT = "admit"  # act on it
    REFUSE = "refuse"  # answer rate_limited, do not act on it
    CLOSE = "close"  # flooding: close the connection (1008)


class MessageLimiter(TokenBucket):
    """A connection's message bucket plus a count of refusals.

    More than `flood_limit` messages refused within `FLOOD_WINDOW` seconds (counted from
    the first refusal of the window) is a flood. A client slightly over the rate only
    gets errors; one that keeps sending regardless is closed.
    """

    __slots__ = ("flood_limit", "refused", "window_end")

    def __init__(self, rate: float, burst: float, flood_limit: int, now: float) -> None:
        super().__init__(rate, burst, now)
        #: Refusals allowed per window; the next one is a flood.
        self.flood_limit = flood_limit
        #: Refusals in the current window.
        self.refused = 0
        #: Clock reading at which the current window ends.
        self.window_end = now

    def charge(self, now: float, tokens: float) -> None:
        """Spend `tokens` that cannot be refused (work already asked for, such as the next
        page of a replay); the bucket may go into debt, down to -burst, so that later
        messages wait for it."""
        held = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.tokens = max(-float(self.burst), held - tokens)
        self.stamp = now

    def check(self, now: float) -> Verdict:
        """Account for one incoming message received at `now`."""
        if self.take(now) == 0.0:
            return Verdict.ADMIT
        if now >= self.window_end:
            self.window_end = now + FLOOD_WINDOW
            self.refused = 0
        self.refused += 1
        return Verdict.CLOSE if self.refused > self.flood_limit else Verdict.REFUSE


class KeyedBuckets:
    """One token bucket per key; `rate` <= 0 turns the limit off.

    A bucket that has refilled is dropped (a fresh one behaves the same), at most every
    `burst / rate` seconds, so only keys used within about twice that time are held. As a
    last bound, past `max_keys` the oldest bucket is forgotten (that key starts afresh).
    """

    def __init__(self, rate: float, burst: int, *, max_keys: int = 100_000) -> None:
        #: Tokens per second per key (<= 0: unlimited).
        self.rate = rate
        #: Tokens a key may save up.
        self.burst = burst
        self._max_keys = max_keys
        self._buckets: dict[Hashable, TokenBucket] = {}
        #: Seconds an unused bucket takes to refill; also the sweep period.
        self._sweep_every = max(1.0, burst / rate) if rate > 0 else 0.0
        self._next_sweep = float("-inf")

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: Hashable, now: float) -> float:
        """Take one token for `key`: 0.0 if allowed, else seconds until it would be."""
        if self.rate <= 0:
            return 0.0
        if now >= self._next_sweep:
            self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._max_keys:
                del self._buckets[next(iter(self._buckets))]  # the oldest inserted
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def waiting(self, key: Hashable, now: float) -> float:
        """Seconds until `key` has a token (0.0: it has one now); takes nothing."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0.0
        tokens = min(bucket.burst, bucket.tokens + (now - bucket.stamp) * bucket.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / bucket.rate

    def _sweep(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.is_full(now)]:
            del self._buckets[key]
        self._next_sweep = now + self._sweep_every
