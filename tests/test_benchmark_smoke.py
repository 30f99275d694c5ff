"""A smoke run of the benchmark suite with tiny sizes: every scenario runs end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_quick_run(tmp_path):
    """`benchmarks.run --quick` runs B1-B7 and abuse, and loses, repeats or skips nothing."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--repeat", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    scenarios = results["scenarios"]
    assert sorted(scenarios) == ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "abuse"]
    for scenario in ("B1", "B2", "B3", "B5"):
        for variant in ("server", "reference"):
            figures = scenarios[scenario][variant]
            assert figures["received"]["median"] > 0, (scenario, variant)
            for key in ("lost", "gaps", "dups"):
                assert figures[key]["max"] == 0, (scenario, variant, key)
    assert scenarios["B4"]["server"]["rss_per_conn_kib"]["median"] > 0
    assert scenarios["B6"]["server"]["events_per_s"]["median"] > 0
    assert scenarios["B6"]["naive"]["events_per_s"]["median"] > 0
    b7 = scenarios["B7"]["server"]
    assert b7["gaps"]["max"] == 0 and b7["dups"]["max"] == 0
    assert all(b7["all_final"]["runs"])
    assert "target B1" in proc.stdout
    _check_abuse(scenarios["abuse"]["server"])
    assert "target abuse answers" in proc.stdout


def _check_abuse(figures: dict) -> None:
    """The abuse scenario measured both phases and every attack recorded its answers."""
    for phase in ("quiet", "attack"):
        for key in ("p50_ms", "p99_ms", "post_p99_ms", "commit_p99_ms", "rss_peak_mib"):
            assert f"{phase}_{key}" in figures, (phase, key)
    assert figures["quiet_deliveries"]["median"] > 0
    assert figures["quiet_p99_ms"]["median"] > 0
    assert figures["rss_hwm_mib"]["median"] > 0
    assert figures["gaps"]["max"] == 0 and figures["dups"]["max"] == 0
    (attacks,) = figures["attacks"]["runs"]
    assert len(attacks) == 11
    for name, tally in attacks.items():
        # attempts counts recorded answers (a status, a close code, or the socket's fate).
        assert tally["attempts"] > 0, (name, tally)
        assert isinstance(tally["met"], bool) and tally["expected"], (name, tally)
