"""The demo page on one node while the built-in job runs on another: two `run.py`
processes on one PostgreSQL and one Redis, the page in Chromium against node A."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ..pg import pg_server, pg_template, pg_url  # noqa: F401
from ..redis_server import RedisServer, redis_server  # noqa: F401
from .conftest import ServerProcess
from .test_page import (
    _expect,
    assert_clean_log,
    http,
    log_entries,
    open_from_recent,
    page_token,
    register_through_form,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: Seconds between the job's steps: the whole job takes about 5 s, long enough to watch
#: it live, short enough for the suite.
STEP_DELAY = 0.8


@pytest.fixture
def nodes(
    tmp_path: Path,
    pg_url: str,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Nodes A and B on a fresh database and a Redis of their own (same JWT secret)."""
    started: list[ServerProcess] = []
    try:
        for name in ("a", "b"):
            node = ServerProcess(
                None,
                tmp_path / f"node-{name}.log",
                STEP_DELAY,
                "--store", pg_url,
                "--broker", redis_server.url,
                "--node-id", name,
            )  # fmt: skip
            started.append(node)
            node.start()
        yield started[0], started[1]
    finally:
        for node in started:
            node.stop()


def jobs_running(node: ServerProcess) -> float:
    """progress_jobs_running from the node's /metrics."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{node.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    match = re.search(r"^progress_jobs_running (\S+)$", text, re.MULTILINE)
    assert match, "no progress_jobs_running in /metrics"
    return float(match.group(1))


def test_the_page_on_one_node_follows_a_job_running_on_another(
    page: Page,
    nodes: tuple[ServerProcess, ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Page open on A, analysis started and run on B: the bar moves live to 100 % and the
    report shows, every event once and in order."""
    expect = _expect()
    a, b = nodes
    register_through_form(page, a, "dora")
    task = http(b, "POST", "/stock/analyze", {"code": "MSFT"}, page_token(page))
    assert (jobs_running(a), jobs_running(b)) == (0, 1)  # the job is B's

    open_from_recent(page, task["id"])
    # Seen while running, not only at the end: the events cross from B to A live.
    page.wait_for_function(
        "() => { const v = +document.querySelector('[role=progressbar]')"
        ".getAttribute('aria-valuenow'); return v >= 20 && v < 100; }"
    )
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")
    report = page.locator("#task-result")
    expect(report).to_be_visible()
    expect(report.locator(".signal-value")).to_have_text(re.compile(r"^(BUY|HOLD|SELL)$"))
    page.screenshot(path=screenshots / "cluster-completed.png", full_page=True)
    assert_clean_log(log_entries(page))
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    assert "Traceback" not in a.log() + b.log()
    assert page_errors == []
