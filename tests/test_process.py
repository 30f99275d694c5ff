"""The real server as a subprocess: durability across SIGKILL, resumed jobs, clean shutdown,
first start, command line and environment, bad database files, and what the logs show."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from server.config import flags

from .helpers import PASSWORD, SECRET, TIMEOUT
from .server_process import RUN_PY, ServerProcess, api, clean_env

#: Built-in job steps that report a progress event (the last one completes the task).
JOB_PROGRESS_STEPS = ["load_prices", "moving_averages", "rsi", "macd", "signal"]

MakeServer = Callable[..., ServerProcess]


@pytest.fixture
def make_server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[MakeServer]:
    """Build ServerProcesses (not started) on a free port; every one is killed at teardown."""
    servers: list[ServerProcess] = []

    def make(
        args: list[str] | None = None,
        *,
        db_path: Path | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
        pass_port: bool = True,
        use_db_flag: bool = True,
    ) -> ServerProcess:
        log_dir = tmp_path / f"proc{len(servers)}"
        log_dir.mkdir()
        server = ServerProcess(
            log_dir,
            port or unused_tcp_port_factory(),
            (db_path or tmp_path / "data" / "app.db") if use_db_flag else None,
            ["--jwt-secret", SECRET, "--job-step-delay", "0.01"] if args is None else args,
            env,
            pass_port=pass_port,
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# -- small clients -----------------------------------------------------------------------


async def register(http: aiohttp.ClientSession, server: ServerProcess, name: str) -> str:
    """Create a user and return a token for them."""
    base = f"{server.base_url}/api/v1/auth"
    creds = {"username": name, "password": PASSWORD}
    await api(http, "POST", f"{base}/register", json=creds, expect=201)
    return (await api(http, "POST", f"{base}/login", json=creds))["access_token"]


async def new_task(http: aiohttp.ClientSession, server: ServerProcess, token: str) -> str:
    body = {"kind": "external", "params": {}}
    task = await api(http, "POST", f"{server.base_url}/api/v1/tasks", token, json=body, expect=201)
    return task["id"]


async def get_task(
    http: aiohttp.ClientSession, server: ServerProcess, token: str, task_id: str
) -> dict[str, Any]:
    return await api(http, "GET", f"{server.base_url}/api/v1/tasks/{task_id}", token)


async def events_of(
    http: aiohttp.ClientSession, server: ServerProcess, token: str, task_id: str
) -> list[dict[str, Any]]:
    url = f"{server.base_url}/api/v1/tasks/{task_id}/events"
    return (await api(http, "GET", url, token))["events"]


async def post_progress(
    http: aiohttp.ClientSession,
    server: ServerProcess,
    token: str,
    task_id: str,
    progress: float,
    **extra: Any,
) -> int:
    url = f"{server.base_url}/api/v1/tasks/{task_id}/progress"
    body = await api(http, "POST", url, token, json={"progress": progress, **extra})
    return body["seq"]


def assert_gapless(events: list[dict[str, Any]]) -> list[int]:
    """Seqs are exactly 1..max (no gap, no duplicate); returns them."""
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return seqs


async def ws_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        return json.loads(await ws.recv())


async def ws_events_until(ws: ClientConnection, last: int) -> list[dict[str, Any]]:
    """Event messages up to and including seq `last`."""
    got = []
    while True:
        message = await ws_json(ws)
        assert message["type"] == "event", message
        got.append(message)
        if message["seq"] >= last:
            return got


async def assert_nothing_queued(ws: ClientConnection) -> None:
    """An app-level ping is answered next: nothing else was pending on this socket."""
    await ws.send(json.dumps({"action": "ping", "id": "fence"}))
    assert await ws_json(ws) == {"type": "pong", "id": "fence"}


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll the async `check` until it returns something truthy (bounded)."""
    async with asyncio.timeout(timeout):
        while not (result := await check()):
            await asyncio.sleep(0.05)
    return result


