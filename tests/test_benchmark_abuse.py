"""The abuse benchmark's judging rules and its quantile of a histogram between two scrapes."""

from __future__ import annotations

import math

from benchmarks.abuse import ATTACKS, histogram_quantile, judge
from benchmarks.scenarios import Sizes

BY_NAME = {attack.name: attack for attack in ATTACKS}
#: 40 s of attack, the hash flood from 8 addresses: its allowance is 8 x 20/min x (1 + 40/60).
SIZES = Sizes()


def test_documented_refusals_meet():
    """Only the documented error, or normal answers within the allowance before it, meet."""
    assert judge(BY_NAME["nested_params"], {"422 validation_error": 5}, SIZES)["met"]
    flood = {"201": 100, "401 invalid_credentials": 100, "429 rate_limited": 600}
    assert judge(BY_NAME["hash_flood"], flood, SIZES)["met"]


def test_accepted_bombs_miss():
    """An accepted attack, or an error other than the documented one, is missed."""
    assert not judge(BY_NAME["nested_params"], {"201": 5}, SIZES)["met"]
    verdict = judge(BY_NAME["nested_lists_1mib"], {"500 internal": 5}, SIZES)
    assert not verdict["met"] and verdict["undocumented"] == 5
    assert judge(BY_NAME["nested_lists_1mib"], {"400 invalid_json": 5}, SIZES)["met"]


def test_normal_answers_beyond_the_allowance_miss():
    """A rate limit that answers too late (too many normal answers first) is missed."""
    verdict = judge(BY_NAME["hash_flood"], {"201": 500, "429 rate_limited": 10}, SIZES)
    assert not verdict["met"] and "allowance" in verdict["why"]


def test_shed_handshakes_are_tolerated_beside_the_allowance():
    """503 sheds do not count against the sockets a user may open."""
    answers = {"101": 128, "429 too_many_connections": 56, "503 overloaded": 2}
    assert judge(BY_NAME["socket_hoarding"], answers, SIZES)["met"]


def test_early_closes_are_not_the_header_timeout():
    """A connection dropped before the header timeout is not the documented close."""
    verdict = judge(BY_NAME["idle_connections"], {"closed_early": 10}, SIZES)
    assert verdict["documented"] == 0 and not verdict["met"]
    assert judge(BY_NAME["idle_connections"], {"closed": 9, "open_young": 1}, SIZES)["met"]


def test_a_dead_server_meets_nothing():
    """Even the documented answers do not meet the target once the server has died."""
    verdict = judge(BY_NAME["nested_params"], {"422 validation_error": 5}, SIZES, False)
    assert not verdict["met"] and "died" in verdict["why"]


def test_histogram_quantile_between_scrapes():
    """The p99 of what was observed between two scrapes, linear within its bucket."""
    before = [(0.01, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    after = [(0.01, 90.0), (0.1, 200.0), (math.inf, 200.0)]
    assert math.isclose(histogram_quantile(0.99, before, after), 0.01 + 0.09 * 0.99)
    assert math.isnan(histogram_quantile(0.99, after, after))
