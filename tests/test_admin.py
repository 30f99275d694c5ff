"""`run.py users add|remove|list` against real database files, as an operator runs it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType

from .helpers import (
    PASSWORD,
    TIMEOUT,
    auth_headers,
    create_task,
    eventually,
    post_progress,
    register,
    ws_connect,
)
from .server_process import RUN_PY, clean_env

API = "/api/v1"


async def users(
    db: Path | None, *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """Run `python run.py users ARGS` (with `--db db`); its exit code, stdout and stderr."""
    command = [sys.executable, str(RUN_PY), "users", *args]
    if db is not None:
        command += ["--db", str(db)]
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(env),
    )
    async with asyncio.timeout(4 * TIMEOUT):
        out, err = await proc.communicate(stdin.encode())
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


async def login(client: Any, username: str, password: str = PASSWORD) -> Any:
    return await client.post(f"{API}/auth/login", json={"username": username, "password": password})


async def test_add_creates_a_user_who_can_log_in(client, config):
    """`users add NAME` with the password on stdin: exit 0, and the user logs in."""
    code, out, err = await users(config.db_path, "add", "alice", stdin=PASSWORD + "\n")
    assert (code, err) == (0, "")
    assert "added user alice" in out
    assert (await login(client, "alice")).status == 200
    assert (await login(client, "alice", "wrong-password")).status == 401
    (stored,) = rows(config.db_path, "SELECT password_hash FROM users")[0]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")  # the default cost


async def test_add_refuses_an_existing_or_invalid_user(tmp_path):
    """An existing name (any case) is 1; a bad name or a short password is 2; none added."""
    db = tmp_path / "app.db"
    assert (await users(db, "add", "alice", stdin=PASSWORD))[0] == 0
    code, _, err = await users(db, "add", "ALICE", stdin=PASSWORD)
    assert code == 1 and "exists" in err
    assert (await users(db, "add", "no spaces", stdin=PASSWORD))[0] == 2
    code, _, err = await users(db, "add", "bob", stdin="short\n")
    assert code == 2 and "8 to 1024" in err
    assert (await users(db, "add", "bob", stdin=""))[0] == 2
    assert rows(db, "SELECT username FROM users") == [("alice",)]


async def test_list_shows_users_and_their_task_counts(client, config):
    """`users list`: a header, then id, username, created_at and tasks per user."""
    token = await register(client, "alice")
    await register(client, "bob")
    for _ in range(3):
        await create_task(client, token)
    code, out, _ = await users(config.db_path, "list")
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["id", "username", "created_at", "tasks"]
    assert [(row[0], row[1], row[3]) for row in lines[1:]] == [
        ("1", "alice", "3"),
        ("2", "bob", "0"),
    ]
    assert lines[1][2].endswith("Z")


async def test_remove_deletes_everything_of_the_user_and_ends_her_sessions(client, config):
    """`users remove` while the server runs: alice's rows all go, her token and socket stop
    within seconds; bob keeps everything."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    for token in (alice, bob):
        task = await create_task(client, token)
        await post_progress(client, token, task["id"], 50)
        ws = await ws_connect(client, token)
        await ws.send_json({"action": "subscribe", "task_id": task["id"]})
        await ws.receive(timeout=TIMEOUT)
        if token == alice:
            alices_ws = ws

    code, out, err = await users(config.db_path, "remove", "alice")
    assert (code, err) == (0, "")
    assert "removed user alice" in out
    alice_id = 1
    for table in ("tasks", "subscriptions", "sessions"):
        assert rows(
            config.db_path, f"SELECT COUNT(*) FROM {table} WHERE user_id = ?", alice_id
        ) == [(0,)]
    assert rows(config.db_path, "SELECT username FROM users") == [("bob",)]
    assert rows(
        config.db_path,
        "SELECT COUNT(*) FROM task_events WHERE task_id NOT IN (SELECT id FROM tasks)",
    ) == [(0,)]
    assert rows(config.db_path, "SELECT COUNT(*) FROM task_events")[0][0] >= 3  # bob's

    async def refused() -> bool:
        resp = await client.get(f"{API}/auth/me", headers=auth_headers(alice))
        return resp.status == 401

    await eventually(refused, timeout=4 * TIMEOUT)
    msg = await alices_ws.receive(timeout=4 * TIMEOUT)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)
    assert (await login(client, "alice")).status == 401
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(bob))
    assert resp.status == 200


async def test_remove_or_list_of_what_is_not_there_is_1(tmp_path):
    """An unknown user, or a database file that does not exist, is exit 1."""
    db = tmp_path / "app.db"
    code, _, err = await users(db, "list")
    assert code == 1 and "no database" in err
    assert not db.exists()  # not created by a mistyped path
    assert (await users(db, "add", "alice", stdin=PASSWORD))[0] == 0
    code, _, err = await users(db, "remove", "bob")
    assert code == 1 and "no user bob" in err


async def test_usage_errors_are_2_and_the_db_comes_from_the_environment(tmp_path):
    """No command or an unknown one is 2; PROGRESS_DB names the file when --db is not given."""
    assert (await users(None, env={"PROGRESS_DB": str(tmp_path / "x.db")}))[0] == 2
    assert (await users(None, "frob", env={"PROGRESS_DB": str(tmp_path / "x.db")}))[0] == 2
    env = {"PROGRESS_DB": str(tmp_path / "env.db"), "PROGRESS_PASSWORD_HASH_COST": "1"}
    assert (await users(None, "add", "alice", stdin=PASSWORD, env=env))[0] == 0
    code, out, _ = await users(None, "list", env=env)
    assert code == 0 and "alice" in out
    (stored,) = rows(tmp_path / "env.db", "SELECT password_hash FROM users")[0]
    assert "m=1024," in stored
