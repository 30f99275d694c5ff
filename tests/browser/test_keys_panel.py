"""The "API keys" panel, in Chromium against a real run.py; the keys it makes are then used
the way a worker would, with an aiohttp client."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from .conftest import EXPECT_TIMEOUT_MS
from .readability import overflow_px, unreadable
from .test_csp import RECORD_VIOLATIONS
from .test_page import http, page_token, register_through_form

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Dialog, Page

    from .conftest import ServerProcess

#: `pk_<id>_<secret>` (docs/protocol.md, "API keys").
KEY = re.compile(r"^pk_[0-9a-f]+_[\w-]{40,}$")
NO_CLIPBOARD = "Object.defineProperty(navigator, 'clipboard', { value: undefined });"


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def call_with_key(
    server: ServerProcess, method: str, path: str, key: str, body: Any = None
) -> tuple[int, Any]:
    """One request with `Authorization: Bearer <key>`, as a worker's aiohttp client sends it.

    Run on a thread of its own: Playwright's sync API keeps an event loop running in this one.
    """

    async def call() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.request(
                method,
                f"{server.url}/api/v1{path}",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                return resp.status, await resp.json(content_type=None)

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, call()).result(timeout=30)


def create_key(page: Page, name: str, *, read: bool = True, write: bool = True) -> str:
    """Fill in the form and create a key; returns the key the panel shows."""
    panel = page.locator("#keys-panel")
    panel.get_by_label("Name").fill(name)
    panel.get_by_role("checkbox", name="tasks:read").set_checked(read)
    panel.get_by_role("checkbox", name="tasks:write").set_checked(write)
    panel.get_by_role("button", name="Create key").click()
    value = page.locator("#new-key-value")
    _expect()(value).to_have_value(KEY)
    # Shown exactly as it is (a copied-by-eye key must work): no case change by CSS.
    assert value.evaluate("el => getComputedStyle(el).textTransform") == "none"
    return value.input_value()


def everything_on(page: Page) -> str:
    """The page's markup and the values of its inputs (which the markup does not hold)."""
    values = page.locator("input").evaluate_all("els => els.map(e => e.value)")
    return page.content() + "\n".join(values)


def key_rows(page: Page) -> list[dict[str, Any]]:
    """The listed keys as the cells show them."""
    return page.locator("#keys-list tr").evaluate_all(
        """rows => rows.map(r => ({
             name: r.querySelector('th').textContent,
             scopes: [...r.querySelectorAll('.scope-list code')].map(c => c.textContent),
             created: r.cells[2].textContent,
             lastUsed: r.querySelector('.key-last-used').textContent,
           }))"""
    )


def test_create_list_use_and_revoke_a_key(
    page: Page,
    context: BrowserContext,
    server: ServerProcess,
    page_errors: list[str],
) -> None:
    """A key is shown once, copied, listed, works within its scope, and stops when revoked."""
    expect = _expect()
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.add_init_script(RECORD_VIOLATIONS)
    register_through_form(page, server, "kim")
    panel = page.locator("#keys-panel")
    expect(panel.get_by_role("heading", name="API keys")).to_be_visible()
    expect(page.locator("#keys-empty")).to_have_text("No API keys yet.")

    key = create_key(page, "render workers", read=False, write=True)
    fresh = page.locator("#new-key")
    expect(fresh).to_contain_text("it will not be shown again")
    expect(page.locator("#new-key-title")).to_have_text("New key “render workers”")
    expect(page.locator("#new-key-title")).to_be_focused()
    panel.get_by_role("button", name="Copy the key").click()
    expect(page.locator("#copy-key-status")).to_have_text("Key copied to the clipboard.")
    assert page.evaluate("() => navigator.clipboard.readText()") == key

    expect(page.locator("#keys-list tr")).to_have_count(1)
    [row] = key_rows(page)
    assert row["name"] == "render workers"
    assert row["scopes"] == ["tasks:write"]
    assert row["created"] and row["lastUsed"] == "Never"

    # The key works as a worker uses it, within its one scope.
    status, task = call_with_key(server, "POST", "/tasks", key, {"kind": "import"})
    assert status == 201 and task["kind"] == "import"
    status, answer = call_with_key(server, "GET", f"/tasks/{task['id']}", key)
    assert (status, answer["error"]["code"]) == (403, "insufficient_scope")
    panel.get_by_role("button", name="Reload the API keys").click()
    expect(page.locator(".key-last-used time")).to_have_count(1)  # "Never" no more

    # Shown once: hidden, it is gone from the page, and a reload does not bring it back.
    panel.get_by_role("button", name="Done, hide it").click()
    expect(fresh).to_be_hidden()
    expect(page.locator("#key-name")).to_be_focused()
    assert key not in everything_on(page)
    page.reload()
    expect(page.locator("#keys-list tr")).to_have_count(1)
    assert key not in everything_on(page)
    assert key not in page.evaluate("() => JSON.stringify({...sessionStorage, ...localStorage})")

    # Revoke asks first: dismissed, nothing happens; accepted, the key stops working.
    asked: list[str] = []

    def answer_with(accept: bool) -> Callable[[Dialog], None]:
        def answer(dialog: Dialog) -> None:
            asked.append(dialog.message)
            if accept:
                dialog.accept()
            else:
                dialog.dismiss()

        return answer

    revoke = panel.get_by_role("button", name="Revoke the key render workers")
    page.once("dialog", answer_with(False))
    revoke.click()
    assert len(asked) == 1 and "render workers" in asked[0]
    expect(page.locator("#keys-list tr")).to_have_count(1)
    assert call_with_key(server, "POST", "/tasks", key, {"kind": "import"})[0] == 201

    page.once("dialog", answer_with(True))
    revoke.click()
    expect(page.locator("#keys-list tr")).to_have_count(0)
    expect(page.locator("#keys-empty")).to_be_visible()
    expect(page.locator("#keys-title")).to_be_focused()
    status, answer = call_with_key(server, "POST", "/tasks", key, {"kind": "import"})
    assert (status, answer["error"]["code"]) == (401, "invalid_token")
    assert http(server, "GET", "/api-keys", token=page_token(page)) == {"api_keys": []}
    assert page.evaluate("() => window.__cspViolations") == []
    assert page_errors == []


