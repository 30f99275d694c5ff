"""End-to-end tests of the demo page in Chromium against a real server process (run.py)."""

from __future__ import annotations

import html.parser
import json
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from ..helpers import PASSWORD
from .readability import unreadable

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route, WebSocketRoute

    from .conftest import ServerProcess

STEPS = ["load_prices", "moving_averages", "rsi", "macd", "signal"]
STATIC = Path(__file__).resolve().parents[2] / "static"
#: The policy the server is to send with its pages.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; "
    "object-src 'none'"
)


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def http(
    server: ServerProcess, method: str, path: str, body: Any = None, token: str | None = None
) -> Any:
    """Call the server's JSON API directly (not through the page); returns the answer."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.url}/api/v1{path}", data=data, headers=headers, method=method
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as resp:
        return json.loads(resp.read())


def register_over_http(server: ServerProcess, username: str) -> str:
    """Create a user without the page; returns their token."""
    http(server, "POST", "/auth/register", {"username": username, "password": PASSWORD})
    answer = http(server, "POST", "/auth/login", {"username": username, "password": PASSWORD})
    return str(answer["access_token"])


def page_token(page: Page) -> str:
    return str(page.evaluate("() => JSON.parse(sessionStorage.getItem('progress.session')).token"))


def finished_external_task(server: ServerProcess, token: str, steps: int) -> dict[str, Any]:
    """An external task driven to completion over HTTP: created, started, `steps` progress
    events (each its own step), completed: seqs 1..steps + 3."""
    task = http(server, "POST", "/tasks", {"kind": "import", "params": {}}, token)
    for i in range(1, steps + 1):
        body = {"progress": 100 * i / (steps + 1), "step": f"part{i}", "message": f"part {i}"}
        http(server, "POST", f"/tasks/{task['id']}/progress", body, token)
    http(server, "POST", f"/tasks/{task['id']}/complete", {"result": {"rows": steps}}, token)
    return dict(task)


def open_from_recent(page: Page, task_id: str) -> None:
    """Refresh the recent tasks list and show `task_id` from it."""
    page.get_by_role("button", name="Refresh").click()
    page.locator(f".task-item[data-task-id='{task_id}']").click()


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
    """Register through the form, log out, log in with the keyboard, log out again; logged
    out, the connection pill is neutral ("idle"), not an error."""
    expect = _expect()
    page.goto(server.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    pill = page.locator("#connection-status")
    # Nothing was tried yet: no "Not connected" or "Disconnected" before anything happened.
    expect(pill).to_have_attribute("data-state", "idle")
    expect(pill.locator("#connection-text")).to_have_text("Live after log-in")
    page.screenshot(path=screenshots / "login.png", animations="disabled")
    register_through_form(page, server, "alice")
    token = page.evaluate("() => JSON.parse(sessionStorage.getItem('progress.session')).token")
    assert token.count(".") == 2  # a JWT, kept in sessionStorage

    with page.expect_response("**/api/v1/auth/logout") as logout:
        page.get_by_role("button", name="Log out").click()
    assert logout.value.status == 204
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#auth-message")).to_contain_text("logged out")
    expect(pill).to_have_attribute("data-state", "idle")
    expect(pill.locator("#connection-text")).to_have_text("Live after log-in")
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


def wait_for(page: Page, condition: Callable[[], Any]) -> Any:
    """Let the page (and Playwright's handlers) run until `condition()` is truthy; bounded by
    the expectation timeout."""
    from .conftest import EXPECT_TIMEOUT_MS

    deadline = time.monotonic() + EXPECT_TIMEOUT_MS / 1000
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        page.wait_for_timeout(20)
    return value


def current_view(page: Page) -> dict[str, Any]:
    """What the page stored of the task on screen (sessionStorage)."""
    return dict(
        page.evaluate(
            """() => JSON.parse(sessionStorage.getItem('progress.views'))
                 [JSON.parse(sessionStorage.getItem('progress.current'))].view"""
        )
    )


def test_reload_shows_the_task_again_at_once(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Reload mid-task: the card shows what the page stored before the server has sent
    anything, then goes on live from the stored seq; nothing offered to resume, no step twice."""
    expect = _expect()
    server = make_server(0.5)
    register_through_form(page, server, "dave")
    start_analysis(page, "000001")
    expect(page.locator("#step-log li[data-step=load_prices]")).to_be_visible()

    held: list[WebSocketRoute] = []
    sent: list[tuple[str, dict[str, Any]]] = []

    def route(ws: WebSocketRoute) -> None:
        if not held:
            # The first socket after the reload reaches nobody: whatever the card shows
            # then, the page had it from its storage.
            held.append(ws)
            ws.on_message(lambda m: sent.append(("held", json.loads(m))))
            return
        upstream = ws.connect_to_server()

        def forward(message: str | bytes) -> None:
            sent.append(("live", json.loads(message)))
            upstream.send(message)

        ws.on_message(forward)

    page.route_web_socket(re.compile(r"/api/v1/ws"), route)
    with page.expect_response(re.compile(r"/api/v1/tasks\?status=active&root=true$")):
        page.reload()
    wait_for(page, lambda: sent)
    stored = current_view(page)
    assert stored["seq"] >= 3  # created, started, load_prices
    expect(page.locator("#task-title")).to_have_text("000001 · Stock analysis")
    expect(page.locator("#task-body")).to_be_visible()
    expect(page.locator("#task-empty")).to_be_hidden()
    seqs = [seq for entry in log_entries(page) for seq in entry["seqs"]]
    assert seqs == list(range(1, stored["seq"] + 1))  # every stored row, from storage alone
    expect(page.get_by_role("progressbar")).to_have_attribute(
        "aria-valuenow", str(round(stored["progress"]))
    )
    # It resubscribed from the stored seq, and the task is not offered for resuming.
    assert [(w, m["action"], m["last_seq"]) for w, m in sent] == [
        ("held", "subscribe", stored["seq"])
    ]
    expect(page.locator("#resume-banner")).to_be_hidden()

    # The socket drops (a server restart, say): the client reconnects, for real this time.
    held[0].close(code=1012, reason="service restart")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")
    page.screenshot(path=screenshots / "resumed.png", full_page=True, animations="disabled")
    live = [m for w, m in sent if w == "live" and m["action"] == "subscribe"]
    assert [m["last_seq"] for m in live] == [stored["seq"]]
    assert_clean_log(log_entries(page))

    # Nothing is active any more: a reload shows the finished task and offers nothing.
    with page.expect_response(re.compile(r"/api/v1/tasks\?status=active&root=true$")):
        page.reload()
    expect(page.locator("#user-name")).to_have_text("dave")
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator(".task-item")).to_have_count(1)
    expect(page.locator("#resume-banner")).to_be_hidden()
    assert page_errors == []


