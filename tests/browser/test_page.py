"""End-to-end tests of the demo page in Chromium against a real server process (run.py)."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..helpers import PASSWORD

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from .conftest import ServerProcess

STEPS = ["load_prices", "moving_averages", "rsi", "macd", "signal"]


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def register_through_form(page: Page, server: ServerProcess, username: str) -> None:
    """Open the page, switch to the register form, create an account (which logs in)."""
    expect = _expect()
    page.goto(server.url + "/")
    page.get_by_role("button", name="Register").click()
    form = page.locator("#register-form")
    form.locator("input[name=username]").fill(username)
    form.locator("input[name=password]").fill(PASSWORD)
    form.get_by_role("button", name="Create account").click()
    expect(page.locator("#user-name")).to_have_text(username)
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")


def start_analysis(page: Page, code: str) -> None:
    page.locator("input[name=code]").fill(code)
    page.get_by_role("button", name="Analyze").click()
    _expect()(page.get_by_role("progressbar")).to_be_visible()


def log_entries(page: Page) -> list[dict[str, Any]]:
    """The step log as [{seqs, event, step}], in screen order (a row lists its events' seqs)."""
    return page.locator("#step-log li[data-seqs]").evaluate_all(
        "els => els.map(e => ({seqs: e.dataset.seqs.split(' ').map(Number),"
        " event: e.dataset.event, step: e.dataset.step || null}))"
    )


def last_seq(page: Page) -> int:
    return max(seq for entry in log_entries(page) for seq in entry["seqs"])


def assert_clean_log(entries: list[dict[str, Any]]) -> None:
    """Every event once, in seq order with no gap, each step exactly once, ending completed."""
    seqs = [seq for entry in entries for seq in entry["seqs"]]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    steps = [e["step"] for e in entries if e["event"] == "progress"]
    assert steps == STEPS, steps
    assert entries[-1]["event"] == "completed"


def record_states(page: Page) -> None:
    """Keep every data-state #connection-status takes, in window.__states."""
    page.evaluate(
        """() => {
          const el = document.querySelector('#connection-status');
          window.__states = [el.dataset.state];
          new MutationObserver(() => {
            if (window.__states.at(-1) !== el.dataset.state) window.__states.push(el.dataset.state);
          }).observe(el, { attributes: true, attributeFilter: ['data-state'] });
        }"""
    )


def record_subscribes(page: Page) -> list[dict[str, Any]]:
    """Collect the subscribe messages the page sends over any WebSocket."""
    sent: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        message = json.loads(payload)
        if message.get("action") == "subscribe":
            sent.append(message)

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    return sent


def test_register_login_and_logout(
    page: Page, server: ServerProcess, screenshots: Path, page_errors: list[str]
) -> None:
    """Register through the form, log out, log in with the keyboard, log out again."""
    expect = _expect()
    page.goto(server.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    page.screenshot(path=screenshots / "login.png", animations="disabled")
    register_through_form(page, server, "alice")
    token = page.evaluate("() => JSON.parse(sessionStorage.getItem('progress.session')).token")
    assert token.count(".") == 2  # a JWT, kept in sessionStorage

    with page.expect_response("**/api/v1/auth/logout") as logout:
        page.get_by_role("button", name="Log out").click()
    assert logout.value.status == 204
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#auth-message")).to_contain_text("logged out")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "closed")
    assert page.evaluate("() => sessionStorage.getItem('progress.session')") is None
    # Logging out ended the session on the server too: the token no longer works.
    status = page.evaluate(
        """async (token) => (await fetch("/api/v1/auth/me",
            {headers: {Authorization: `Bearer ${token}`}})).status""",
        token,
    )
    assert status == 401

    # A wrong password is refused with a message.
    page.locator("#login-form input[name=username]").fill("alice")
    page.locator("#login-form input[name=password]").fill("not the password")
    page.locator("#login-form input[name=password]").press("Enter")
    expect(page.locator("#auth-message")).to_contain_text("Wrong username or password")

    # Keyboard only: the username field has focus, Tab to the password, Enter submits.
    page.locator("#login-form input[name=username]").fill("")
    page.locator("#login-form input[name=username]").focus()
    page.keyboard.type("alice")
    page.keyboard.press("Tab")
    page.keyboard.press("Control+A")
    page.keyboard.type(PASSWORD)
    page.keyboard.press("Enter")
    expect(page.locator("#user-name")).to_have_text("alice")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    expect(page.locator("#connection-status")).to_contain_text("Live")

    page.get_by_role("button", name="Log out").click()
    expect(page.locator("#login-form")).to_be_visible()
    assert page_errors == []


def test_analysis_runs_to_a_report(
    page: Page, server: ServerProcess, screenshots: Path, page_errors: list[str]
) -> None:
    """Start an analysis: the bar moves step by step to 100 and the report appears."""
    expect = _expect()
    register_through_form(page, server, "bob")
    start_analysis(page, "600519")
    bar = page.get_by_role("progressbar")
    page.wait_for_function(
        "() => { const v = +document.querySelector('[role=progressbar]')"
        ".getAttribute('aria-valuenow'); return v >= 40 && v < 100; }"
    )
    page.screenshot(path=screenshots / "mid-task.png", full_page=True, animations="disabled")

    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")
    report = page.locator("#task-result")
    expect(report).to_be_visible()
    expect(report.locator(".signal-value")).to_have_text(re.compile(r"^(BUY|HOLD|SELL)$"))
    page.screenshot(path=screenshots / "completed.png", full_page=True, animations="disabled")
    assert_clean_log(log_entries(page))
    for name in ("MA5", "MA10", "MA20", "RSI (14)", "MACD", "Histogram"):
        expect(report.locator("th", has_text=name).first).to_be_visible()
    expect(page.locator("#cancel-task")).to_be_hidden()

    # The recent tasks list has it, completed; clicking it shows it again.
    item = page.locator(".task-item").first
    expect(item).to_contain_text("600519")
    expect(item).to_have_attribute("data-status", "completed")

    # Phone-sized: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    overflow = page.evaluate("() => document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0
    page.screenshot(path=screenshots / "phone.png", full_page=True, animations="disabled")
    assert page_errors == []


def test_server_restart_mid_task(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """SIGTERM and restart mid-task: reconnecting, then open, and the task finishes once."""
    expect = _expect()
    server = make_server(0.5)
    subscribes = record_subscribes(page)
    register_through_form(page, server, "carol")
    record_states(page)
    start_analysis(page, "AAPL")
    status = page.locator("#connection-status")
    expect(page.locator("#step-log li[data-step=moving_averages]")).to_be_visible()

    assert server.stop(signal.SIGTERM) == 0
    expect(status).to_have_attribute("data-state", "reconnecting")
    expect(status).to_contain_text("Reconnecting")
    page.screenshot(path=screenshots / "reconnecting.png", animations="disabled")
    seen_before = last_seq(page)
    server.start()  # same port, same database: the job resumes from its checkpoint
    expect(status).to_have_attribute("data-state", "open")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")

    assert_clean_log(log_entries(page))
    states = page.evaluate("() => window.__states")
    assert "reconnecting" in states
    assert states.index("open") < states.index("reconnecting") < len(states) - 1
    assert states[-1] == "open"
    # After the reconnect the client resubscribed from the last seq it had shown.
    resumed = [m for m in subscribes if m.get("last_seq", 0) > 0]
    assert resumed and resumed[0]["last_seq"] >= seen_before
    assert page_errors == []


def test_reload_offers_resume(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Reload with a task running: "Resume" continues from the stored seq, no step twice."""
    expect = _expect()
    server = make_server(0.5)
    register_through_form(page, server, "dave")
    start_analysis(page, "000001")
    expect(page.locator("#step-log li[data-step=load_prices]")).to_be_visible()

    subscribes = record_subscribes(page)
    page.reload()
    resume = page.get_by_role("button", name=re.compile("Resume"))
    expect(resume).to_be_visible()
    expect(page.locator("#resume-banner")).to_contain_text("000001")
    stored = page.evaluate(
        "() => Object.values(JSON.parse(sessionStorage.getItem('progress.views')))[0].view.seq"
    )
    assert stored >= 3  # created, started, load_prices
    resume.click()
    expect(page.locator("#resume-banner")).to_be_hidden()
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    page.screenshot(path=screenshots / "resumed.png", full_page=True, animations="disabled")

    assert [m["last_seq"] for m in subscribes] == [stored]
    assert_clean_log(log_entries(page))

    # Nothing is active any more: a reload offers nothing to resume.
    page.reload()
    expect(page.locator("#user-name")).to_have_text("dave")
    expect(page.locator(".task-item")).to_have_count(1)
    expect(page.locator("#resume-banner")).to_be_hidden()
    assert page_errors == []


def test_cancel_shows_cancelled(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """The Cancel button stops a running analysis and the page says so."""
    expect = _expect()
    server = make_server(0.5)
    register_through_form(page, server, "erin")
    start_analysis(page, "MSFT")
    expect(page.locator("#step-log li[data-step=load_prices]")).to_be_visible()
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#task-status")).to_have_text("Cancelled")
    expect(page.locator("#task-outcome")).to_contain_text("Cancelled")
    expect(page.locator("#cancel-task")).to_be_hidden()
    assert int(page.get_by_role("progressbar").get_attribute("aria-valuenow") or 0) < 100
    assert log_entries(page)[-1]["event"] == "cancelled"
    expect(page.locator(".task-item").first).to_have_attribute("data-status", "cancelled")
    assert page_errors == []


def test_token_expiry_mid_task_reconnects_with_a_fresh_token(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """Close 4401 (token expired) mid-task: the page refreshes its token, resumes, finishes."""
    expect = _expect()
    server = make_server(0.8, "--token-ttl", "3")
    subscribes = record_subscribes(page)
    register_through_form(page, server, "frank")
    record_states(page)
    start_analysis(page, "600036")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")
    assert_clean_log(log_entries(page))
    assert "code=4401" in server.log()
    assert "reconnecting" in page.evaluate("() => window.__states")
    assert any(m.get("last_seq", 0) > 0 for m in subscribes)
    expect(page.locator("#user-name")).to_have_text("frank")  # still logged in
    assert page_errors == []


def test_gives_up_then_retry_now(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """With the server gone the page stops after its attempts, then "Retry now" reconnects."""
    expect = _expect()
    server = make_server(0.3)

    page.add_init_script("window.progressConfig = { reconnectAttempts: 2 };")
    register_through_form(page, server, "grace")
    status = page.locator("#connection-status")
    retry = page.get_by_role("button", name="Retry now")
    expect(retry).to_be_hidden()

    server.stop()
    expect(status).to_have_attribute("data-state", "closed")
    expect(status).to_contain_text("Connection lost")
    expect(retry).to_be_visible()
    page.screenshot(path=screenshots / "closed.png", animations="disabled")

    server.start()
    retry.click()
    expect(status).to_have_attribute("data-state", "open")
    expect(retry).to_be_hidden()
    start_analysis(page, "600519")  # and it works again
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    assert page_errors == []


def test_stale_stored_token_shows_the_login_form(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """A stored token the server refuses (GET /auth/me → 401) leads back to the login form."""
    expect = _expect()
    page.goto(server.url + "/")
    page.evaluate(
        """() => sessionStorage.setItem('progress.session', JSON.stringify(
             {token: 'not.a.token', username: 'ghost', expiresAt: Date.now() + 3600e3}))"""
    )
    page.reload()
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#auth-message")).to_contain_text("session has expired")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "closed")
    assert page.evaluate("() => sessionStorage.getItem('progress.session')") is None
    assert page_errors == []
