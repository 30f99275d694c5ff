"""Browser test fixtures: Debian's Chromium driven by Playwright, and a real server process.

Skipped (with the reason) where no Chromium or Playwright is installed, except in CI
(CI=true), where their absence is a failure: `.ci/run` installs both.
"""

from __future__ import annotations

import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..helpers import SECRET

try:
    from playwright.sync_api import (
        Browser,
        BrowserContext,
        Page,
        Playwright,
        Route,
        expect,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - only without the test extra
    sync_playwright = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "static"
HARNESS = Path(__file__).resolve().parent / "harness"
#: Where the tests write screenshots (gitignored; the README's copies live in docs/).
SCREENSHOTS = ROOT / "build" / "screenshots"
CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-proxy-server",
    # A document fulfilled through page.route (a test adding a response header) has no known
    # address space, so Chromium would block its requests to 127.0.0.1 as public → local.
    "--disable-features=LocalNetworkAccessChecks",
]
#: Playwright's default wait for expectations, in ms.
EXPECT_TIMEOUT_MS = 15_000
#: Seconds a server gets to start answering /healthz, and to exit after SIGTERM.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
#: A fake origin that serves static/ and the harness to the client unit tests.
HARNESS_ORIGIN = "http://client.test"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def _require_browser() -> None:
    missing = []
    if sync_playwright is None:
        missing.append("the playwright package (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    if not missing:
        return
    reason = "browser tests need " + " and ".join(missing)
    if _in_ci():
        pytest.fail(reason + "; CI must install them (.ci/run)", pytrace=False)
    pytest.skip(reason)


# Module scope, not session: while the sync API runs, its event loop counts as running in
# this thread, and pytest-asyncio cannot run the async tests of other modules.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    _require_browser()
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-GB")
    context.set_default_timeout(EXPECT_TIMEOUT_MS)
    yield context
    context.close()


@pytest.fixture
def page_errors() -> list[str]:
    """Uncaught exceptions in the page; tests check it stays empty."""
    return []


@pytest.fixture
def page(context: BrowserContext, page_errors: list[str]) -> Page:
    page = context.new_page()
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    return page


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


# -- the server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python run.py` on a port and database of its own; can be stopped and started again.

    `db` None: no --db (the caller passes --store, e.g. a PostgreSQL URL shared by nodes).
    """

    def __init__(self, db: Path | None, log_path: Path, step_delay: float, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = db
        self.log_path = log_path
        self.args = [
            sys.executable,
            str(ROOT / "run.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(["--db", str(db)] if db is not None else []),
            "--job-step-delay",
            str(step_delay),
            "--jwt-secret",
            SECRET,
            "--shutdown-timeout",
            "1",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.proc is None, "already running"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with opener.open(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` and wait for the process to exit; returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                return proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
        return proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start servers (each on its own port and database); all are stopped at teardown."""
    servers: list[ServerProcess] = []

    def make(step_delay: float = 0.3, *extra: str) -> ServerProcess:
        n = len(servers)
        server = ServerProcess(
            tmp_path / f"app{n}.db", tmp_path / f"server{n}.log", step_delay, *extra
        )
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ServerProcess]) -> ServerProcess:
    return make_server()


# -- the client harness ----------------------------------------------------------------------


def _serve_harness(route: Route) -> None:
    path = route.request.url.removeprefix(HARNESS_ORIGIN).split("?", 1)[0]
    if path.startswith("/static/"):
        file = STATIC / path.removeprefix("/static/")
    elif path.startswith("/harness/"):
        file = HARNESS / (path.removeprefix("/harness/") or "index.html")
    else:
        file = Path("/nonexistent")
    if not file.is_file():
        route.fulfill(status=404, body="not found")
        return
    content_type = "text/javascript" if file.suffix == ".js" else mimetypes.guess_type(file)[0]
    route.fulfill(status=200, body=file.read_bytes(), content_type=content_type or "text/plain")


@pytest.fixture
def harness(page: Page) -> Page:
    """A page that has imported ws-client.js and the fakes (window.wsc, makeClient, …)."""
    page.route(f"{HARNESS_ORIGIN}/**", _serve_harness)
    page.goto(f"{HARNESS_ORIGIN}/harness/index.html")
    page.wait_for_function("window.harnessReady === true")
    return page
