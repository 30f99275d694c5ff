"""The page under its Content-Security-Policy, in Chromium against a real run.py: nothing
it does (log in, analyse, show the report) is blocked."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..helpers import PASSWORD

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page

    from .conftest import ServerProcess

#: Records every CSP violation the page reports, before any of its scripts run.
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation', (e) => {
  window.__cspViolations.push(
    `${e.violatedDirective} ${e.blockedURI} ${e.sourceFile}:${e.lineNumber}`);
});
"""


def test_page_works_under_its_content_security_policy(
    page: Page, server: ServerProcess, page_errors: list[str]
) -> None:
    """Register, log out, log in, run an analysis to its report: no CSP violation at all."""
    from playwright.sync_api import expect

    console: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type in ("error", "warning"):
            console.append(msg.text)

    page.on("console", on_console)
    page.add_init_script(RECORD_VIOLATIONS)
    response = page.goto(server.url + "/")
    assert response is not None and response.status == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "style-src 'self'" in policy
    assert response.headers["x-frame-options"] == "DENY"

    page.get_by_role("button", name="Register").click()
    form = page.locator("#register-form")
    form.locator("input[name=username]").fill("csp-user")
    form.locator("input[name=password]").fill(PASSWORD)
    form.get_by_role("button", name="Create account").click()
    expect(page.locator("#user-name")).to_have_text("csp-user")
    page.get_by_role("button", name="Log out").click()
    login = page.locator("#login-form")
    login.locator("input[name=username]").fill("csp-user")
    login.locator("input[name=password]").fill(PASSWORD)
    login.get_by_role("button", name="Log in").click()
    expect(page.locator("#connection-status")).to_have_attribute("data-state", "open")

    page.locator("input[name=code]").fill("600519")
    page.get_by_role("button", name="Analyze").click()
    expect(page.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "100")
    expect(page.locator("#task-status")).to_have_text("Completed")
    expect(page.locator("#task-result")).to_be_visible()
    # The bar's width is set from script (CSSOM, allowed), not by an inline style attribute.
    width = page.locator("#task-progress .progress-fill").evaluate("e => e.style.width")
    assert width == "100%"

    assert page.evaluate("() => window.__cspViolations") == []
    assert [m for m in console if "Content Security Policy" in m] == []
    assert page_errors == []
