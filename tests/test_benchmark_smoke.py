"""A smoke run of the benchmark suite with tiny sizes: every scenario runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The scenarios that need nothing but this repository (B8 and B9 need PostgreSQL, Redis).
SINGLE_NODE = "B1,B2,B3,B4,B5,B6,B7,abuse"


def quick_run(out: Path, only: str) -> tuple[dict[str, Any], str]:
    """`benchmarks.run --quick --repeat 1 --only ONLY`: its JSON results and its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--repeat", "1"]
        + ["--only", only, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_benchmark_quick_run(tmp_path):
    """`benchmarks.run --quick` runs B1-B7 and abuse, and loses, repeats or skips nothing."""
    results, stdout = quick_run(tmp_path / "bench.json", SINGLE_NODE)
    scenarios = results["scenarios"]
    assert sorted(scenarios) == ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "abuse"]
    for scenario in ("B1", "B2", "B3", "B5"):
        for variant in ("server", "reference"):
            figures = scenarios[scenario][variant]
            assert figures["received"]["median"] > 0, (scenario, variant)
            for key in ("lost", "gaps", "dups"):
                assert figures[key]["max"] == 0, (scenario, variant, key)
    for scenario in ("B1", "B3"):  # the durable reference: every post committed, delivered
        figures = scenarios[scenario]["durable"]
        assert figures["received"]["median"] > 0 and figures["lost"]["max"] == 0, scenario
    assert scenarios["B6"]["durable"]["events_per_s"]["median"] > 0
    assert "target B3 deliveries_per_s" in stdout and "vs durable" in stdout
    assert scenarios["B4"]["server"]["rss_per_conn_kib"]["median"] > 0
    assert scenarios["B6"]["server"]["events_per_s"]["median"] > 0
    assert scenarios["B6"]["naive"]["events_per_s"]["median"] > 0
    b7 = scenarios["B7"]["server"]
    assert b7["gaps"]["max"] == 0 and b7["dups"]["max"] == 0
    assert all(b7["all_final"]["runs"])
    assert "target B1" in stdout
    _check_abuse(scenarios["abuse"]["server"])
    assert "target abuse answers" in stdout


def test_curves_quick_run(tmp_path):
    """`benchmarks.curves --quick` measures every point beside its references, and saves."""
    out = tmp_path / "curves.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.curves", "--quick", "--only", "B3,B4"]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    seen = {(row["scenario"], row["size"], row["variant"]) for row in rows}
    assert seen == {
        ("B3", f"b3_tasks={n}", variant)
        for n in (10, 20)
        for variant in ("server", "reference", "durable")
    } | {("B4", "b4_conns=50", variant) for variant in ("server", "reference")}
    for row in rows:
        assert "error" not in row, row
        assert row["lost"] == 0, row
        figure = "deliveries_per_s" if row["scenario"] == "B3" else "connects_per_s"
        assert row[figure] > 0, row
    assert "| B3 | b3_tasks=20 | durable |" in proc.stdout


def test_benchmark_quick_run_postgres_redis(tmp_path):
    """B8 (fan-out over one and two nodes) and B9 (ingest into PostgreSQL) run end to end:
    every event reaches every subscriber on either node, through Redis, and is stored."""
    results, stdout = quick_run(tmp_path / "bench.json", "B8,B9")
    if "skipped" in results:  # the binaries or the client libraries are missing
        reason = results["skipped"]["B8"]
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    scenarios = results["scenarios"]
    assert sorted(scenarios) == ["B8", "B9"]
    assert sorted(scenarios["B8"]) == ["one_node", "two_nodes"]
    for variant, figures in scenarios["B8"].items():
        assert figures["received"]["median"] > 0, variant
        assert figures["deliveries_per_s"]["median"] > 0, variant
        assert figures["cpu_us_per_event"]["median"] > 0, variant
        for key in ("lost", "gaps", "dups", "broker_dropped"):
            assert figures[key]["max"] == 0, (variant, key)
        assert figures["broker_published"]["min"] > 0, variant  # it published to Redis
    two = scenarios["B8"]["two_nodes"]
    assert two["broker_received"]["runs"] == two["broker_published"]["runs"]
    assert two["b_p99_ms"]["median"] > 0  # node b's subscribers got their events
    assert scenarios["B8"]["one_node"]["broker_received"]["max"] == 0  # its own: skipped
    for variant in ("server", "naive"):
        figures = scenarios["B9"][variant]
        assert figures["events_per_s"]["median"] > 0, variant
        assert figures["stored"]["runs"] == figures["events"]["runs"], variant
    assert "target B8 two_nodes" in stdout and "MISSED" not in stdout


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