# -- durability ----------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["flag", "generated"])
async def test_sigkill_keeps_every_acknowledged_event(
    make_server: MakeServer, http: aiohttp.ClientSession, secret: str
) -> None:
    """K acknowledged updates survive SIGKILL: history, replay and old tokens all work after."""
    k, last_seen = 50, 20
    args = ["--job-step-delay", "0.01"] + (["--jwt-secret", SECRET] if secret == "flag" else [])
    server = make_server(args)
    await server.start()
    token = await register(http, server, "durable")
    task_id = await new_task(http, server, token)
    acked = [
        await post_progress(http, server, token, task_id, i * 2, step=f"s{i}") for i in range(k)
    ]
    assert acked == list(range(3, k + 3))

    secret_file = server.db_path.with_name(server.db_path.name + ".jwt-secret")
    if secret == "generated":
        assert secret_file.exists()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        kept_secret = secret_file.read_text()
    else:
        assert not secret_file.exists()

    await server.restart()
    if secret == "generated":
        assert secret_file.read_text() == kept_secret

    # The token from before the restart still works, over HTTP and WebSocket.
    me = await api(http, "GET", f"{server.base_url}/api/v1/auth/me", token)
    assert me["username"] == "durable"
    events = await events_of(http, server, token, task_id)
    assert assert_gapless(events) == list(range(1, k + 3))
    assert [e["event"] for e in events[:3]] == ["created", "started", "progress"]
    assert all(e["event"] == "progress" for e in events[2:])
    assert [e["step"] for e in events[2:]] == [f"s{i}" for i in range(k)]
    task = await get_task(http, server, token, task_id)
    assert (task["status"], task["seq"], task["progress"]) == ("running", k + 2, (k - 1) * 2)

    headers = {"Authorization": f"Bearer {token}"}
    async with connect(f"{server.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(
            json.dumps({"action": "subscribe", "task_id": task_id, "last_seq": last_seen})
        )
        replay = await ws_events_until(ws, k + 2)
        assert [m["seq"] for m in replay] == list(range(last_seen + 1, k + 3))
        assert {m["task_id"] for m in replay} == {task_id}
        await assert_nothing_queued(ws)
        # Live events continue the same sequence after the restart.
        assert await post_progress(http, server, token, task_id, 100) == k + 3
        live = await ws_json(ws)
        assert (live["type"], live["seq"], live["progress"]) == ("event", k + 3, 100)

    url = f"{server.ws_url}/api/v1/stock/ws/analyze/{task_id}?last_seq={k}&token={token}"
    async with connect(url, proxy=None) as ws:
        replay = await ws_events_until(ws, k + 3)
        assert [m["seq"] for m in replay] == [k + 1, k + 2, k + 3]
        await assert_nothing_queued(ws)


