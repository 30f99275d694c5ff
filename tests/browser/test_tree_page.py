"""The demo page with parent tasks, in Chromium against a real run.py: a multi-code analysis
end to end (a bar per child, moving with the parent's events; the parent's bar; the ranked
table; each code's report with its price chart), the time left under the bar, and how a
finished analysis reads on a phone, light and dark."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..helpers import PASSWORD
from .conftest import EXPECT_TIMEOUT_MS
from .readability import faint_lines, overflow_px, unreadable
from .test_page import http, page_token, register_over_http, register_through_form

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

    from .conftest import ServerProcess

CODES = ["600519", "AAPL", "MSFT"]
#: The lines of the chart, as the legend names them.
LEGEND = ["Close", "MA5", "MA10", "MA20"]
#: Days in a report's series (server/jobs/stock.py SERIES_DAYS).
SERIES_DAYS = 60

#: Records, in window.__bars, every value the parent's bar and each child's bar take (each
#: change once), from now on: every event the page renders shows up here.
RECORD_BARS = """() => {
  const bars = (window.__bars = { parent: [], children: {} });
  const note = (list, value) => { if (list.at(-1) !== value) list.push(value); };
  const bar = document.querySelector('#task-progress');
  const scan = () => {
    if (!document.querySelector('#task-body').hidden) {
      note(bars.parent, Number(bar.getAttribute('aria-valuenow')));
    }
    for (const item of document.querySelectorAll('#child-list .child-item')) {
      note((bars.children[item.dataset.taskId] ??= []), Number(item.dataset.progress));
    }
  };
  new MutationObserver(scan).observe(document.querySelector('#task-card'),
    { attributes: true, childList: true, subtree: true });
}"""

#: Records, in window.__eta, the line under the bar at every change: shown or not, its
#: text, and the last seq the step log shows at that moment.
RECORD_ETA = """() => {
  const records = (window.__eta = []);
  const eta = document.querySelector('#task-eta');
  const lastSeq = () => Math.max(0, ...[...document.querySelectorAll('#step-log [data-seqs]')]
    .flatMap((li) => li.dataset.seqs.split(' ').map(Number)));
  const scan = () => {
    const record = { shown: !eta.hidden, text: eta.textContent, seq: lastSeq() };
    const last = records.at(-1);
    const same = last && ["shown", "text", "seq"].every((k) => last[k] === record[k]);
    if (!same) records.push(record);
  };
  scan();
  new MutationObserver(scan).observe(document.querySelector('#task-card'),
    { attributes: true, childList: true, subtree: true, characterData: true });
}"""


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def dedupe(values: list[int]) -> list[int]:
    """Consecutive repeats dropped, as the page's recorder notes them."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


def all_events(server: ServerProcess, token: str, task_id: str) -> list[dict[str, Any]]:
    """The task's whole history over HTTP."""
    events: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        page = http(server, "GET", f"/tasks/{task_id}/events?after_seq={after}", token=token)
        events += page["events"]
        after = page["next_after_seq"]
    return events


def wait_finished(server: ServerProcess, token: str, task_id: str) -> dict[str, Any]:
    """Poll the task over HTTP until it has finished (bounded); returns it."""
    deadline = time.monotonic() + EXPECT_TIMEOUT_MS / 1000 * 2
    while True:
        task = http(server, "GET", f"/tasks/{task_id}", token=token)
        if task["status"] in ("completed", "failed", "cancelled"):
            return dict(task)
        assert time.monotonic() < deadline, f"task still {task['status']}"
        time.sleep(0.1)


def chart_of(page: Page) -> dict[str, Any]:
    """The report's chart as drawn: points per line, legend, width against its box."""
    return dict(
        page.locator("#task-result .chart").evaluate(
            """(figure) => {
              const svg = figure.querySelector('svg.chart-svg');
              return {
                lines: Object.fromEntries([...svg.querySelectorAll('path.chart-line')].map(
                  (p) => [p.dataset.line, (p.getAttribute('d').match(/[ML]/g) ?? []).length])),
                legend: [...figure.querySelectorAll('.chart-legend li')]
                  .map((li) => li.textContent),
                width: Number(svg.getAttribute('width')),
                box: svg.parentElement.clientWidth,
                label: svg.getAttribute('aria-label'),
              };
            }"""
        )
    )