def test_log_out_takes_a_new_key_off_the_screen(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """Logging out while a new key is shown removes it and the list from the page."""
    expect = _expect()
    register_through_form(page, server, "lea")
    key = create_key(page, "cron")
    page.get_by_role("button", name="Log out").click()
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#new-key")).to_be_hidden()
    assert page.locator("#new-key-value").input_value() == ""
    expect(page.locator("#keys-list tr")).to_have_count(0)
    assert key not in everything_on(page)
    assert page_errors == []


def test_keyboard_only_with_form_checks_and_no_clipboard(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """Keyboard alone: refused without name or scope (nothing posted), then a write-only key;
    without a clipboard the key is left selected to copy by hand."""
    expect = _expect()
    page.add_init_script(NO_CLIPBOARD)
    posts: list[str] = []
    page.on(
        "request",
        lambda r: posts.append(r.url) if r.method == "POST" and "/api-keys" in r.url else None,
    )
    register_through_form(page, server, "kai")
    name = page.locator("#key-name")
    error = page.locator("#key-error")

    name.focus()
    page.keyboard.press("Enter")  # submits the form: no name yet
    expect(error).to_have_text("Give the key a name, e.g. the program that will use it.")
    expect(name).to_have_attribute("aria-invalid", "true")
    expect(name).to_be_focused()

    page.keyboard.type("nightly export")
    expect(error).to_be_hidden()
    page.keyboard.press("Tab")
    expect(page.get_by_role("checkbox", name="tasks:read")).to_be_focused()
    page.keyboard.press("Space")
    page.keyboard.press("Tab")
    page.keyboard.press("Space")  # both unchecked now
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Create key")).to_be_focused()
    page.keyboard.press("Enter")
    expect(error).to_have_text("Choose at least one scope.")
    assert posts == []

    expect(page.get_by_role("checkbox", name="tasks:read")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.press("Space")  # tasks:write on again
    expect(page.get_by_role("checkbox", name="tasks:write")).to_be_checked()
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    value = page.locator("#new-key-value")
    expect(value).to_have_value(KEY)
    assert len(posts) == 1
    [listed] = http(server, "GET", "/api-keys", token=page_token(page))["api_keys"]
    assert (listed["name"], listed["scopes"]) == ("nightly export", ["tasks:write"])

    page.keyboard.press("Tab")  # from the new key's heading to its value, then Copy
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Copy the key")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#copy-key-status")).to_contain_text("the key is selected")
    expect(value).to_be_focused()
    key = value.input_value()
    assert value.evaluate("el => [el.selectionStart, el.selectionEnd]") == [0, len(key)]
    assert page_errors == []


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_keys_panel_reads_well_on_a_phone(
    browser: Browser,
    server: ServerProcess,
    scheme: str,
    screenshots: Path,
    page_errors: list[str],
) -> None:
    """At 390 px, light and dark: the panel fits the screen and every text is legible."""
    expect = _expect()
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, locale="en-GB", color_scheme=scheme
    )
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: page_errors.append(str(exc)))
        register_through_form(page, server, f"pat-{scheme}")
        create_key(page, "a worker with a rather long descriptive name", read=True, write=True)
        expect(page.locator("#keys-list tr")).to_have_count(1)
        page.locator("#keys-panel").scroll_into_view_if_needed()
        assert overflow_px(page) <= 0
        texts = [
            "#keys-title",
            ".keys-intro",
            "#key-form label",
            ".scopes legend",
            "#new-key-title",
            ".new-key-warning",
            "#new-key-value",
            "#keys-list th",
            "#keys-list td time",
            ".key-last-used span",
            ".scope-list code",
            "#keys-list button",
            "#key-form button",
        ]
        assert unreadable(page, texts) == []
        page.locator("#keys-panel").screenshot(
            path=screenshots / f"keys-phone-{scheme}.png", animations="disabled"
        )
    finally:
        context.close()
    assert page_errors == []
