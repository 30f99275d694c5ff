"""Refusals: every one counted, each reason logged at most once per spell."""

from __future__ import annotations

import logging

import pytest

from server.refusals import LOG_EVERY, LogLimiter, Refusals


def test_counts_every_refusal_and_logs_once_per_spell(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of one reason is one log line per LOG_EVERY seconds, with the count since."""
    now = [0.0]
    refusals = Refusals(clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="server.refusals")
    for _ in range(1000):
        refusals.note("auth_rate", "peer=10.0.0.1")
    refusals.note("commit_queue_full")
    now[0] += LOG_EVERY
    refusals.note("auth_rate")
    assert refusals.counts == {"auth_rate": 1001, "commit_queue_full": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "server.refused reason=auth_rate count=1 since_last_log=1 peer=10.0.0.1",
        "server.refused reason=commit_queue_full count=1 since_last_log=1",
        "server.refused reason=auth_rate count=1001 since_last_log=1000",
    ]


def test_log_limiter_holds_back_repeats_and_says_how_many() -> None:
    """One line per key per spell; the next line reports the lines held back; keys bounded."""
    now = [0.0]
    limiter = LogLimiter(every=10, max_keys=2, clock=lambda: now[0])
    assert limiter.allow("a") == 0
    assert [limiter.allow("a") for _ in range(3)] == [None, None, None]
    assert limiter.allow("b") == 0
    now[0] = 10
    assert limiter.allow("a") == 3
    assert limiter.allow("c") == 0  # a third key: the oldest ("b") is forgotten
    assert limiter.allow("b") == 0
