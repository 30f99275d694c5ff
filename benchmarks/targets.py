"""The two servers under test, started as subprocesses, and how to talk to each."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "benchmark-password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


@dataclass
class Target:
    """A running server: ours ("server"), or a bare reference: the direct-write fan-out
    ("reference") or the same with every post group-committed to SQLite ("durable")."""

    name: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)
    db_dir: Path | None = None
    token: str = ""
    log_path: Path | None = None
    #: --store URL (a shared PostgreSQL database); None: a SQLite file in db_dir.
    store: str | None = None
    #: --broker URL and --node-id, for one of several nodes on one store; None: defaults.
    broker: str | None = None
    node_id: str | None = None
    #: Seconds between the built-in job's steps, always passed: the default (5 s, a pace
    #: for people watching the demo) is no benchmark's.
    job_step_delay: float = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_reference(self) -> bool:
        return self.name in ("reference", "durable")

    def command(self) -> list[str]:
        if self.is_reference:
            command = [
                sys.executable,
                "-m",
                "benchmarks.reference_server",
                "--port",
                str(self.port),
            ]
            if self.name == "durable":
                assert self.db_dir is not None
                command += ["--durable", str(self.db_dir / "reference.db")]
            return command
        assert self.db_dir is not None
        store = ["--store", self.store] if self.store else ["--db", str(self.db_dir / "bench.db")]
        return [
            sys.executable,
            str(ROOT / "run.py"),
            "--port",
            str(self.port),
            *store,
            *(["--broker", self.broker] if self.broker else []),
            *(["--node-id", self.node_id] if self.node_id else []),
            "--job-step-delay",
            str(self.job_step_delay),
            *self.extra_args,
        ]

    def start(self) -> None:
        if self.db_dir is None and self.name != "reference":
            self.db_dir = Path(tempfile.mkdtemp(prefix="bench-"))
        log_dir = self.db_dir or Path(tempfile.mkdtemp(prefix="bench-ref-"))
        self.log_path = log_dir / f"{self.name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROGRESS_")}
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log_path, "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- protocol differences ------------------------------------------------------------

    def ws_url(self) -> str:
        if self.is_reference:
            return f"ws://127.0.0.1:{self.port}/ws"
        return f"ws://127.0.0.1:{self.port}/api/v1/ws?token={self.token}"

    def auth(self) -> dict[str, str]:
        return {} if self.is_reference else {"Authorization": f"Bearer {self.token}"}

    def publish_url(self, task_id: str) -> str:
        if self.is_reference:
            return f"{self.base}/publish/{task_id}"
        return f"{self.base}/api/v1/tasks/{task_id}/progress"

    async def login(self, session: aiohttp.ClientSession) -> None:
        if self.is_reference:
            return
        creds = {"username": "bench", "password": PASSWORD}
        await session.post(f"{self.base}/api/v1/auth/register", json=creds)
        async with session.post(f"{self.base}/api/v1/auth/login", json=creds) as resp:
            self.token = (await resp.json())["access_token"]

    async def create_tasks(self, session: aiohttp.ClientSession, count: int) -> list[str]:
        if self.is_reference:
            return [f"ref-{i}" for i in range(count)]
        ids = []
        for _ in range(count):
            async with session.post(
                f"{self.base}/api/v1/tasks",
                json={"kind": "bench", "params": {}},
                headers=self.auth(),
            ) as resp:
                answer = await resp.json()
                if resp.status != 201:
                    raise RuntimeError(f"creating a task: {resp.status} {answer}")
                ids.append(answer["id"])
        return ids

    async def publish(
        self, session: aiohttp.ClientSession, task_id: str, message: str, progress: float = 1
    ) -> dict[str, Any]:
        """One progress post; returns the JSON answer (raises on a non-2xx)."""
        async with session.post(
            self.publish_url(task_id),
            json={"progress": progress, "message": message},
            headers=self.auth(),
        ) as resp:
            if resp.status >= 300:
                raise RuntimeError(f"publish {resp.status}: {await resp.text()}")
            return await resp.json()
