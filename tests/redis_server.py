"""A real redis-server for tests: start, kill -9, stop, restart on the same port, pause.

`RedisServer(dir, port)` runs Debian's `redis-server` on 127.0.0.1 with no persistence
(`--save "" --appendonly no`) and its files in `dir`; `url` is the same across restarts,
so clients reconnect to "the same Redis". Use the `redis_server` fixture, or
`running_redis(dir, port)` for one per node-set or per session:

    from tests.redis_server import RedisServer, running_redis

    @pytest.fixture
    def redis(tmp_path, unused_tcp_port_factory):
        with running_redis(tmp_path / "redis", unused_tcp_port_factory()) as server:
            yield server

Without the binary the test is skipped, or fails when CI=true (CI must run them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

#: Where Debian installs it; PATH is searched too.
REDIS_SERVER = "/usr/bin/redis-server"
#: Bound on waiting for the server to answer PING after a start, in seconds.
START_TIMEOUT = 10.0
#: Bound on waiting for the process to exit after a signal, in seconds.
EXIT_TIMEOUT = 10.0


def find_redis_binary() -> str | None:
    """The redis-server path (PATH first, then Debian's), or None when it is missing."""
    return shutil.which("redis-server") or (
        REDIS_SERVER if os.access(REDIS_SERVER, os.X_OK) else None
    )


def redis_binary() -> str:
    """The redis-server path; skips the test when it is missing (fails when CI=true)."""
    found = find_redis_binary()
    if found is None:
        reason = "redis-server is not installed (apt-get install redis-server)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server on 127.0.0.1:`port`, files in `dir`; restartable on that port."""

    def __init__(self, dir: Path, port: int, binary: str | None = None) -> None:
        self.dir = dir
        self.port = port
        self.binary = binary or redis_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        #: One log file per start: redis-0.log, redis-1.log, ...
        self.logs: list[Path] = []
        self.paused = False

    def url_for(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    @property
    def url(self) -> str:
        return self.url_for(0)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start and wait until it answers PING; RuntimeError (with its log) if it does not."""
        assert not self.running, "redis-server already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / f"redis-{len(self.logs)}.log"
        self.logs.append(log)
        # --save "" and --appendonly no: nothing survives a restart, as after a real crash
        # of a cache-only Redis; --port and --bind keep it private to this test.
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.dir),
                "--logfile", str(log),
                "--daemonize", "no",
                "--databases", "16",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.paused = False
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{self.output()}")
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL (a crash: connections reset, every subscription lost) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(EXIT_TIMEOUT)
        self.paused = False

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)  # a stopped process acts on SIGTERM only now
        try:
            self.proc.wait(EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
        self.paused = False

    def restart(self) -> None:
        """kill -9, then start on the same port."""
        self.kill()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: a hung Redis (TCP stays open, nothing answers)."""
        assert self.proc is not None and self.running
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@contextmanager
def running_redis(dir: Path, port: int) -> Iterator[RedisServer]:
    """A started RedisServer, stopped (whatever state it is in) on exit."""
    server = RedisServer(dir, port)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(
    tmp_path: Path, unused_tcp_port_factory: Callable[[], int]
) -> Iterator[RedisServer]:
    """A fresh redis-server for one test, on a free port."""
    with running_redis(tmp_path / "redis", unused_tcp_port_factory()) as server:
        yield server
