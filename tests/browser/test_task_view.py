"""Unit tests of the task panel's modules (static/js/format.js, task-view.js, tree.js,
chart.js), run in Chromium on the harness page (no server): time left and rate in human
units, folding a parent's events and children list, the line chart's geometry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Page


#: Imports the modules under test as `format`, `view`, `tree` and `chart`.
IMPORTS = """
const format = await import("/static/js/format.js");
const view = await import("/static/js/task-view.js");
const tree = await import("/static/js/tree.js");
const chart = await import("/static/js/chart.js");
"""


def js(page: Page, body: str, arg: Any = None) -> Any:
    """Run `body` as an async JS function (argument `arg`) with the modules imported."""
    return page.evaluate(f"async (arg) => {{ {IMPORTS} {body} }}", arg)


def test_time_left_and_rate_in_human_units(harness: Page) -> None:
    """Seconds, minutes, hours and days for the time left; %/s with sensible decimals."""
    eta = js(
        harness,
        "return arg.map((s) => format.etaText(s));",
        [0.4, 1, 12.4, 59.4, 61, 150, 3599, 5400, 7200, 36000, 3 * 86400],
    )
    assert eta == [
        "almost done",
        "about 1 s left",
        "about 12 s left",
        "about 59 s left",
        "about 1 min left",
        "about 3 min left",
        "about 1 h left",
        "about 1.5 h left",
        "about 2 h left",
        "about 10 h left",
        "about 3 days left",
    ]
    rates = js(harness, "return arg.map((r) => format.rateText(r));", [1.83, 0.5, 0.012, 12.4])
    assert rates == ["1.8 %/s", "0.5 %/s", "0.012 %/s", "12 %/s"]


def test_the_line_under_the_bar_counts_down_and_hides(harness: Page) -> None:
    """From a progress event's eta_s and rate: shown, counting down from when it arrived;
    hidden while unknown, while paused and once the task is finished."""
    lines = js(
        harness,
        """
        const v = view.emptyView("t1",
          { status: "running", progress: 10, rate: null, eta_s: null });
        const out = [view.etaLine(v)];
        view.applyMessage(v, { type: "event", seq: 1, event: "progress", status: "running",
          progress: 40, rate: 1.8, eta_s: 125 }, 1_000_000);
        out.push(view.etaLine(v, { now: 1_000_000 }));
        out.push(view.etaLine(v, { now: 1_000_000 + 65_000 }));  // 60 s left
        out.push(view.etaLine(v, { now: 1_000_000, paused: true }));
        view.applyMessage(v, { type: "event", seq: 2, event: "progress", status: "running",
          progress: 41, rate: 0, eta_s: null }, 1_000_000);
        out.push(view.etaLine(v, { now: 1_000_000 }));
        view.applyMessage(v, { type: "event", seq: 3, event: "completed", status: "completed",
          progress: 100, result: {} }, 1_000_000);
        out.push(view.etaLine(v, { now: 1_000_000 }), v.rate, v.etaS);
        return out;
        """,
    )
    assert lines == [
        "",
        "about 2 min left · 1.8 %/s",
        "about 1 min left · 1.8 %/s",
        "",
        "no progress lately",
        "",
        None,
        None,
    ]


def test_a_parents_events_move_its_children_and_log_one_row_per_child_status(
    harness: Page,
) -> None:
    """`child` fields update that child (newest seq wins), a progress-only move joins the
    child's row, a new status starts a row; an unknown child marks the list stale."""
    out = js(
        harness,
        """
        const v = view.emptyView("p", { kind: "stock_analysis_batch", status: "pending",
          params: { codes: ["A", "B"] }, children: { total: 2, pending: 2, running: 0,
          completed: 0, failed: 0, cancelled: 0 } });
        tree.mergeChildren(v, [
          { id: "a", kind: "stock_analysis", params: { code: "A" }, status: "pending",
            progress: 0, seq: 1 },
          { id: "b", kind: "stock_analysis", params: { code: "B" }, status: "pending",
            progress: 0, seq: 1 },
        ]);
        const ev = (seq, child, progress) => ({ type: "event", seq, event: "progress",
          status: "running", progress, rate: null, eta_s: null, child });
        view.applyMessage(v,
          { type: "event", seq: 1, event: "created", status: "pending", progress: 0 });
        view.applyMessage(v, ev(2, { id: "a", seq: 2, status: "running", progress: 0 }, 0));
        view.applyMessage(v, ev(3, { id: "a", seq: 4, status: "running", progress: 20 }, 10));
        view.applyMessage(v, ev(4, { id: "b", seq: 2, status: "running", progress: 0 }, 10));
        view.applyMessage(v, ev(5, { id: "a", seq: 9, status: "completed", progress: 100 }, 50));
        const stale = v.childrenStale;
        // An older list answer does not undo what the events said; a newer one wins.
        tree.mergeChildren(v, [
          { id: "a", status: "running", progress: 40, seq: 5 },
          { id: "b", status: "running", progress: 20, seq: 4 },
        ]);
        view.applyMessage(v, ev(6, { id: "c", seq: 3, status: "running", progress: 5 }, 51));
        return {
          children: v.children.map((c) => [c.id, c.status, c.progress, c.seq]),
          log: v.log.map((e) => [e.event, e.child?.id ?? null, e.child?.status ?? null, e.seqs]),
          stale, staleAfter: v.childrenStale, progress: v.progress,
          summary: tree.childSummary(v),
        };
        """,
    )
    assert out["children"] == [
        ["a", "completed", 100, 9],
        ["b", "running", 20, 4],
        ["c", "running", 5, 3],
    ]
    assert out["log"] == [
        ["created", None, None, [1]],
        ["progress", "a", "running", [2, 3]],
        ["progress", "b", "running", [4]],
        ["progress", "a", "completed", [5]],
        ["progress", "c", "running", [6]],
    ]
    assert out["stale"] is False and out["staleAfter"] is True
    assert out["progress"] == 51
    assert out["summary"] == "1 of 3 done · 2 running"


