"""Scale curves: how the cost grows with the work, beside the references.

    python -m benchmarks.curves [--repeat 1] [--quick] [--only B1,B3]

B1 and B2 at 100, 1,000 and 5,000 subscribers, B3 at 50, 500 and 5,000 tasks (2
subscribers each), B4 at 10,000 idle sockets; each against the server, the direct-write
reference and (B1, B3) the durable reference, in one run. Prints a Markdown table (pasted
into docs/benchmarks.md) and writes benchmarks/results/curves.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from . import cluster
from .run import DURABLE, SERVER_ARGS, run_once
from .scenarios import Sizes, median
from .targets import ROOT

#: (scenario, the size it varies, its points, the figures shown).
CURVES = [
    ("B1", "b1_subs", (100, 1000, 5000), ("p50_ms", "p99_ms", "cpu_us_per_delivery")),
    ("B2", "b2_subs", (100, 1000, 5000), ("deliveries_per_s", "cpu_us_per_delivery")),
    ("B3", "b3_tasks", (50, 500, 5000), ("deliveries_per_s", "p99_ms", "cpu_us_per_delivery")),
    ("B4", "b4_conns", (10000,), ("rss_per_conn_kib", "connects_per_s", "rss_mib")),
]
QUICK_POINTS = {"B1": (20, 40), "B2": (20, 40), "B3": (10, 20), "B4": (50,)}


def sizes_for(scenario: str, field: str, point: int, quick: bool) -> Sizes:
    sizes = Sizes.quick() if quick else Sizes()
    setattr(sizes, field, point)
    if scenario == "B3":
        sizes.b3_posts = max(sizes.b3_posts, 4 * point)  # every task gets a few posts
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="scenarios, e.g. B1,B4 (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curves.json"))
    args = parser.parse_args(argv)
    only = {s for s in args.only.split(",") if s}
    backing = cluster.Backing()
    rows: list[dict[str, Any]] = []
    out = Path(args.out)
    if only and out.exists():  # re-running some scenarios keeps the others' rows
        rows = [r for r in json.loads(out.read_text())["rows"] if r["scenario"] not in only]
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        for scenario, field, points, figures in CURVES:
            if only and scenario not in only:
                continue
            for point in QUICK_POINTS[scenario] if args.quick else points:
                sizes = sizes_for(scenario, field, point, args.quick)
                names = ["server", "reference"] + (["durable"] if scenario in DURABLE else [])
                for name in names:
                    extra = SERVER_ARGS if name == "server" else []
                    row: dict[str, Any] = {
                        "scenario": scenario,
                        "size": f"{field}={point}",
                        "variant": name,
                    }
                    try:
                        runs = []
                        for i in range(args.repeat):
                            print(f"{scenario} {field}={point} {name} {i + 1}/{args.repeat}")
                            runs.append(
                                asyncio.run(run_once(name, extra, scenario, sizes, backing))
                            )
                        row.update({f: median([r[f] for r in runs]) for f in figures})
                        row["lost"] = max(r.get("lost", 0) for r in runs)
                    except Exception as exc:  # one point failing keeps the others' figures
                        row["error"] = repr(exc)[:300]
                        print(f"  failed: {row['error']}")
                    rows.append(row)
                    # Written after every point: a long run that fails late keeps the rest.
                    result = {"started": started, "cpus": os.cpu_count(), "rows": rows}
                    out.write_text(json.dumps(result, indent=1))
    finally:
        backing.close()
    print(markdown(rows))
    print(f"wrote {out}")
    return 1 if any("error" in row for row in rows) else 0


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| scenario | size | variant | figures |", "|---|---|---|---|"]
    for row in rows:
        shown = ", ".join(
            f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in row.items()
            if k not in ("scenario", "size", "variant")
        )
        lines.append(f"| {row['scenario']} | {row['size']} | {row['variant']} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
