"""Rate and ETA (server/meter.py) against synthetic schedules."""

from __future__ import annotations

from server.meter import advance


def run(schedule: list[tuple[float, float]]) -> list[tuple[float | None, float | None]]:
    """(rate, eta_s) after each (time, progress) update."""
    meter = None
    shown = []
    for now, progress in schedule:
        meter, rate, eta = advance(meter, progress, now)
        shown.append((rate, eta))
    return shown


def test_nothing_is_shown_until_two_updates_over_a_second() -> None:
    """One update, or several within the first second: rate and ETA are unknown (None)."""
    assert run([(0.0, 10)]) == [(None, None)]
    assert run([(0.0, 10), (0.3, 11), (0.6, 12), (0.9, 13)])[-1] == (None, None)
    rate, eta = run([(0.0, 10), (0.5, 11), (1.0, 12)])[-1]
    assert rate is not None and eta is not None


def test_a_constant_rate_gives_an_eta_within_ten_percent_once_warmed_up() -> None:
    """2 %/s, updates every 0.5 s with jitter in their timing: ETA within 10 % of the truth."""
    schedule = []
    now = 0.0
    for i in range(40):
        now += 0.5 + (0.1 if i % 3 == 0 else -0.05)
        schedule.append((now, min(100.0, 2.0 * now)))
    shown = run(schedule)
    for (now, progress), (rate, eta) in list(zip(schedule, shown, strict=True))[6:]:
        true_eta = (100 - progress) / 2.0
        assert rate is not None and abs(rate - 2.0) / 2.0 < 0.1
        if true_eta > 1:
            assert eta is not None and abs(eta - true_eta) <= 0.1 * true_eta


def test_a_pause_lowers_the_rate_gradually_not_to_zero() -> None:
    """1 %/s, then 20 s without progress, then 1 %/s again: the rate falls but stays above
    zero, and climbs back over the next updates."""
    schedule = [(float(t), float(t)) for t in range(10)]  # 1 %/s
    schedule.append((30.0, 10.0))  # a 20 s stall, then a little progress
    schedule += [(30.0 + t, 10.0 + t) for t in range(1, 8)]
    shown = [rate for rate, _ in run(schedule)]
    before, after_pause, recovered = shown[9], shown[10], shown[-1]
    assert before is not None and abs(before - 1.0) < 0.01
    assert after_pause is not None and 0 < after_pause < before
    assert after_pause > 0.1  # one interval cannot wipe out the history
    assert recovered is not None and after_pause < recovered <= 1.0


def test_no_progress_means_no_eta() -> None:
    """A rate of 0 (or going backwards) shows rate 0 and ETA None."""
    shown = run([(0.0, 50), (1.0, 50), (2.0, 50), (3.0, 40)])
    assert shown[-1] == (0.0, None)


def test_a_batch_of_updates_at_one_instant_is_one_interval() -> None:
    """Updates with the same timestamp fold into the next interval (no division by zero)."""
    shown = run([(0.0, 0), (1.0, 10), (1.0, 20), (1.0, 30), (2.0, 40)])
    rate, _ = shown[-1]
    assert rate is not None and 10 < rate < 40


def test_uneven_intervals_do_not_skew_the_rate() -> None:
    """A parent whose two children report 5 ms apart every 0.7 s: +2.5 % each, so 5 % per
    0.7 s; the rate shown stays within 10 % of that (a per-update average overshoots)."""
    schedule = []
    now, progress = 0.0, 0.0
    for _ in range(30):
        for gap in (0.005, 0.695):
            now += gap
            progress += 2.5 * 100 / 150  # 30 rounds x 2 updates reach 100
            schedule.append((now, progress))
    true_rate = 2 * 2.5 * 100 / 150 / 0.7
    for rate, _ in run(schedule)[10:]:
        assert rate is not None and abs(rate - true_rate) / true_rate < 0.1, rate