def test_resume_banner_drops_a_task_once_it_is_on_screen(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """Two running tasks not on screen are offered after a reload; one opened from the
    recent list leaves the banner (the other stays), also once it has completed."""
    expect = _expect()
    register_through_form(page, server, "ruth")
    token = page_token(page)
    ids = []
    for name in ("first", "second"):
        task = http(server, "POST", "/tasks", {"kind": name, "params": {}}, token)
        http(server, "POST", f"/tasks/{task['id']}/progress", {"progress": 0}, token)
        ids.append(task["id"])
    with page.expect_response(re.compile(r"/api/v1/tasks\?status=active&root=true$")):
        page.reload()
    banner = page.locator("#resume-banner")
    expect(banner.locator("li")).to_have_count(2)
    expect(banner).to_contain_text("0% done")

    open_from_recent(page, ids[0])
    expect(page.locator("#task-title")).to_have_text("first")
    expect(banner.locator(f"li[data-task-id='{ids[0]}']")).to_have_count(0)
    expect(banner.locator(f"li[data-task-id='{ids[1]}']")).to_have_count(1)
    http(server, "POST", f"/tasks/{ids[0]}/complete", {"result": {}}, token)
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(banner.locator("li")).to_have_count(1)
    expect(banner).to_be_visible()  # the second is still running, and still offered

    open_from_recent(page, ids[1])
    expect(page.locator("#task-title")).to_have_text("second")
    expect(banner).to_be_hidden()  # nothing left to offer
    assert page_errors == []


def test_card_says_live_updates_are_paused_while_the_server_is_down(
    page: Page,
    make_server: Callable[..., ServerProcess],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Server killed mid-task: the card says live updates are paused and since when, the
    bar stops moving, no time left shown; restarted: the notice goes, the task finishes."""
    expect = _expect()
    # A short lease: the restarted server takes the killed one's job over within a second.
    server = make_server(0.5, "--job-lease-ttl", "2")
    register_through_form(page, server, "paula")
    start_analysis(page, "600519")
    expect(page.locator("#step-log li[data-step=moving_averages]")).to_be_visible()
    notice = page.locator("#task-paused")
    fill = page.locator("#task-progress .progress-fill")
    expect(notice).to_be_hidden()
    assert fill.evaluate("e => getComputedStyle(e).animationName") == "stripes"

    before = page.evaluate("() => Date.now()")
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
    expect(notice).to_be_visible()
    after = page.evaluate("() => Date.now()")
    text = notice.inner_text()
    match = re.fullmatch(
        r"Live updates paused since (\d\d:\d\d:\d\d): the connection to the server was"
        r" lost\. Reconnecting…",
        text,
    )
    assert match, text
    # "since" is when it went down: a second between the kill and the notice.
    seconds = page.evaluate(
        """([a, b]) => { const out = [];
             for (let t = a - a % 1000; t <= b; t += 1000) out.push(new Date(t)
               .toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', second: '2-digit'}));
             return out; }""",
        [before, after],
    )
    assert match[1] in seconds, (match[1], seconds)
    assert fill.evaluate("e => getComputedStyle(e).animationName") == "none"
    expect(page.locator("#task-card")).to_have_attribute("data-paused", "true")
    expect(page.locator("#task-eta")).to_be_hidden()
    expect(page.locator("#task-status")).to_have_text("Running")
    assert unreadable(page, ["#task-paused"]) == []
    page.screenshot(path=screenshots / "paused.png", animations="disabled")

    server.start()  # same port and database: the page reconnects, the job resumes
    expect(notice).to_be_hidden()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator("#task-card")).not_to_have_attribute("data-paused", "true")
    assert_clean_log(log_entries(page))
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
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "idle")
    assert page.evaluate("() => sessionStorage.getItem('progress.session')") is None
    assert page_errors == []


@pytest.mark.parametrize("whose", ["someone else's", "nobody's"])
def test_a_task_that_cannot_be_followed_says_so_once(
    page: Page, make_server: Callable[..., ServerProcess], whose: str, page_errors: list[str]
) -> None:
    """Subscribing to a task the server does not show (not_found) says so; no resubscribe."""
    expect = _expect()
    server = make_server(0.05)
    if whose == "someone else's":
        owner = register_over_http(server, "owner")
        task = http(server, "POST", "/tasks", {"kind": "import", "params": {"n": 1}}, owner)
    else:
        task = {
            "id": "0" * 32,
            "kind": "import",
            "params": {},
            "status": "running",
            "progress": 10,
            "step": None,
            "message": None,
            "result": None,
            "error": None,
            "created_at": "2026-01-01T00:00:00Z",
            "seq": 2,
        }
    # The page believes in the task (as from a stale list); the server refuses it.
    page.route(
        re.compile(r"/api/v1/tasks\?status=active&root=true$"),
        lambda route: route.fulfill(json={"tasks": [task]}),
    )
    subscribes = record_subscribes(page)
    register_through_form(page, server, "intruder")
    page.get_by_role("button", name=re.compile("Resume")).click()
    outcome = page.locator("#task-outcome [role=alert]")
    expect(outcome).to_contain_text("Cannot follow this task")
    expect(outcome).to_have_attribute("data-code", "not_found")
    expect(page.locator("#cancel-task")).to_be_hidden()

    # A reconnect does not send it again: once the next subscribe (a new analysis) is out,
    # any resubscribe would already have been seen.
    assert server.stop() == 0
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "reconnecting")
    server.start()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    start_analysis(page, "600519")
    expect(page.locator("#task-status")).to_have_text("Completed")
    assert [m["task_id"] for m in subscribes][0] == task["id"]
    assert [m["task_id"] for m in subscribes].count(task["id"]) == 1
    assert page_errors == []


def test_history_is_read_page_by_page(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """A short page with next_after_seq is followed by the next: the whole log, once."""
    expect = _expect()
    register_through_form(page, server, "paula")
    task = finished_external_task(server, page_token(page), steps=6)  # seqs 1..9
    asked: list[int] = []

    def short_pages(route: Route) -> None:
        # Like a server capping pages by bytes: two events a page, and where to go on.
        after = re.search(r"after_seq=(\d+)", route.request.url)
        assert after is not None
        asked.append(int(after[1]))
        answer = route.fetch().json()
        events = answer["events"]
        more = len(events) > 2
        answer = {"events": events[:2], "next_after_seq": events[1]["seq"] if more else None}
        route.fulfill(json=answer)

    page.route(re.compile(r"/api/v1/tasks/[^/]+/events\?"), short_pages)
    open_from_recent(page, task["id"])
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator("#step-log li[data-event=completed]")).to_be_visible()
    seqs = [seq for entry in log_entries(page) for seq in entry["seqs"]]
    assert seqs == list(range(1, 10))
    assert asked == [0, 2, 4, 6, 8]
    expect(page.locator("#step-log .log-gap")).to_have_count(0)
    assert page_errors == []


def test_trimmed_history_falls_back_to_the_task(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """Events that no longer start at after_seq + 1: the task is shown, marked with a gap."""
    expect = _expect()
    server = make_server(0.05, "--max-events-per-task", "3", "--retention-interval", "0.1")
    register_through_form(page, server, "trudy")
    token = page_token(page)
    task = finished_external_task(server, token, steps=6)  # seqs 1..9, 7..9 kept
    deadline = time.monotonic() + 15
    while (
        http(server, "GET", f"/tasks/{task['id']}/events?after_seq=0", token=token)["events"][0][
            "seq"
        ]
        == 1
    ):
        assert time.monotonic() < deadline, "retention did not trim the history"
        time.sleep(0.05)

    open_from_recent(page, task["id"])
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator("#step-log .log-gap")).to_have_text("Earlier steps are not shown.")
    expect(page.locator("#task-result")).to_contain_text('"rows": 6')
    assert log_entries(page) == []  # no rows 7..9 pretending to be the whole history
    assert page_errors == []


def test_logout_ends_the_session_on_the_server(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """Log out POSTs /auth/logout with the token, which stops working, then forgets it."""
    expect = _expect()
    register_through_form(page, server, "lou")
    token = page_token(page)
    with page.expect_response(re.compile(r"/api/v1/auth/logout$")) as answer:
        page.get_by_role("button", name="Log out").click()
    request = answer.value.request
    assert request.method == "POST"
    assert request.headers["authorization"] == f"Bearer {token}"
    assert answer.value.status == 204
    me = page.request.get(
        f"{server.url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert me.status == 401  # the session is over on the server, not only in the page
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#auth-message")).to_contain_text("logged out")
    assert page.evaluate("() => sessionStorage.getItem('progress.session')") is None
    assert page_errors == []


@pytest.mark.parametrize(
    ("status", "code"), [(401, "session_expired"), (429, "rate_limited")], ids=["401", "429"]
)
def test_revoked_session_shows_the_login_form(
    page: Page, server: ServerProcess, status: int, code: str, page_errors: list[str]
) -> None:
    """Sockets closed 4401 and no fresh token from refresh: the login form, no loop."""
    expect = _expect()
    register_through_form(page, server, "rita")
    sockets: list[str] = []
    refreshes: list[str] = []

    def revoked(ws: WebSocketRoute) -> None:
        # What a server does with a revoked session's socket: accept, then close 4401.
        sockets.append(ws.url)
        ws.close(code=4401, reason="session revoked")

    def refuse(route: Route) -> None:
        refreshes.append(route.request.url)
        error = {"code": code, "message": "no", "fields": {}}
        route.fulfill(status=status, json={"error": error})

    page.route_web_socket(re.compile(r"/api/v1/ws"), revoked)
    page.route(re.compile(r"/api/v1/auth/refresh$"), refuse)
    page.reload()
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#auth-message")).to_contain_text("session has expired")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "idle")
    # Closed for good: these counts are final.
    assert len(sockets) == 1
    assert len(refreshes) == 1
    assert page.evaluate("() => sessionStorage.getItem('progress.session')") is None
    assert page_errors == []


class _InlineFinder(html.parser.HTMLParser):
    """Collects what a CSP without 'unsafe-inline' refuses in an HTML file."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "style":
            self.found.append("<style>")
        if tag == "script" and "src" not in names:
            self._in_script = True
        self.found += [f"{tag} {name}=" for name in names if name == "style"]
        self.found += [f"{tag} {name}=" for name in names if name.startswith("on")]
        self.found += [
            f"{tag} {name}=javascript:"
            for name, value in attrs
            if (value or "").strip().lower().startswith("javascript:")
        ]

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.found.append("inline <script>")


def test_static_files_need_no_inline_code_or_style() -> None:
    """No inline script, <style>, style="" or on* attribute in static/; no style from JS text."""
    found: list[str] = []
    for file in sorted(STATIC.rglob("*.html")):
        finder = _InlineFinder()
        finder.feed(file.read_text())
        found += [f"{file.name}: {what}" for what in finder.found]
    # JS may set element.style properties (CSSOM); it must not parse style or code from text.
    banned = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
        r"|setAttribute\(\s*[\"']style|\.cssText|setAttribute\(\s*[\"']on"
    )
    for file in sorted(STATIC.rglob("*.js")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if banned.search(line):
                found.append(f"{file.name}:{n}: {line.strip()}")
    assert found == []


def test_page_works_under_the_content_security_policy(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """With the server's CSP on the page: log in, run an analysis, log out; no violation."""
    expect = _expect()
    server = make_server(0.05)

    def with_csp(route: Route) -> None:
        response = route.fetch()
        route.fulfill(
            response=response, headers={**response.headers, "content-security-policy": CSP}
        )

    page.route(re.compile(r"^" + re.escape(server.url) + r"/(\?.*)?$"), with_csp)
    page.add_init_script(
        """window.__csp = [];
        document.addEventListener('securitypolicyviolation',
          (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));"""
    )
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    register_through_form(page, server, "cspuser")
    applied = page.evaluate(
        "async () => (await fetch(location.href)).headers.get('content-security-policy')"
    )
    start_analysis(page, "600519")
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    width = page.locator("#task-progress .progress-fill").evaluate("el => el.style.width")
    page.get_by_role("button", name="Log out").click()
    expect(page.locator("#login-form")).to_be_visible()
    assert applied == CSP  # the policy was really in force
    assert width == "100%"  # set through the CSSOM, which the policy allows
    assert page.evaluate("() => window.__csp") == []
    assert [line for line in console if "Content Security Policy" in line] == []
    assert page_errors == []
