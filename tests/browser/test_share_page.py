"""The Share button and the read-only shared view, in Chromium against a real run.py.

The owner's task is an external one that the test drives over HTTP, so "the viewer sees the
task move" is checked step by step, not raced against a job's timer.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .conftest import EXPECT_TIMEOUT_MS
from .readability import overflow_px, unreadable
from .test_csp import RECORD_VIOLATIONS
from .test_page import (
    finished_external_task,
    http,
    log_entries,
    open_from_recent,
    page_token,
    record_subscribes,
    register_over_http,
    register_through_form,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, WebSocket

    from .conftest import ServerProcess

ENDED = "This link has expired or was revoked"
#: A share link as the page hands it out: this origin, the token in the fragment.
LINK = re.compile(
    r"^(?P<origin>http://[^/]+)/#task=(?P<task>[0-9a-f]+)&share=(?P<token>st_[\w-]+)$"
)
#: Refuses every clipboard write, as a browser without the permission does.
REFUSE_CLIPBOARD = """
const refuse = () => Promise.reject(new DOMException("denied", "NotAllowedError"));
navigator.clipboard.write = refuse;
navigator.clipboard.writeText = refuse;
"""
#: No clipboard API at all, as on a page served over plain http from another host.
NO_CLIPBOARD = "Object.defineProperty(navigator, 'clipboard', { value: undefined });"


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def status_of(server: ServerProcess, path: str, token: str) -> int:
    """The HTTP status of a GET with this token."""
    request = urllib.request.Request(
        f"{server.url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def post(server: ServerProcess, token: str, task_id: str, action: str, body: Any) -> None:
    http(server, "POST", f"/tasks/{task_id}/{action}", body, token)


def allow_clipboard(context: BrowserContext, server: ServerProcess) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)


def owner_shows_new_task(page: Page, server: ServerProcess, name: str) -> tuple[str, str]:
    """Register through the page, create an external task over HTTP and show it; returns
    (the owner's token, the task id)."""
    register_through_form(page, server, name)
    token = page_token(page)
    task = http(server, "POST", "/tasks", {"kind": "import", "params": {"file": "a.csv"}}, token)
    open_from_recent(page, task["id"])
    _expect()(page.locator("#task-status")).to_have_text("Pending")
    return token, str(task["id"])


def share_through_page(page: Page) -> str:
    """Click Share and return the link the page copied."""
    page.get_by_role("button", name="Share", exact=True).click()
    _expect()(page.locator("#share-status")).to_contain_text("Link copied")
    return str(page.evaluate("() => navigator.clipboard.readText()"))


def share_over_http(server: ServerProcess, token: str, task_id: str, ttl_s: int = 3600) -> str:
    return str(http(server, "POST", f"/tasks/{task_id}/share", {"ttl_s": ttl_s}, token)["url"])


@pytest.fixture
def open_viewer(
    browser: Browser, page_errors: list[str]
) -> Iterator[Callable[..., tuple[Page, list[WebSocket]]]]:
    """Pages in browser contexts of their own (no storage shared with the owner's): a
    stranger who got the link. Returns the page and the WebSockets it opens."""
    contexts: list[BrowserContext] = []

    def make(**options: Any) -> tuple[Page, list[WebSocket]]:
        context = browser.new_context(
            **{"viewport": {"width": 1280, "height": 900}, "locale": "en-GB", **options}
        )
        context.set_default_timeout(EXPECT_TIMEOUT_MS)
        contexts.append(context)
        viewer = context.new_page()
        viewer.on("pageerror", lambda exc: page_errors.append(f"viewer: {exc}"))
        viewer.add_init_script(RECORD_VIOLATIONS)
        sockets: list[WebSocket] = []
        viewer.on("websocket", lambda ws: sockets.append(ws))
        return viewer, sockets

    yield make
    for context in contexts:
        context.close()


def assert_read_only(viewer: Page) -> None:
    """The shared view: its label, and nothing that logs in, creates, shares or cancels."""
    expect = _expect()
    expect(viewer.locator("#shared-label")).to_have_text("Shared view (read-only)")
    for name in ("Log in", "Register", "Analyze", "Share", "Stop sharing", "Cancel", "Log out"):
        expect(viewer.get_by_role("button", name=name, exact=True)).to_have_count(0)
    for hidden in ("#auth-view", "#new-card", "#recent-card", "#keys-panel", "#user-box"):
        expect(viewer.locator(hidden)).to_be_hidden()
    assert viewer.evaluate("() => sessionStorage.getItem('progress.session')") is None


def test_share_link_shows_the_task_live_without_logging_in(
    page: Page,
    context: BrowserContext,
    make_server: Callable[..., ServerProcess],
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Share copies a link; a stranger opens it and sees every update live, to the end."""
    expect = _expect()
    server = make_server(0.05)
    allow_clipboard(context, server)
    owner, task_id = owner_shows_new_task(page, server, "olive")
    link = share_through_page(page)
    status = page.locator("#share-status")
    expect(status).to_contain_text("Anyone with it can watch this task until")
    match = LINK.match(link)
    assert match, link
    assert (match["origin"], match["task"]) == (server.url, task_id)
    token = match["token"]
    # The expiry, a day from now, in the page's locale.
    tomorrow = page.evaluate(
        "() => new Date(Date.now() + 86400e3).toLocaleDateString([], {dateStyle: 'medium'})"
    )
    expect(status).to_contain_text(tomorrow)

    viewer, sockets = open_viewer()
    requests: list[tuple[str, str | None]] = []
    viewer.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))
    viewer.goto(link)
    expect(viewer.locator("#connection-status")).to_have_attribute("data-state", "open")
    expect(viewer.locator("#task-status")).to_have_text("Pending")
    assert_read_only(viewer)
    # The token left the address bar (and this history entry); the task id stays.
    assert viewer.url == f"{server.url}/#task={task_id}"

    bar = viewer.get_by_role("progressbar")
    post(server, owner, task_id, "progress", {"progress": 30, "step": "parse", "message": "a"})
    expect(bar).to_have_attribute("aria-valuenow", "30")
    expect(viewer.locator("#task-step")).to_have_text("Parse")
    post(server, owner, task_id, "progress", {"progress": 60, "step": "load", "message": "b"})
    expect(bar).to_have_attribute("aria-valuenow", "60")
    expect(viewer.locator("#task-message")).to_have_text("b")
    viewer.screenshot(path=screenshots / "shared-view.png", full_page=True, animations="disabled")
    post(server, owner, task_id, "complete", {"result": {"rows": 5000}})
    expect(viewer.locator("#task-status")).to_have_text("Completed")
    expect(bar).to_have_attribute("aria-valuenow", "100")
    expect(viewer.locator("#task-result")).to_contain_text('"rows": 5000')

    entries = log_entries(viewer)
    assert [seq for e in entries for seq in e["seqs"]] == [1, 2, 3, 4, 5]
    events = [e["event"] for e in entries]
    assert events == ["created", "started", "progress", "progress", "completed"]
    # The token went in the Authorization header of HTTP calls and as ?token= of the
    # socket (browsers cannot set its headers); never in the URL of a page or a fetch.
    assert [url for url, _ in requests if token in url] == []
    reads = [auth for url, auth in requests if "/api/v1/tasks/" in url]
    assert reads and set(reads) == {f"Bearer {token}"}
    assert [ws.url.split("?")[0] for ws in sockets] == [f"ws://127.0.0.1:{server.port}/api/v1/ws"]
    assert all(f"token={token}" in ws.url for ws in sockets)
    assert viewer.evaluate("() => window.__cspViolations") == []
    assert page_errors == []


def test_shared_view_resumes_after_a_reload_and_a_server_restart(
    make_server: Callable[..., ServerProcess],
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    page_errors: list[str],
) -> None:
    """Reload and restart: the shared view resubscribes from its last seq, nothing twice."""
    expect = _expect()
    server = make_server(0.05)
    owner = register_over_http(server, "rhea")
    task_id = http(server, "POST", "/tasks", {"kind": "render", "params": {}}, owner)["id"]
    link = share_over_http(server, owner, task_id)
    viewer, _ = open_viewer()
    subscribes = record_subscribes(viewer)
    viewer.goto(link)
    status = viewer.locator("#connection-status")
    bar = viewer.get_by_role("progressbar")
    expect(status).to_have_attribute("data-state", "open")
    post(server, owner, task_id, "progress", {"progress": 20, "step": "one"})
    expect(bar).to_have_attribute("aria-valuenow", "20")

    # A reload finds the token again in this tab's storage (it is no longer in the URL).
    viewer.reload()
    expect(status).to_have_attribute("data-state", "open")
    expect(bar).to_have_attribute("aria-valuenow", "20")
    assert_read_only(viewer)
    assert subscribes[-1]["last_seq"] == 3  # created, started, progress: only what is new

    assert server.stop() == 0
    expect(status).to_have_attribute("data-state", "reconnecting")
    server.start()  # same port and database: the share token is still valid
    expect(status).to_have_attribute("data-state", "open")
    post(server, owner, task_id, "progress", {"progress": 70, "step": "two"})
    expect(bar).to_have_attribute("aria-valuenow", "70")
    post(server, owner, task_id, "complete", {"result": {}})
    expect(viewer.locator("#task-status")).to_have_text("Completed")

    assert [seq for e in log_entries(viewer) for seq in e["seqs"]] == [1, 2, 3, 4, 5]
    assert [m.get("last_seq") for m in subscribes] == [0, 3, 3]
    assert viewer.evaluate("() => window.__cspViolations") == []
    assert page_errors == []


def test_stop_sharing_ends_the_shared_view(
    page: Page,
    context: BrowserContext,
    make_server: Callable[..., ServerProcess],
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """Stop sharing: the open view says the link was revoked and stops; a new Share works."""
    expect = _expect()
    server = make_server(0.05)
    allow_clipboard(context, server)
    owner, task_id = owner_shows_new_task(page, server, "stan")
    post(server, owner, task_id, "progress", {"progress": 10, "step": "one"})
    link = share_through_page(page)
    token = LINK.match(link)["token"]  # type: ignore[index]
    viewer, sockets = open_viewer()
    viewer.goto(link)
    expect(viewer.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "10")
    expect(viewer.locator("#connection-status")).to_have_attribute("data-state", "open")

    page.get_by_role("button", name="Stop sharing").click()
    expect(page.locator("#share-status")).to_have_text(
        "Sharing stopped: links to this task no longer work."
    )
    ended = viewer.locator("#shared-ended")
    expect(ended).to_contain_text(ENDED)
    expect(ended).to_have_attribute("role", "alert")
    status = viewer.locator("#connection-status")
    expect(status).to_have_attribute("data-state", "closed")
    expect(status).to_contain_text("Link no longer valid")
    expect(viewer.get_by_role("button", name="Retry now")).to_be_hidden()
    # What it had shown stays, under the message.
    expect(viewer.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "10")
    viewer.screenshot(path=screenshots / "shared-revoked.png", animations="disabled")
    # Closed for good (the client stopped, kind auth): one socket, none after it.
    assert len(sockets) == 1
    assert status_of(server, f"/tasks/{task_id}", token) == 401

    # Opened again, the dead link says so at once and opens no socket.
    viewer.reload()
    expect(ended).to_contain_text(ENDED)
    expect(viewer.locator("#task-card")).to_be_hidden()
    assert_read_only(viewer)
    assert len(sockets) == 1

    # Sharing again makes a new link (not the revoked one again), which works.
    second = share_through_page(page)
    assert second != link and LINK.match(second)
    again, _ = open_viewer()
    again.goto(second)
    expect(again.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "10")
    expect(again.locator("#shared-ended")).to_be_hidden()
    assert viewer.evaluate("() => window.__cspViolations") == []
    assert page_errors == []


@pytest.mark.parametrize("link", ["expired", "unknown"])
def test_a_dead_link_says_so_without_retrying(
    server: ServerProcess,
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    link: str,
    page_errors: list[str],
) -> None:
    """An expired or unknown share token: the message, no login form, no socket."""
    expect = _expect()
    owner = register_over_http(server, "ulla")
    task_id = http(server, "POST", "/tasks", {"kind": "import", "params": {}}, owner)["id"]
    if link == "expired":
        url = share_over_http(server, owner, task_id, ttl_s=1)
        token = LINK.match(url)["token"]  # type: ignore[index]
        deadline = time.monotonic() + 15
        while status_of(server, f"/tasks/{task_id}", token) != 401:
            assert time.monotonic() < deadline, "the share token did not expire"
            time.sleep(0.1)
    else:
        url = f"{server.url}/#task={task_id}&share=st_0123456789abcdef_{'A' * 43}"
    viewer, sockets = open_viewer()
    viewer.goto(url)
    expect(viewer.locator("#shared-ended")).to_contain_text(ENDED)
    expect(viewer.locator("#connection-status")).to_contain_text("Link no longer valid")
    assert_read_only(viewer)
    expect(viewer.locator("#task-card")).to_be_hidden()
    assert sockets == []
    assert page_errors == []


@pytest.mark.parametrize("clipboard", ["refused", "absent"])
def test_refused_clipboard_shows_the_link_selected(
    page: Page,
    make_server: Callable[..., ServerProcess],
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    clipboard: str,
    page_errors: list[str],
) -> None:
    """No clipboard: the link is shown focused and selected in a read-only input, and works."""
    expect = _expect()
    server = make_server(0.05)
    page.add_init_script(REFUSE_CLIPBOARD if clipboard == "refused" else NO_CLIPBOARD)
    owner, task_id = owner_shows_new_task(page, server, "cleo")
    page.get_by_role("button", name="Share", exact=True).click()
    field = page.get_by_label("Share link")
    expect(field).to_be_visible()
    expect(field).to_be_focused()
    expect(field).to_have_attribute("readonly", "")
    expect(page.locator("#share-status")).to_contain_text("did not let the page copy the link")
    link = field.input_value()
    assert LINK.match(link), link
    selected = field.evaluate("el => [el.selectionStart, el.selectionEnd]")
    assert selected == [0, len(link)]

    # Share again: the same link, not a new token each click.
    page.get_by_role("button", name="Share", exact=True).click()
    expect(field).to_be_focused()
    assert field.input_value() == link

    viewer, _ = open_viewer()
    viewer.goto(link)
    expect(viewer.locator("#task-status")).to_have_text("Pending")
    assert_read_only(viewer)
    assert page_errors == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_shared_view_reads_well_on_a_phone(
    server: ServerProcess,
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    scheme: str,
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """At 390 px, light and dark: nothing wider than the screen, every text legible."""
    expect = _expect()
    owner = register_over_http(server, "pia")
    task_id = http(server, "POST", "/tasks", {"kind": "import", "params": {}}, owner)["id"]
    post(server, owner, task_id, "progress", {"progress": 45, "step": "parse", "message": "ok"})
    link = share_over_http(server, owner, task_id)
    viewer, _ = open_viewer(viewport={"width": 390, "height": 844}, color_scheme=scheme)
    viewer.goto(link)
    expect(viewer.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "45")
    # The bar can show 45 from GET /tasks/{id} before the replay has filled the log.
    expect(viewer.locator("#step-log li[data-step=parse]")).to_be_visible()
    texts = ["#shared-label", "#task-title", "#task-percent", "#task-step", ".log-label"]
    assert unreadable(viewer, texts) == []
    assert overflow_px(viewer) <= 0
    viewer.screenshot(
        path=screenshots / f"shared-phone-{scheme}.png", full_page=True, animations="disabled"
    )

    http_delete = urllib.request.Request(
        f"{server.url}/api/v1/tasks/{task_id}/share",
        headers={"Authorization": f"Bearer {owner}"},
        method="DELETE",
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(http_delete) as resp:
        assert resp.status == 204
    expect(viewer.locator("#shared-ended")).to_contain_text(ENDED)
    assert unreadable(viewer, ["#shared-ended", "#connection-text"]) == []
    assert overflow_px(viewer) <= 0
    assert page_errors == []


def test_a_link_pasted_into_a_logged_in_tab_opens_the_shared_view(
    page: Page, make_server: Callable[..., ServerProcess], page_errors: list[str]
) -> None:
    """Only the fragment changes (no load): the page reloads into the shared view; "/" after
    it is the owner's page again, still logged in."""
    expect = _expect()
    server = make_server(0.05)
    owner, task_id = owner_shows_new_task(page, server, "tom")
    link = share_over_http(server, owner, task_id)
    page.evaluate("(link) => { location.href = link; }", link)  # as if typed in the bar
    expect(page.locator("#shared-label")).to_be_visible()
    expect(page.locator("#task-status")).to_have_text("Pending")
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")
    for name in ("Analyze", "Share", "Cancel", "Log out"):
        expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
    assert page.url == f"{server.url}/#task={task_id}"

    page.goto(server.url + "/")
    expect(page.locator("#user-name")).to_have_text("tom")
    expect(page.locator("#shared-label")).to_be_hidden()
    expect(page.get_by_role("button", name="Analyze")).to_be_visible()
    assert page_errors == []


def test_a_finished_task_is_read_over_http_with_the_share_token(
    server: ServerProcess,
    open_viewer: Callable[..., tuple[Page, list[WebSocket]]],
    page_errors: list[str],
) -> None:
    """A link to a finished task: its whole history and result, read with the share token."""
    expect = _expect()
    owner = register_over_http(server, "fay")
    task = finished_external_task(server, owner, steps=3)  # seqs 1..6
    link = share_over_http(server, owner, task["id"])
    token = LINK.match(link)["token"]  # type: ignore[index]
    viewer, _ = open_viewer()
    reads: list[str | None] = []
    viewer.on(
        "request",
        lambda r: reads.append(r.headers.get("authorization")) if "/events?" in r.url else None,
    )
    viewer.goto(link)
    expect(viewer.locator("#task-status")).to_have_text("Completed")
    expect(viewer.locator("#step-log li[data-event=completed]")).to_be_visible()
    expect(viewer.locator("#task-result")).to_contain_text('"rows": 3')
    assert [seq for e in log_entries(viewer) for seq in e["seqs"]] == [1, 2, 3, 4, 5, 6]
    assert reads and set(reads) == {f"Bearer {token}"}
    assert_read_only(viewer)
    assert page_errors == []
