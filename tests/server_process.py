"""The real server as a subprocess: start, wait for /healthz, kill, stop, restart.

`ServerProcess` runs `python run.py` with the current interpreter on a fixed port and
database file, so a restart finds the same file at the same address. Output goes to a
log file (not a pipe: a full pipe would block the server); `output()` reads it back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_PY = PROJECT_ROOT / "run.py"
#: Bound on waiting for the server to answer /healthz, in seconds.
START_TIMEOUT = 15.0
#: Bound on waiting for the process to exit after a signal, in seconds.
EXIT_TIMEOUT = 10.0
#: Environment variables the server reads; removed so the caller's shell cannot leak in.
SERVER_ENV_PREFIXES = ("PROGRESS_", "JWT_SECRET")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without the server's own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVER_ENV_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class ServerProcess:
    """One server on `port`; `args` (besides --host/--port/--db) are kept across restarts."""

    def __init__(
        self,
        log_dir: Path,
        port: int,
        db_path: Path | None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        pass_port: bool = True,
    ) -> None:
        self.port = port
        self.db_path = db_path
        self.args = list(args)
        self.env = dict(env or {})
        self.pass_port = pass_port
        self.log_dir = log_dir
        self.proc: subprocess.Popen[bytes] | None = None
        #: One log file per start: server-0.log, server-1.log, ...
        self.logs: list[Path] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def command(self, args: Sequence[str] | None = None) -> list[str]:
        cmd = [sys.executable, str(RUN_PY), "--host", "127.0.0.1"]
        if self.pass_port:
            cmd += ["--port", str(self.port)]
        if self.db_path is not None:
            cmd += ["--db", str(self.db_path)]
        return cmd + list(self.args if args is None else args)

    def spawn(self, args: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it to be ready."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        log_path = self.log_dir / f"server-{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(args),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.log_dir,
                env=clean_env(self.env),
            )
        return self.proc

    async def start(self, args: Sequence[str] | None = None) -> None:
        """Start and wait until GET /healthz answers 200 (fails if the process exits)."""
        proc = self.spawn(args)
        async with aiohttp.ClientSession() as session:
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    while True:
                        if proc.poll() is not None:
                            raise AssertionError(
                                f"server exited with {proc.returncode}:\n{self.output()}"
                            )
                        try:
                            async with session.get(f"{self.base_url}/healthz") as resp:
                                if resp.status == 200:
                                    return
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.05)
            except TimeoutError:
                self.kill()
                raise AssertionError(f"server not ready in time:\n{self.output()}") from None

    async def restart(self, args: Sequence[str] | None = None) -> None:
        """SIGKILL (if running), then start again on the same port and database file."""
        await self.kill_and_wait()
        await self.start(args)

    def kill(self) -> None:
        """SIGKILL without waiting (safe to call when not running)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()

    async def kill_and_wait(self) -> None:
        self.kill()
        await self.wait()

    async def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code, waiting at most `timeout` seconds (then SIGKILL and fail)."""
        assert self.proc is not None
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit in {timeout} s:\n{self.output()}") from None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None and self.proc.poll() is None, "server not running"
        self.proc.send_signal(sig)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Graceful stop by `sig`; returns the exit code."""
        self.send_signal(sig)
        return await self.wait()

    def output(self, which: int = -1) -> str:
        """stdout and stderr of a start (default: the latest)."""
        if not self.logs:
            return ""
        return self.logs[which].read_text(encoding="utf-8", errors="replace")

    def all_output(self) -> str:
        return "".join(path.read_text(encoding="utf-8", errors="replace") for path in self.logs)

    def close(self) -> None:
        """Finalizer: make sure no process outlives the test."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=EXIT_TIMEOUT)


async def api(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None = None,
    *,
    expect: int = 200,
    **kwargs: Any,
) -> Any:
    """One HTTP call; asserts the status and returns the JSON body."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers, **kwargs) as resp:
        body = await resp.json(content_type=None)
        assert resp.status == expect, (resp.status, body)
        return body