async def test_concurrent_producers_then_sigkill(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """Producers race on two tasks; after SIGKILL every acknowledged seq is stored, 1..max."""
    server = make_server()
    await server.start()
    token = await register(http, server, "racer")
    task_ids = [await new_task(http, server, token) for _ in range(2)]
    acked: dict[str, list[int]] = {t: [] for t in task_ids}
    enough = asyncio.Event()

    async def produce(task_id: str, worker: int) -> None:
        url = f"{server.base_url}/api/v1/tasks/{task_id}/progress"
        headers = {"Authorization": f"Bearer {token}"}
        for i in range(10_000):
            body = {"progress": i % 101, "message": f"w{worker}-{i}"}
            try:
                async with http.post(url, json=body, headers=headers) as resp:
                    if resp.status != 200:
                        return
                    acked[task_id].append((await resp.json())["seq"])
            except (aiohttp.ClientError, ConnectionError):
                return  # the server is gone: this update is not acknowledged
            if sum(map(len, acked.values())) >= 150:
                enough.set()

    producers = [asyncio.create_task(produce(task_id, w)) for task_id in task_ids for w in range(4)]
    async with asyncio.timeout(30):
        await enough.wait()
        server.kill()  # mid-stream: the producers are still posting
        await asyncio.gather(*producers)
    await server.wait()

    await server.start()
    for task_id in task_ids:
        mine = acked[task_id]
        assert len(mine) == len(set(mine)), "a seq was acknowledged twice"
        events = await events_of(http, server, token, task_id)
        seqs = assert_gapless(events)
        assert set(mine) <= set(seqs)
        assert [e["event"] for e in events[:2]] == ["created", "started"]
        assert (await get_task(http, server, token, task_id))["seq"] == seqs[-1]
        # The sequence carries on from the stored maximum.
        assert await post_progress(http, server, token, task_id, 50) == seqs[-1] + 1


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_interrupted_job_resumes_from_checkpoint(
    make_server: MakeServer, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    """A built-in job stopped mid-run continues after restart without redoing finished steps."""
    server = make_server(["--jwt-secret", SECRET, "--job-step-delay", "0.5"])
    await server.start()
    token = await register(http, server, "analyst")
    url = f"{server.base_url}/api/v1/stock/analyze"
    task = await api(http, "POST", url, token, json={"code": "600519"}, expect=201)
    task_id = task["id"]

    async def running_with_progress() -> bool:
        current = await get_task(http, server, token, task_id)
        assert current["status"] in ("pending", "running"), current
        return current["status"] == "running" and current["progress"] > 0

    await eventually(running_with_progress)
    before = await events_of(http, server, token, task_id)
    done_before = [e["step"] for e in before if e["event"] == "progress" and e["progress"] > 0]
    assert done_before, before
    server.send_signal(sig)
    code = await server.wait()
    if sig is signal.SIGTERM:
        assert code == 0  # the job is stopped where it is, not failed

    await server.start(["--jwt-secret", SECRET, "--job-step-delay", "0.01"])

    async def finished() -> dict[str, Any] | None:
        current = await get_task(http, server, token, task_id)
        return current if current["status"] not in ("pending", "running") else None

    final = await eventually(finished)
    assert final["status"] == "completed", final
    assert "job.resume" in server.output()

    events = await events_of(http, server, token, task_id)
    assert_gapless(events)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "created" and kinds[-1] == "completed"
    assert kinds.count("started") == 1 and kinds.count("completed") == 1
    progress_events = [e for e in events if e["event"] == "progress"]
    # The job announces its start once (0 %, step "load_prices"), then reports each
    # finished step once: a step done before the kill is not reported again.
    assert [e["progress"] for e in progress_events].count(0) == 1
    steps = [e["step"] for e in progress_events if e["progress"] > 0]
    assert len(steps) == len(set(steps)), f"a step was repeated: {steps}"
    assert steps[: len(done_before)] == done_before
    assert steps == JOB_PROGRESS_STEPS
    percents = [e["progress"] for e in progress_events]
    assert percents == sorted(percents)

    # Resuming from the checkpoint computes what an uninterrupted run computes.
    fresh = await api(http, "POST", url, token, json={"code": "600519"}, expect=201)

    async def fresh_done() -> dict[str, Any] | None:
        current = await get_task(http, server, token, fresh["id"])
        return current if current["status"] == "completed" else None

    assert (await eventually(fresh_done))["result"] == final["result"]
    assert final["result"]["data_source"] == "synthetic"


# -- graceful shutdown ---------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_shutdown_notifies_clients_and_keeps_writes(
    make_server: MakeServer, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    """SIGTERM/SIGINT: notice + close 1001 for clients, exit 0, acknowledged writes kept."""
    server = make_server()
    await server.start()
    token = await register(http, server, "watcher")
    task_id = await new_task(http, server, token)
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(f"{server.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task_id}))
        assert (await ws_json(ws))["type"] == "snapshot"
        seq = await post_progress(http, server, token, task_id, 42, step="just-before")
        assert seq == 3
        server.send_signal(sig)
        messages = []
        with pytest.raises(ConnectionClosed):
            while True:
                messages.append(await ws_json(ws))
        assert ws.close_code == 1001, (ws.close_code, ws.close_reason)
    assert messages[-1]["type"] == "notice" and messages[-1]["code"] == "server_shutdown"
    assert [m["seq"] for m in messages[:-1]] == [2, 3]  # live events came before the notice
    assert await server.wait(timeout=5.0) == 0
    assert "Traceback" not in server.output()

    await server.start()
    events = await events_of(http, server, token, task_id)
    assert assert_gapless(events) == [1, 2, 3]
    assert (events[-1]["step"], events[-1]["progress"]) == ("just-before", 42)


async def test_sigterm_commits_in_flight_writes(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """Updates racing a SIGTERM are either refused or stored: every 200 survives the restart."""
    server = make_server()
    await server.start()
    token = await register(http, server, "rushed")
    task_id = await new_task(http, server, token)
    acked: list[int] = []
    enough = asyncio.Event()

    async def produce(worker: int) -> None:
        url = f"{server.base_url}/api/v1/tasks/{task_id}/progress"
        for i in range(10_000):
            try:
                async with http.post(
                    url, json={"progress": i % 101}, headers={"Authorization": f"Bearer {token}"}
                ) as resp:
                    if resp.status != 200:
                        assert resp.status == 503, await resp.text()
                        return
                    acked.append((await resp.json())["seq"])
            except (aiohttp.ClientError, ConnectionError):
                return
            if len(acked) >= 40:
                enough.set()

    producers = [asyncio.create_task(produce(w)) for w in range(4)]
    async with asyncio.timeout(30):
        await enough.wait()
        server.send_signal(signal.SIGTERM)
        await asyncio.gather(*producers)
    assert await server.wait(timeout=5.0) == 0

    await server.start()
    seqs = assert_gapless(await events_of(http, server, token, task_id))
    assert len(acked) == len(set(acked))
    assert set(acked) <= set(seqs)


# -- first start, command line, environment ---------------------------------------------


def _migrations(db_path: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute("SELECT version, applied_at FROM schema_migrations").fetchall()


async def test_fresh_start_creates_folder_file_and_schema(
    make_server: MakeServer, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """--db in a missing folder: folder, file and schema are created; a restart migrates nothing."""
    db_path = tmp_path / "missing" / "nested" / "app.db"
    assert not db_path.parent.exists()
    server = make_server(db_path=db_path)
    await server.start()
    assert db_path.is_file()
    first = _migrations(db_path)
    migrations = RUN_PY.parent / "migrations" / "sqlite"
    shipped = sorted(int(f.name[:4]) for f in migrations.glob("*.sql"))
    assert [v for v, _ in first] == shipped
    with sqlite3.connect(db_path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
    assert {"users", "tasks", "task_events", "subscriptions"} <= tables
    assert server.output().count("migration.applied") == len(shipped)
    assert await server.stop() == 0

    await server.start()
    async with http.get(f"{server.base_url}/healthz") as resp:
        assert resp.status == 200
    assert "migration.applied" not in server.output()
    assert _migrations(db_path) == first
    assert await server.stop() == 0


def test_help_lists_every_flag() -> None:
    """`python run.py --help` exits 0 and names every flag and its environment variable."""
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--host", "--port", "--db", "--job-step-delay", "--jwt-secret"):
        assert flag in done.stdout
    for flag, env_name in flags():
        assert flag in done.stdout
        assert env_name in done.stdout


async def test_environment_variables_and_flags(
    make_server: MakeServer,
    tmp_path: Path,
    unused_tcp_port_factory: Callable[[], int],
    http: aiohttp.ClientSession,
) -> None:
    """PROGRESS_PORT/PROGRESS_DB apply without flags; a flag wins over its variable."""
    env_db = tmp_path / "from-env" / "env.db"
    env_port = unused_tcp_port_factory()
    env = {"PROGRESS_PORT": str(env_port), "PROGRESS_DB": str(env_db), "JWT_SECRET": SECRET}
    server = make_server([], env=env, port=env_port, pass_port=False, use_db_flag=False)
    await server.start()
    assert env_db.is_file()
    token = await register(http, server, "envuser")  # JWT_SECRET is used: no secret file
    assert not env_db.with_name("env.db.jwt-secret").exists()
    assert await server.stop() == 0

    flag_db = tmp_path / "from-flag" / "flag.db"
    other_env = {**env, "PROGRESS_DB": str(tmp_path / "unused" / "x.db")}
    flagged = make_server([], env=other_env, db_path=flag_db)  # --port and --db given
    assert flagged.port != env_port
    await flagged.start()
    assert flag_db.is_file()
    assert not (tmp_path / "unused").exists()
    # Same JWT_SECRET, different database: the old token is refused (no such user).
    await api(http, "GET", f"{flagged.base_url}/api/v1/auth/me", token, expect=401)
    assert await flagged.stop() == 0


# -- refusing to start -------------------------------------------------------------------


def _junk(path: Path) -> None:
    path.write_bytes(b"this is not a database\x00\xff" * 40)


def _corrupt_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 50)
    conn.close()
    data = bytearray(path.read_bytes())
    data[100:4000] = b"\xa5" * 3900  # keep the header, wreck the schema page
    path.write_bytes(bytes(data))


def _future_schema(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TEXT NOT NULL)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (9999, 'from_the_future', 'x')")
    conn.close()


@pytest.mark.parametrize("make_file", [_junk, _corrupt_sqlite, _future_schema])
def test_unusable_database_is_refused_cleanly(
    tmp_path: Path, unused_tcp_port: int, make_file: Callable[[Path], None]
) -> None:
    """A junk, corrupt or too-new database file: non-zero exit, one clear line, no traceback."""
    db_path = tmp_path / "bad.db"
    make_file(db_path)
    original = db_path.read_bytes()
    done = subprocess.run(
        [sys.executable, str(RUN_PY), "--port", str(unused_tcp_port), "--db", str(db_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env({"JWT_SECRET": SECRET}),
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    # Log records aside (e.g. server.fd_limit where the open-files limit is low).
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("ts=")]
    assert len(lines) == 1, done.stderr
    assert str(db_path) in lines[0] and lines[0].startswith("error:")
    if make_file is _junk:
        assert db_path.read_bytes() == original  # not touched


def test_port_in_use_is_refused_cleanly(tmp_path: Path) -> None:
    """A port that is already taken: non-zero exit, one clear line naming it, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, str(RUN_PY), "--port", str(port), "--db", str(tmp_path / "a.db")],
            capture_output=True,
            text=True,
            timeout=30,
            env=clean_env({"JWT_SECRET": SECRET}),
        )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(port) in errors[0], done.stderr


# -- logs ----------------------------------------------------------------------------------


async def test_logs_never_show_the_token(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """A token passed as ?token= (accepted or not) never reaches stdout/stderr; the path does."""
    server = make_server()
    await server.start()
    token = await register(http, server, "quiet")
    task_id = await new_task(http, server, token)
    async with connect(f"{server.ws_url}/api/v1/ws?token={token}", proxy=None) as ws:
        await assert_nothing_queued(ws)
    url = f"{server.ws_url}/api/v1/stock/ws/analyze/{task_id}?last_seq=0&token={token}"
    async with connect(url, proxy=None) as ws:
        assert (await ws_json(ws))["seq"] == 1
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    async with http.get(f"{server.base_url}/api/v1/ws?token={forged}") as resp:
        assert resp.status == 401
    async with http.get(f"{server.base_url}/api/v1/tasks?token={token}") as resp:
        assert resp.status == 401  # HTTP takes the header only
    assert await server.stop() == 0

    output = server.output()
    assert "/api/v1/ws" in output and f"/api/v1/stock/ws/analyze/{task_id}" in output
    signature = token.rsplit(".", 1)[1]
    for secret in (token, signature, forged.rsplit(".", 1)[1], PASSWORD, SECRET):
        assert secret not in output
    assert "token=" not in output
