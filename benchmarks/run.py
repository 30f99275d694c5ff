"""Run the benchmark suite: python -m benchmarks.run [--quick] [--only B1,abuse] [--repeat 3]

Starts the real server (and the bare-aiohttp reference) as subprocesses on temporary
databases, drives them from separate client processes on 127.0.0.1, prints a table of
min / median / max per figure with the ratio to the reference, and writes JSON. B8 and B9
also start a PostgreSQL and a Redis server (benchmarks/cluster.py); without them they are
skipped, and say why.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from . import abuse, cluster
from .scenarios import SCENARIOS, Sizes, median
from .targets import ROOT, Target, free_port

SCENARIOS = {
    **SCENARIOS,
    "abuse": ("abuse resistance", abuse.abuse, False),
    **cluster.SCENARIOS,  # type: ignore[dict-item]  (they take a Deployment)
}
#: The variant the others' ratios are computed against (default: the reference).
BASELINES = {"B8": "one_node"}

#: Flags for the real server: limits raised so one benchmark user may open thousands of
#: sockets, own thousands of running tasks and post as fast as it can; everything else is
#: the default configuration.
SERVER_ARGS: list[str] = [
    "--max-connections-per-user", "0",
    "--task-create-rate", "0",
    "--max-unfinished-tasks-per-user", "0",
]  # fmt: skip
NAIVE_ARGS = ["--commit-batch-max", "1"]
#: The abuse scenario keeps the default configuration (its limits are what it measures),
#: except that X-Forwarded-For from 127.0.0.1 is believed, so that each client and each
#: attacker can have its own address while all of them connect from 127.0.0.1.
ABUSE_ARGS = ["--trusted-proxies", "127.0.0.1"]
#: --server-args, which apply to every variant.
EXTRA_ARGS: list[str] = []

#: (scenario, figure, compared with, how): the targets of the performance issue, against
#: the direct-write reference ("reference") or the durable one ("durable").
TARGETS = [
    ("B1", "p99_ms", "durable", "<= 1.0x"),
    ("B2", "deliveries_per_s", "reference", ">= 0.8x"),
    ("B3", "deliveries_per_s", "durable", ">= 0.8x"),
    ("B3", "cpu_us_per_delivery", "durable", "<= 1.25x"),
    ("B4", "rss_per_conn_kib", "reference", "<= 1.2x"),
    ("B4", "connects_per_s", "reference", ">= 0.8x"),
    ("B5", "p99_ms", "reference", "<= 1.3x"),
    ("B6", "events_per_s", "naive", ">= 3x"),
]
#: Scenarios also run against the durable reference (what durable acknowledgement costs).
DURABLE = ("B1", "B3", "B6")


def variants(scenario: str, with_reference: bool, sizes: Sizes) -> list[tuple[str, list[str]]]:
    if scenario == "abuse":
        args = ABUSE_ARGS + EXTRA_ARGS
        if sizes.abuse_header_timeout:
            args = args + ["--header-timeout", str(sizes.abuse_header_timeout)]
        return [("server", args)]
    if scenario == "B8":
        return [(name, SERVER_ARGS + EXTRA_ARGS) for name in cluster.NODE_COUNTS]
    out = [("server", SERVER_ARGS + EXTRA_ARGS)]
    if with_reference:
        out.append(("reference", []))
    if scenario in DURABLE:
        out.append(("durable", []))
    if scenario in ("B6", "B9"):
        out.append(("naive", SERVER_ARGS + EXTRA_ARGS + NAIVE_ARGS))
    return out


async def run_once(
    name: str, args: list[str], scenario: str, sizes: Sizes, backing: cluster.Backing
) -> dict[str, Any]:
    if scenario in cluster.SCENARIOS:
        return await cluster.run_once(scenario, name, args, sizes, backing)
    target = Target(
        name=name if name in ("reference", "durable") else "server",
        port=free_port(),
        extra_args=args,
        # The abuse scenario's job loop runs the built-in job at a realistic pace: 1 s, the
        # default when its published figures were measured (5 s since issue 11). The others
        # do not use it.
        job_step_delay=1.0 if scenario == "abuse" else 0.0,
    )
    target.start()
    try:
        return await SCENARIOS[scenario][1](target, sizes)
    finally:
        target.stop()


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            clean = [v for v in values if v == v]
            out[key] = {
                "min": min(clean, default=float("nan")),
                "median": median(values),
                "max": max(clean, default=float("nan")),
                "runs": values,
            }
        else:
            out[key] = {"runs": values}
    return out


def fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if value != value:
        return "nan"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"


def print_table(results: dict[str, Any]) -> None:
    print()
    if set(results["scenarios"]) - {"abuse"}:
        print(
            f"{'id':4} {'variant':10} {'figure':28} {'min':>10} {'median':>10} {'max':>10} "
            f"{'ratio':>8}"
        )
    for scenario, by_variant in results["scenarios"].items():
        if scenario == "abuse":
            continue  # printed beside its own baseline below
        base = BASELINES.get(scenario, "reference")
        ref = by_variant.get(base)
        for variant, figures in by_variant.items():
            for key, stats in figures.items():
                if "median" not in stats:
                    print(f"{scenario:4} {variant:10} {key:28} {'':>10} {fmt(stats['runs']):>10}")
                    continue
                ratio = ""
                if variant != base and ref and key in ref and "median" in ref[key]:
                    against = ref[key]["median"]
                    ratio = fmt(stats["median"] / against) + "x" if against else ""
                print(
                    f"{scenario:4} {variant:10} {key:28} {fmt(stats['min']):>10} "
                    f"{fmt(stats['median']):>10} {fmt(stats['max']):>10} {ratio:>8}"
                )
    if "abuse" in results["scenarios"]:
        abuse.print_report(results["scenarios"]["abuse"]["server"])
    print()
    for scenario, reason in results.get("skipped", {}).items():
        print(f"{scenario} skipped: {reason}")
    loads = ", ".join(f"{k} {v:.2f}" for k, v in results.get("load_1m", {}).items())
    print(f"load average (1 min) before each scenario: {loads}")
    for line in results["targets"]:
        print(line)


def check_targets(results: dict[str, Any]) -> list[str]:
    lines = []
    sc = results["scenarios"]
    for scenario, figure, against, how in TARGETS:
        try:
            ours = sc[scenario]["server"][figure]["median"]
            base = (
                sc["B1"]["server"][figure] if against == "B1" else sc[scenario][against][figure]
            )["median"]
        except KeyError:
            continue
        ratio = ours / base if base else float("nan")
        limit = float(how.split()[1].rstrip("x"))
        ok = ratio <= limit if how.startswith("<=") else ratio >= limit
        lines.append(
            f"target {scenario} {figure}: {fmt(ours)} vs {against} {fmt(base)} = "
            f"{ratio:.2f}x (want {how}) {'MET' if ok else 'MISSED'}"
        )
    if "B5" in sc:
        b5 = sc["B5"]["server"]
        growth = b5["rss_growth_mib"]["max"]
        closed = b5["stalled_closed"]["min"]
        lines.append(
            f"target B5 rss growth: max {fmt(growth)} MiB (want <= 64) "
            f"{'MET' if growth <= 64 else 'MISSED'}; stalled closed: min {closed} "
            f"of {b5['stalled']['runs'][0]}"
        )
    if "abuse" in sc:
        lines.extend(abuse.targets(sc["abuse"]["server"]))
    lines.extend(cluster.targets(sc))
    if "B7" in sc:
        b7 = sc["B7"]["server"]
        clean = max(b7["gaps"]["runs"]) == 0 and max(b7["dups"]["runs"]) == 0
        lines.append(
            f"target B7: gaps {max(b7['gaps']['runs'])} dups {max(b7['dups']['runs'])} "
            f"all final {all(b7['all_final']['runs'])}; recovery median "
            f"{fmt(b7['recovery_s']['median'])} s {'MET' if clean else 'MISSED'}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help="ids, e.g. B1,B6,abuse")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario and variant")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    parser.add_argument(
        "--server-args",
        default="",
        help='extra flags for the real server, e.g. "--log-level WARNING"',
    )
    for f in dataclasses.fields(Sizes):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    EXTRA_ARGS.extend(args.server_args.split())
    for f in dataclasses.fields(Sizes):
        value = getattr(args, f.name)
        if value is not None:
            setattr(sizes, f.name, value)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "sizes": dataclasses.asdict(sizes),
        "repeat": args.repeat,
        "scenarios": {},
        # The 1-minute load average before each scenario and at the end: this run's own
        # processes keep it near 3-4 on 2 cores, so much more means the machine is shared.
        "load_1m": {},
        "server_args": list(SERVER_ARGS + EXTRA_ARGS),
        "abuse_server_args": list(ABUSE_ARGS + EXTRA_ARGS),
    }
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    needs_backing = [s for s in chosen if s in cluster.SCENARIOS]
    reason = cluster.missing() if needs_backing else None
    if reason:
        print(f"{', '.join(needs_backing)} skipped: {reason}", flush=True)
        results["skipped"] = dict.fromkeys(needs_backing, reason)
        chosen = [s for s in chosen if s not in needs_backing]
    backing = cluster.Backing()
    try:
        for scenario in chosen:
            title, _, with_reference = SCENARIOS[scenario]
            results["scenarios"][scenario] = {}
            results["load_1m"][scenario] = os.getloadavg()[0]
            for name, extra in variants(scenario, with_reference, sizes):
                runs = []
                for i in range(args.repeat):
                    print(f"{scenario} {title}: {name} run {i + 1}/{args.repeat}", flush=True)
                    runs.append(asyncio.run(run_once(name, extra, scenario, sizes, backing)))
                results["scenarios"][scenario][name] = summarise(runs)
    finally:
        backing.close()
    results["load_1m"]["end"] = os.getloadavg()[0]
    results["targets"] = check_targets(results)
    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
