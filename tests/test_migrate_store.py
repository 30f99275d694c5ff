"""`run.py migrate-store`: a SQLite database moved into PostgreSQL, and served from there.

The SQLite database is filled by a real `run.py` (a user, logins, tasks in every status
with their events, subscriptions) and through the store (an API key, a share token, an
idempotency key, a subscription left open); `migrate-store` runs as a real process; then
a real `run.py --store postgresql://…` node, without --jwt-secret, serves what was moved.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from server.config import PROJECT_ROOT
from server.models import utc_now
from server.store import open_store
from server.store.migrate import TABLES, copy_store

from .helpers import PASSWORD, TIMEOUT
from .pg import PostgresServer, free_port
from .server_process import RUN_PY, ServerProcess, api, clean_env

MIGRATIONS_ROOT = PROJECT_ROOT / "migrations"
#: Every table the command copies, with its row count, as the summary prints it.
COPIED = [t.name for t in TABLES]
#: Settings that keep the SQLite server quick in tests (cheap hashes, no login throttle).
FAST = ["--password-hash-cost", "1", "--auth-rate", "0", "--shutdown-timeout", "0.5"]


@dataclass
class Filled:
    """A SQLite database after a real server used it, and what that server answered."""

    db: Path
    token: str
    user_id: int
    #: GET /api/v1/tasks on the SQLite server (newest first).
    tasks: list[dict[str, Any]]
    #: GET /api/v1/tasks/{id}/events of each task there.
    events: dict[str, list[dict[str, Any]]]
    #: The second page of GET /api/v1/tasks?limit=2 and the cursor that led to it.
    cursor: str
    second_page: list[dict[str, Any]]
    running: str
    secret: str
    instance_id: str


def migrate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`python run.py migrate-store ARGS` as a real process."""
    return subprocess.run(
        [sys.executable, str(RUN_PY), "migrate-store", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
    )


async def migrate(db: Path, url: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(migrate_cli, "--from", f"sqlite:///{db}", "--to", url)


async def _ws_subscribe_and_leave(base: str, token: str, task_id: str) -> None:
    """Open a socket, subscribe to the task (a subscription row), read its snapshot, close."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(
            f"{base}/api/v1/ws", headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.send_json({"action": "subscribe", "task_id": task_id})
            await ws.receive_json(timeout=TIMEOUT)


async def _fill(tmp_path: Path) -> Filled:
    db = tmp_path / "data" / "app.db"
    server = ServerProcess(tmp_path, free_port(), db, FAST)
    await server.start()
    try:
        base = server.base_url
        async with aiohttp.ClientSession() as http:
            login = {"username": "alice", "password": PASSWORD}
            user = await api(http, "POST", f"{base}/api/v1/auth/register", json=login, expect=201)
            await api(http, "POST", f"{base}/api/v1/auth/login", json=login)  # a 2nd session
            token = (await api(http, "POST", f"{base}/api/v1/auth/login", json=login))[
                "access_token"
            ]

            async def create(kind: str, params: dict[str, Any]) -> str:
                body = {"kind": kind, "params": params}
                task = await api(http, "POST", f"{base}/api/v1/tasks", token, json=body, expect=201)
                return str(task["id"])

            async def post(task_id: str, action: str, body: dict[str, Any]) -> None:
                await api(http, "POST", f"{base}/api/v1/tasks/{task_id}/{action}", token, json=body)

            await create("import", {"file": "pending.csv"})  # stays pending
            running = await create("import", {"file": "running.csv", "ü": [1, 2.5]})
            for pct in (10, 12.5, 40):
                await post(running, "progress", {"progress": pct, "step": "parse", "message": "…"})
            done = await create("report", {})
            await post(done, "progress", {"progress": 50})
            await post(done, "complete", {"result": {"rows": 5000}})
            failed = await create("report", {})
            await post(failed, "progress", {"progress": 5, "step": "fetch"})
            await post(failed, "fail", {"error": "upstream said 502"})
            cancelled = await create("import", {})
            await post(cancelled, "cancel", {})
            await _ws_subscribe_and_leave(server.ws_url, token, running)

            tasks = (await api(http, "GET", f"{base}/api/v1/tasks?status=any", token))["tasks"]
            events = {
                t["id"]: (await api(http, "GET", f"{base}/api/v1/tasks/{t['id']}/events", token))[
                    "events"
                ]
                for t in tasks
            }
            page = await api(http, "GET", f"{base}/api/v1/tasks?status=any&limit=2", token)
            cursor = page["next_cursor"]
            second = await api(
                http, "GET", f"{base}/api/v1/tasks?status=any&limit=2&cursor={cursor}", token
            )
    finally:
        assert await server.stop() == 0, server.output()
    # What issue 10's routes will create, through the store's own Grants side.
    backend = await open_store(f"sqlite:///{db}", migrations_root=MIGRATIONS_ROOT, readers=1)
    try:
        uid = int(user["id"])
        at = utc_now()
        await backend.grants.create_api_key(
            "k1", uid, "worker", ["tasks:write", "tasks:read"], "ab" * 32, at
        )
        await backend.grants.create_share("s1", running, uid, "cd" * 32, at, 4_102_444_800.0)
        await backend.store.record_subscriptions([("conn-left-open", uid, done, at)], [], "old")
        assert backend.sqlite is not None
        await backend.sqlite.execute(  # type: ignore[attr-defined]
            "INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, created_at)"
            " VALUES (?, 'retry-1', 'f00d', 201, '{\"id\":\"x\"}', ?)",
            (uid, at),
        )
        instance_id = await backend.accounts.instance_id()
    finally:
        await backend.close()
    secret = (db.parent / "app.db.jwt-secret").read_text().strip()
    return Filled(
        db, token, uid, tasks, events, cursor, second["tasks"], running, secret, instance_id
    )


@pytest.fixture
async def filled(tmp_path: Path) -> Filled:
    """A SQLite database filled by a real server and the store (see the module docstring)."""
    return await _fill(tmp_path)


@pytest.fixture
def blank_pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A new database without any table (migrate-store creates them)."""
    pg_server.ensure_running()
    name = f"blank_{uuid.uuid4().hex[:12]}"
    pg_server.create_database(name)
    try:
        yield pg_server.url(name)
    finally:
        pg_server.ensure_running()
        pg_server.drop_database(name)


@pytest.fixture
async def pg_node() -> AsyncIterator[list[ServerProcess]]:
    """Server processes started by a test on PostgreSQL, killed at its end."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.close()


async def counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        return {name: await conn.fetchval(f"SELECT count(*) FROM {name}") for name in COPIED}
    finally:
        await conn.close()


def sqlite_counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {name: conn.execute(f"SELECT count(*) FROM {name}").fetchone()[0] for name in COPIED}


async def test_a_migrated_database_is_served_by_a_postgresql_node(
    filled: Filled, blank_pg_url: str, tmp_path: Path, pg_node: list[ServerProcess]
) -> None:
    """Old token, same tasks, same events and seqs, old cursor; new seq, user and task follow."""
    done = await migrate(filled.db, blank_pg_url)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    expected = sqlite_counts(filled.db)
    for name in COPIED:  # one summary line per table, with its count
        (line,) = [line for line in lines if line.split()[0] == name]
        assert int(line.split()[1].replace(",", "")) == expected[name], line
    assert any(line.startswith("job_leases") and "not copied" in line for line in lines)
    assert await counts(blank_pg_url) == expected

    node = ServerProcess(tmp_path, free_port(), None, ["--store", blank_pg_url, *FAST])
    pg_node.append(node)
    await node.start()
    base, token = node.base_url, filled.token
    async with aiohttp.ClientSession() as http:
        me = await api(http, "GET", f"{base}/api/v1/auth/me", token)
        assert (me["id"], me["username"]) == (filled.user_id, "alice")
        tasks = (await api(http, "GET", f"{base}/api/v1/tasks?status=any", token))["tasks"]
        assert tasks == filled.tasks
        assert {t["status"] for t in tasks} == {
            "pending",
            "running",
            "completed",
            "failed",
            "cancelled",
        }
        for task in tasks:
            got = await api(http, "GET", f"{base}/api/v1/tasks/{task['id']}/events", token)
            assert got["events"] == filled.events[task["id"]]
        page = await api(
            http, "GET", f"{base}/api/v1/tasks?status=any&limit=2&cursor={filled.cursor}", token
        )
        assert page["tasks"] == filled.second_page

        # The WebSocket replays the same history, seq by seq.
        history = filled.events[filled.running]
        async with http.ws_connect(
            f"{node.ws_url}/api/v1/ws", headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            await ws.send_json({"action": "subscribe", "task_id": filled.running, "last_seq": 0})
            replayed = [await ws.receive_json(timeout=TIMEOUT) for _ in history]
            assert [(m["seq"], m["event"], m["progress"]) for m in replayed] == [
                (e["seq"], e["event"], e["progress"]) for e in history
            ]
            url = f"{base}/api/v1/tasks/{filled.running}/progress"
            posted = await api(http, "POST", url, token, json={"progress": 90})
            assert posted["seq"] == history[-1]["seq"] + 1
            live = await ws.receive_json(timeout=TIMEOUT)
            assert (live["seq"], live["progress"]) == (posted["seq"], 90)

        # Identity columns were moved past the copied ids.
        login = {"username": "bob", "password": PASSWORD}
        bob = await api(http, "POST", f"{base}/api/v1/auth/register", json=login, expect=201)
        assert bob["id"] == filled.user_id + 1
        body = {"kind": "import", "params": {}}
        new = await api(http, "POST", f"{base}/api/v1/tasks", token, json=body, expect=201)
        listed = (await api(http, "GET", f"{base}/api/v1/tasks?status=any", token))["tasks"]
        assert listed[0]["id"] == new["id"]

    conn = await asyncpg.connect(blank_pg_url)
    try:
        meta = dict(await conn.fetch("SELECT key, value FROM meta"))
        assert meta["instance_id"] == filled.instance_id
        assert meta["jwt_secret"] == filled.secret
        key = await conn.fetchrow("SELECT * FROM api_keys WHERE id = 'k1'")
        assert (key["user_id"], key["scopes"], key["secret_hash"]) == (
            filled.user_id,
            "tasks:write tasks:read",
            "ab" * 32,
        )
        share = await conn.fetchrow("SELECT * FROM share_tokens WHERE id = 's1'")
        assert (share["task_id"], share["user_id"]) == (filled.running, filled.user_id)
        idem = await conn.fetchrow("SELECT * FROM idempotency_keys WHERE key = 'retry-1'")
        assert (idem["status"], json.loads(idem["body"])) == (201, {"id": "x"})
        # The row the stopped server left open was closed by the copy.
        left = await conn.fetchval(
            "SELECT unsubscribed_at FROM subscriptions WHERE connection_id = 'conn-left-open'"
        )
        assert left is not None
        assert await conn.fetchval("SELECT count(*) FROM job_leases") == 0
    finally:
        await conn.close()


async def test_every_row_is_copied_as_it_was_whatever_the_chunk_size(
    filled: Filled, pg_url: str
) -> None:
    """Read two rows at a time, every table's rows arrive equal, in SQLite's key order."""
    report = await copy_store(
        filled.db, pg_url, migrations_root=MIGRATIONS_ROOT, secret=None, chunk_rows=2
    )
    assert {t.table: t.rows for t in report.tables if t.rows is not None} == sqlite_counts(
        filled.db
    )
    conn = await asyncpg.connect(pg_url)
    source = sqlite3.connect(filled.db)
    try:
        for table in TABLES:
            names = [c.name for c in table.columns]
            reads = ", ".join(c.select.replace(":now", "NULL") for c in table.columns)
            order = ", ".join(table.key)
            key = ", ".join(table.columns[i].select for i in table.key_positions)
            want = source.execute(f"SELECT {reads} FROM {table.name} ORDER BY {key}").fetchall()
            got = await conn.fetch(f"SELECT {', '.join(names)} FROM {table.name} ORDER BY {order}")
            assert len(got) == len(want) > 0, table.name
            for row, original in zip(got, want, strict=True):
                for name, value, before in zip(names, row, original, strict=True):
                    if name == "unsubscribed_at" and before is None:
                        assert value is not None  # closed by the copy
                    else:
                        assert value == before, (table.name, name)
        # No secret given (a server run with --jwt-secret): none is stored.
        assert await conn.fetchval("SELECT value FROM meta WHERE key = 'jwt_secret'") is None
    finally:
        source.close()
        await conn.close()


async def test_a_target_with_users_or_tasks_is_refused(filled: Filled, pg_url: str) -> None:
    """A second copy into the same database: exit 2, and the target is left as it was."""
    assert (await migrate(filled.db, pg_url)).returncode == 0
    before = await counts(pg_url)
    again = await migrate(filled.db, pg_url)
    assert again.returncode == 2, again.stderr
    assert "is not empty (users: 1, tasks: 5)" in again.stderr
    assert again.stdout == ""
    assert await counts(pg_url) == before


async def test_a_sqlite_database_in_use_by_a_server_is_refused(
    filled: Filled, pg_url: str, tmp_path: Path
) -> None:
    """A server holds the SQLite lock file: exit 3 naming its pid, nothing copied."""
    server = ServerProcess(tmp_path, free_port(), filled.db, FAST)
    await server.start()
    try:
        refused = await migrate(filled.db, pg_url)
    finally:
        await server.stop()
    assert refused.returncode == 3, refused.stderr
    assert f"another server is using {filled.db} (pid {server.proc.pid})" in refused.stderr
    assert await counts(pg_url) == dict.fromkeys(COPIED, 0)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        # Written with foreign keys off: PostgreSQL's check fails after three tables went in.
        (
            "INSERT INTO task_events (task_id, seq, event, status, progress, ts)"
            " VALUES ('no-such-task', 1, 'created', 'pending', 0, '2020-01-01T00:00:00.000Z')",
            "copying task_events failed",
        ),
        # PostgreSQL text cannot hold NUL: the copy stops at that value, naming the row.
        (
            "UPDATE task_events SET step = 'a' || char(0) || 'b'"
            " WHERE (task_id, seq) = (SELECT task_id, max(seq) FROM task_events)",
            "holds a NUL character",
        ),
    ],
    ids=["orphan-event", "nul-in-text"],
)
async def test_a_copy_that_fails_midway_leaves_the_target_empty(
    filled: Filled, pg_url: str, damage: str, says: str
) -> None:
    """All or nothing: the users, sessions and tasks copied before the failure are gone."""
    with sqlite3.connect(filled.db) as conn:
        conn.execute(damage)
    instance_before = await _meta(pg_url, "instance_id")
    failed = await migrate(filled.db, pg_url)
    assert failed.returncode == 1, failed.stderr
    assert says in failed.stderr and "nothing was copied" in failed.stderr
    assert await counts(pg_url) == dict.fromkeys(COPIED, 0)
    assert await _meta(pg_url, "instance_id") == instance_before


async def _meta(url: str, key: str) -> str | None:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT value FROM meta WHERE key = $1", key)
    finally:
        await conn.close()


async def test_a_column_migrate_store_does_not_know_is_refused(filled: Filled, pg_url: str) -> None:
    """A schema this version cannot copy exactly: exit 2 naming the table, nothing copied."""
    with sqlite3.connect(filled.db) as conn:
        conn.execute("ALTER TABLE tasks ADD COLUMN priority INTEGER")
    refused = await migrate(filled.db, pg_url)
    assert refused.returncode == 2, refused.stderr
    assert "the SQLite table tasks has columns" in refused.stderr
    assert "priority" in refused.stderr
    assert await counts(pg_url) == dict.fromkeys(COPIED, 0)


def test_help_and_usage_errors() -> None:
    """--help says what is copied and the exit statuses; a bad --from or --to is exit 2."""
    shown = migrate_cli("--help")
    assert shown.returncode == 0
    assert "--from" in shown.stdout and "--to" in shown.stdout
    assert "Job leases are not copied" in shown.stdout and "Exit status" in shown.stdout
    assert migrate_cli().returncode == 2  # both are required
    wrong = migrate_cli("--from", "postgresql://h/db", "--to", "postgresql://h/db")
    assert (wrong.returncode, wrong.stderr) == (
        2,
        "error: --from must be sqlite:///FILE, not 'postgresql://h/db'\n",
    )
    missing = migrate_cli("--from", "sqlite:////nonexistent/app.db", "--to", "postgresql://h/db")
    assert (missing.returncode, missing.stderr) == (
        2,
        "error: no SQLite database at /nonexistent/app.db\n",
    )


async def test_an_unreachable_target_is_a_failure_without_the_password(filled: Filled) -> None:
    """Nothing listens at the target: exit 1, the address in the message, not the password."""
    url = f"postgresql://progress:s3cret-pw@127.0.0.1:{free_port()}/progress"
    failed = await migrate(filled.db, url)
    assert failed.returncode == 1, failed.stderr
    assert "127.0.0.1" in failed.stderr and "s3cret-pw" not in failed.stderr