def test_child_rows_are_updated_in_place(harness: Page) -> None:
    """A child's row is the same button after an update (a focused one keeps its focus),
    with its new status, width and percentage."""
    out = js(
        harness,
        """
        const box = document.createElement("section");
        const summary = document.createElement("span");
        const list = document.createElement("ol");
        box.append(summary, list);
        document.body.append(box);
        const v = view.emptyView("p", { status: "running", children: { total: 1 } });
        tree.mergeChildren(v,
          [{ id: "a", params: { code: "AAPL" }, status: "running", progress: 20, seq: 3 }]);
        const opened = [];
        tree.renderChildren({ box, summary, list }, v, (child) => opened.push(child.id));
        const first = list.querySelector("button");
        first.focus();
        tree.mergeChildren(v, [{ id: "a", status: "completed", progress: 100, seq: 9 }]);
        tree.renderChildren({ box, summary, list }, v, (child) => opened.push(child.id));
        const button = list.querySelector("button");
        button.click();
        const result = {
          same: button === first, focused: document.activeElement === button,
          text: button.textContent, width: button.querySelector(".child-fill").style.width,
          status: button.dataset.status, opened, summary: summary.textContent,
        };
        tree.renderChildren({ box, summary, list }, v, null);  // read-only: no buttons
        result.readOnly = [list.querySelectorAll("button").length,
                           list.querySelectorAll(".child-item").length];
        box.remove();
        return result;
        """,
    )
    assert out["same"] and out["focused"]
    assert out["text"] == "Open AAPLCompleted100%"
    assert (out["width"], out["status"], out["opened"]) == ("100%", "completed", ["a"])
    assert out["summary"] == "1 of 1 done"
    assert out["readOnly"] == [0, 1]


def test_the_chart_draws_four_lines_through_every_day(harness: Page) -> None:
    """Close, MA5, MA10, MA20 as paths with a point per day (broken where a value is
    missing), inside the plot, at the width it is given; ticks are round numbers."""
    out = js(
        harness,
        """
        const n = 60;
        const dates = Array.from({ length: n }, (_, i) =>
          new Date(Date.UTC(2025, 9, 1 + i)).toISOString().slice(0, 10));
        const close = Array.from({ length: n }, (_, i) => 100 + 10 * Math.sin(i / 6));
        const ma = (p) => close.map((_, i) => i < p - 1 ? null
          : close.slice(i - p + 1, i + 1).reduce((a, b) => a + b) / p);
        const series = { dates, close, ma5: ma(5), ma10: ma(10), ma20: ma(20) };
        const holder = document.createElement("div");
        holder.style.width = "700px";
        document.body.append(holder);
        const figure = chart.priceChart(series, "TEST");
        holder.append(figure);
        const svg = figure.querySelector("svg.chart-svg");
        // Drawn at its own width once on screen (the ResizeObserver's first report).
        const own = () => svg.getAttribute("width") === String(svg.parentElement.clientWidth);
        for (let i = 0; i < 50 && !own(); i++) {
          await new Promise((r) => requestAnimationFrame(r));
        }
        const paths = [...svg.querySelectorAll("path.chart-line")].map((p) => ({
          line: p.dataset.line,
          points: (p.getAttribute("d").match(/[ML]/g) ?? []).length,
          moves: (p.getAttribute("d").match(/M/g) ?? []).length,
          box: (({ x, y, width, height }) => ({ x, y, width, height }))(p.getBBox()),
        }));
        const result = {
          width: +svg.getAttribute("width"), plot: svg.parentElement.clientWidth,
          paths,
          legend: [...figure.querySelectorAll(".chart-legend li")].map((li) => li.textContent),
          label: svg.getAttribute("aria-label"),
          ticks: [...svg.querySelectorAll(".chart-tick text")].map((t) => t.textContent),
          dates: [...svg.querySelectorAll(".chart-date")].map((t) => t.textContent),
          gapped: chart.niceTicks(0.91, 1.07, 5),
        };
        holder.remove();
        return result;
        """,
    )
    assert out["width"] == out["plot"] and 480 <= out["width"] <= 700
    assert out["legend"] == ["Close", "MA5", "MA10", "MA20"]
    points = {p["line"]: p["points"] for p in out["paths"]}
    assert points == {"close": 60, "ma5": 56, "ma10": 51, "ma20": 41}
    assert all(p["moves"] == 1 for p in out["paths"])
    for path in out["paths"]:
        box = path["box"]
        assert box["x"] >= 0 and box["x"] + box["width"] <= out["width"] + 0.5
        assert box["height"] > 10  # a line that goes up and down, not flat
    assert out["label"].startswith("Closing price of TEST over 60 trading days, from 100.00")
    ticks = [float(t) for t in out["ticks"]]
    steps = {round(b - a, 6) for a, b in zip(ticks, ticks[1:], strict=False)}
    assert len(ticks) >= 3 and len(steps) == 1 and steps <= {1, 2, 2.5, 5, 10, 20}
    assert len(out["dates"]) == 5  # 3 below 480 px
    assert out["gapped"] == [0.925, 0.95, 0.975, 1, 1.025, 1.05]