def ranking_rows(page: Page) -> list[dict[str, str]]:
    """The ranked table as shown: rank, code, signal, score, last close, 20-day change."""
    return page.locator("#task-result table.ranking tbody tr").evaluate_all(
        """rows => rows.map((tr) => {
          const cells = [...tr.children].map((c) => c.textContent.trim());
          return { task_id: tr.dataset.taskId, rank: cells[0],
                   code: tr.querySelector('.rank-open').firstChild.textContent.trim(),
                   signal: cells[2], score: cells[3], close: cells[4], change: cells[5] };
        })"""
    )


def rate_text(rate: float) -> str:
    """As format.js rateText writes a rate (en-GB): "40 %/s", "1.8 %/s", "0.012 %/s"."""
    if rate >= 10 or rate < 0.1:
        places = "1" if rate >= 10 else f"1e{Decimal(str(rate)).adjusted() - 1}"
    else:
        places = "0.1"
    return f"{Decimal(str(rate)).quantize(Decimal(places), ROUND_HALF_UP):,f} %/s"


def signed(value: float, digits: int) -> str:
    """As the page writes figures (en-GB): "+1.06", "-2", "0.00"."""
    text = f"{value:,.{digits}f}"
    return f"+{text}" if value > 0 else text


def test_multi_code_analysis_end_to_end(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Three codes in the form: a bar per child appears and moves as the parent's events say,
    the parent's bar takes every value of its events, the ranked table is the API's
    ranking, and each row opens that code's report with its chart (4 lines, 60 days)."""
    expect = _expect()
    server = make_server(0.6)
    register_through_form(page, server, "treena")
    page.evaluate(RECORD_BARS)
    page.locator("input[name=code]").fill("600519, aapl  MSFT")
    page.get_by_role("button", name="Analyze").click()

    title = page.locator("#task-title")
    expect(title).to_have_text("600519, AAPL, MSFT · Multi-stock analysis")
    rows = page.locator("#child-list .child-item")
    expect(rows).to_have_count(3)
    expect(rows.locator(".child-name")).to_have_text(CODES)
    # Mid-run, once the time left is known (for the screenshot): the parent between 0 and
    # 100, its children moving.
    page.wait_for_function(
        """() => { const v = +document.querySelector('#task-progress')
             .getAttribute('aria-valuenow');
           return v >= 30 && v < 100 && !document.querySelector('#task-eta').hidden; }"""
    )
    page.locator("#task-card").screenshot(
        path=screenshots / "children-mid-run.png", animations="disabled"
    )
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(rows.locator(".badge")).to_have_text(["Completed"] * 3)
    expect(page.locator("#children-summary")).to_have_text("3 of 3 done")

    token = page_token(page)
    parent_id = page.evaluate("() => JSON.parse(sessionStorage.getItem('progress.current'))")
    parent = http(server, "GET", f"/tasks/{parent_id}", token=token)
    children = http(server, "GET", f"/tasks/{parent_id}/children", token=token)["tasks"]
    assert [c["params"]["code"] for c in children] == CODES
    events = all_events(server, token, parent_id)
    bars = page.evaluate("() => window.__bars")

    # The parent's bar took each value its events carried, in order, and nothing else.
    carried = [round(e["progress"]) for e in events if e["event"] in ("progress", "completed")]
    assert bars["parent"] == dedupe([0, *carried])
    assert len(bars["parent"]) >= 5 and bars["parent"][-1] == 100
    # Each child's bar moved, only through values the parent's events said it had.
    for child in children:
        moves = [e["child"] for e in events if e.get("child", {}).get("id") == child["id"]]
        said = {round(move["progress"]) for move in moves}
        seen = bars["children"][child["id"]]
        assert seen == sorted(seen) and seen[-1] == 100, seen
        assert set(seen) <= said | {0}, (seen, said)
        assert len(seen) >= 3, seen

    # The ranked table is the API's ranking, row for row.
    ranking = parent["result"]["ranking"]
    assert sorted(r["code"] for r in ranking) == sorted(CODES)
    shown = ranking_rows(page)
    assert shown == [
        {
            "task_id": r["task_id"],
            "rank": str(r["rank"]),
            "code": r["code"],
            "signal": r["signal"].upper(),
            "score": signed(r["score"], 0),
            "close": f"{r['last_close']:,.2f}",
            "change": f"{signed(r['change_20d_pct'], 2)}%",
        }
        for r in ranking
    ]

    # Each row opens that code's report, with its chart; "Back" returns to the ranking.
    for index, row in enumerate(ranking):
        page.locator("#task-result .rank-open", has_text=row["code"]).click()
        expect(title).to_have_text(f"{row['code']} · Stock analysis")
        expect(page.locator("#task-status")).to_have_text("Completed")
        chart = page.locator("#task-result .chart-svg")
        expect(chart).to_be_visible()
        for line in ("close", "ma5", "ma10", "ma20"):
            expect(chart.locator(f"path[data-line={line}]")).to_be_visible()
        drawn = chart_of(page)
        assert drawn["lines"] == {k: SERIES_DAYS for k in ("ma20", "ma10", "ma5", "close")}
        assert drawn["legend"] == LEGEND
        assert drawn["width"] == drawn["box"]  # drawn at its own width, not scaled
        assert drawn["label"].startswith(f"Closing price of {row['code']} over 60 trading days")
        expect(page.locator("#task-result .signal-value")).to_have_text(row["signal"].upper())
        if index == 0:
            page.locator("#task-result .chart").screenshot(
                path=screenshots / "chart.png", animations="disabled"
            )
        page.get_by_role("button", name="Back to the whole analysis").click()
        expect(title).to_have_text("600519, AAPL, MSFT · Multi-stock analysis")
        expect(page.locator("#task-result table.ranking tbody tr")).to_have_count(3)

    # The recent list has the analysis once, not once per code.
    expect(page.locator(".task-item")).to_have_count(1)
    assert page_errors == []


def test_an_external_parent_shows_children_as_they_come(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """A parent driven over HTTP: a child the page has not heard of appears (named from the
    children list) when the parent's event names it; the bars follow each post; the parent
    finishes by itself."""
    expect = _expect()
    register_through_form(page, server, "worker")
    token = page_token(page)
    parent = http(server, "POST", "/tasks", {"kind": "import", "auto_finish": True}, token)
    page.get_by_role("button", name="Refresh").click()
    page.locator(f".task-item[data-task-id='{parent['id']}']").click()
    expect(page.locator("#task-title")).to_have_text("import")
    children_box = page.locator("#task-children")
    expect(children_box).to_be_hidden()  # no child yet

    def child(name: str) -> str:
        body = {"kind": "file", "params": {"name": name}, "parent_id": parent["id"]}
        return str(http(server, "POST", "/tasks", body, token)["id"])

    first = child("a.csv")
    http(server, "POST", f"/tasks/{first}/progress", {"progress": 50}, token)
    bar = page.get_by_role("progressbar")
    rows = page.locator("#child-list .child-item")
    expect(bar).to_have_attribute("aria-valuenow", "50")
    expect(children_box.locator("#children-title")).to_have_text("Child tasks")
    expect(rows).to_have_count(1)
    expect(rows.first.locator(".child-name")).to_have_text(f"file {first[:6]}")
    expect(rows.first).to_have_attribute("data-progress", "50")

    second = child("b.csv")  # pending: the mean counts it at 0
    expect(bar).to_have_attribute("aria-valuenow", "25")
    expect(rows).to_have_count(2)
    expect(rows.nth(1)).to_have_attribute("data-status", "pending")
    http(server, "POST", f"/tasks/{second}/progress", {"progress": 30}, token)
    expect(rows.nth(1)).to_have_attribute("data-progress", "30")
    expect(bar).to_have_attribute("aria-valuenow", "40")
    expect(page.locator("#children-summary")).to_have_text("0 of 2 done · 2 running")
    for task_id in (first, second):
        http(server, "POST", f"/tasks/{task_id}/complete", {"result": {}}, token)
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(rows.locator(".badge")).to_have_text(["Completed", "Completed"])
    expect(page.locator("#children-summary")).to_have_text("2 of 2 done")

    rows.nth(1).click()  # a child opens in the card, with the way back
    expect(page.locator("#task-title")).to_have_text("file")
    expect(page.locator("#task-status")).to_have_text("Completed")
    page.get_by_role("button", name="Back to the parent task").click()
    expect(page.locator("#task-title")).to_have_text("import")
    assert page_errors == []


def test_a_code_the_server_refuses_is_named_before_anything_is_sent(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """A list with a code that is not one, or with more than 20 codes, is refused in the
    form with the reason; duplicates are sent once."""
    expect = _expect()
    register_through_form(page, server, "typo")
    posts: list[str] = []
    page.on(
        "request",
        lambda r: posts.append(r.post_data or "") if r.url.endswith("/stock/analyze") else None,
    )
    error = page.locator("#analyze-error")
    field = page.locator("input[name=code]")
    field.fill("AAPL, 12345, MSFT")
    page.get_by_role("button", name="Analyze").click()
    expect(error).to_have_text(re.compile("“12345” is not a stock code"))
    expect(field).to_have_attribute("aria-invalid", "true")
    field.fill(" ".join(f"{600000 + i}" for i in range(21)))
    page.get_by_role("button", name="Analyze").click()
    expect(error).to_have_text("At most 20 codes at once (you gave 21).")
    assert posts == []

    field.fill("aapl AAPL, msft")
    with page.expect_response(re.compile(r"/api/v1/stock/analyze$")) as answer:
        page.get_by_role("button", name="Analyze").click()
    assert answer.value.status == 201
    assert answer.value.request.post_data_json == {"codes": ["AAPL", "MSFT"]}
    expect(error).to_be_hidden()
    expect(page.locator("#child-list .child-item")).to_have_count(2)
    assert page_errors == []


def test_time_left_appears_once_known_and_hides_when_finished(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """The line under the bar is hidden until the first event that knows the rate, then
    says "about N s left · R %/s" (R from that event), and is hidden once completed."""
    expect = _expect()
    server = make_server(0.5)
    register_through_form(page, server, "eta")
    page.evaluate(RECORD_ETA)
    page.locator("input[name=code]").fill("600519")
    page.get_by_role("button", name="Analyze").click()
    eta = page.locator("#task-eta")
    expect(eta).to_have_text(re.compile(r"^(about \d+ s left|almost done) · \d+(\.\d+)? %/s$"))
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(eta).to_be_hidden()

    token = page_token(page)
    task_id = page.evaluate("() => JSON.parse(sessionStorage.getItem('progress.current'))")
    events = all_events(server, token, task_id)
    known = [e for e in events if e["event"] == "progress" and e["eta_s"] is not None]
    assert known, "the server never knew the rate"
    first = known[0]["seq"]
    completed = events[-1]["seq"]
    records = page.evaluate("() => window.__eta")
    assert records[0]["shown"] is False
    for record in records:
        running = first <= record["seq"] < completed
        assert record["shown"] is running, (record, first, completed)
        if running:
            assert re.fullmatch(
                r"(about \d+ s left|almost done) · \d+(\.\d+)? %/s", record["text"]
            ), record
    # The rate shown with each event is that event's.
    rates = {e["seq"]: e["rate"] for e in known}
    for record in records:
        if record["shown"] and record["seq"] in rates:
            assert record["text"].endswith(f" · {rate_text(rates[record['seq']])}"), (record, rates)
    assert records[-1]["shown"] is False
    assert page_errors == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_a_finished_analysis_reads_well_on_a_phone(
    browser: Browser,
    server: ServerProcess,
    scheme: str,
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """At 390 px, light and dark: the children, the ranking and a report's chart fit the
    screen, every text is legible and every line of the chart stands out (3:1)."""
    expect = _expect()
    token = register_over_http(server, f"phone-{scheme}")
    parent = http(server, "POST", "/stock/analyze", {"codes": CODES}, token)
    wait_finished(server, token, parent["id"])
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, locale="en-GB", color_scheme=scheme
    )
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        page.goto(server.url + "/")
        login = page.locator("#login-form")
        login.locator("input[name=username]").fill(f"phone-{scheme}")
        login.locator("input[name=password]").fill(PASSWORD)
        login.get_by_role("button", name="Log in").click()
        page.locator(f".task-item[data-task-id='{parent['id']}']").click()
        expect(page.locator("#task-result table.ranking tbody tr")).to_have_count(3)
        expect(page.locator("#child-list .child-item")).to_have_count(3)
        # The step log is drawn from the replayed events, after the ranking and the bars.
        expect(page.locator("#step-log .log-label").first).to_be_visible()
        expect(page.locator("#step-log .log-message").first).to_be_visible()
        assert overflow_px(page) <= 0
        texts = [
            "#task-title",
            "#children-title",
            "#children-summary",
            "#child-list .child-name",
            "#child-list .badge",
            "#child-list .child-pct",
            "#task-result .ranking caption",
            "#task-result .ranking td",
            "#task-result .rank-open",
            "#task-result .not-ranked, #task-result .note",
            "#step-log .log-label",
            "#step-log .log-message",
        ]
        assert unreadable(page, texts) == []
        page.locator("#task-card").screenshot(
            path=screenshots / f"ranking-phone-{scheme}.png", animations="disabled"
        )

        page.locator("#task-result .rank-open").first.click()
        chart = page.locator("#task-result .chart-svg")
        expect(chart).to_be_visible()
        page.wait_for_function(
            """() => { const svg = document.querySelector('#task-result .chart-svg');
                 return svg && +svg.getAttribute('width') === svg.parentElement.clientWidth; }"""
        )
        assert overflow_px(page) <= 0
        assert unreadable(page, [".chart-caption", ".chart-legend span", ".chart-svg text"]) == []
        assert faint_lines(page, ".chart-svg .chart-line") == []
        assert len(page.locator(".chart-svg .chart-date").all()) == 3  # fewer dates on a phone
        page.locator("#task-result .chart").screenshot(
            path=screenshots / f"chart-phone-{scheme}.png", animations="disabled"
        )
    finally:
        context.close()
    assert page_errors == []


def test_a_shared_parent_lists_its_children_without_opening_them(
    browser: Browser, server: ServerProcess, page_errors: list[str]
) -> None:
    """A share link to a multi-code analysis: its children and ranking are shown, but not
    as buttons (the link's token reads that one task only)."""
    expect = _expect()
    token = register_over_http(server, "sharer")
    parent = http(server, "POST", "/stock/analyze", {"codes": CODES[:2]}, token)
    wait_finished(server, token, parent["id"])
    share = http(server, "POST", f"/tasks/{parent['id']}/share", {}, token)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        viewer = context.new_page()
        viewer.on("pageerror", lambda exc: page_errors.append(str(exc)))
        viewer.goto(f"{server.url}/#task={parent['id']}&share={share['token']}")
        expect(viewer.locator("#task-status")).to_have_text("Completed")
        expect(viewer.locator("#child-list .child-item")).to_have_count(2)
        expect(viewer.locator("#child-list button")).to_have_count(0)
        expect(viewer.locator("#task-result table.ranking tbody tr")).to_have_count(2)
        expect(viewer.locator("#task-result .rank-open")).to_have_count(0)
        expect(viewer.locator("#task-parent")).to_be_hidden()
    finally:
        context.close()
    assert page_errors == []
