"""Sessions: every token names one; logout, password change and database resets end it."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from server.auth import Identity
from server.config import PROJECT_ROOT
from server.errors import Unauthorized
from server.sessions import CACHE_TTL, SessionService
from server.store.sqlite_accounts import SQLiteAccounts as AccountStore
from server.store.sqlite_db import open_database
from server.web.app import create_app

from .helpers import (
    PASSWORD,
    TIMEOUT,
    auth_headers,
    create_task,
    eventually,
    receive_json,
    register,
    ws_connect,
)
from .test_error_shape import assert_error_shape

API = "/api/v1"
WS = "/api/v1/ws"


async def serve(aiohttp_client: Any, app: Any) -> Any:
    return await aiohttp_client(app, server_kwargs={"shutdown_timeout": 0.5})


async def login(client: Any, username: str, password: str = PASSWORD) -> str:
    resp = await client.post(f"{API}/auth/login", json={"username": username, "password": password})
    assert resp.status == 200, await resp.text()
    return (await resp.json())["access_token"]


def claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


async def me_status(client: Any, token: str) -> tuple[int, str | None]:
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(token))
    body = await resp.json()
    return resp.status, body["error"]["code"] if resp.status != 200 else None


async def assert_token_dead(client: Any, token: str) -> None:
    """401 on HTTP (me, tasks, refresh) and on a new WebSocket handshake."""
    headers = auth_headers(token)
    await assert_error_shape(await client.get(f"{API}/auth/me", headers=headers), 401)
    await assert_error_shape(await client.get(f"{API}/tasks", headers=headers), 401)
    await assert_error_shape(await client.post(f"{API}/auth/refresh", headers=headers), 401)
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await ws_connect(client, token)
    assert info.value.status == 401


async def assert_closed_4401(ws: aiohttp.ClientWebSocketResponse) -> None:
    msg = await ws.receive(timeout=TIMEOUT)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401), (msg.type, msg.data)


async def assert_open(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_json({"action": "ping"})
    assert (await receive_json(ws))["type"] == "pong"


# -- tokens name a session and a database -------------------------------------------------


async def test_tokens_carry_sub_sid_db_iat_exp(client):
    """A login's token names the user, a fresh random session and this database."""
    await register(client, "alice")
    first, second = claims(await login(client, "alice")), claims(await login(client, "alice"))
    assert set(first) == {"sub", "sid", "db", "iat", "exp"}
    assert first["sid"] != second["sid"] and len(first["sid"]) >= 32  # >= 192 bits, base64
    assert first["db"] == second["db"]
    assert first["exp"] - first["iat"] == 3600


async def test_token_from_a_reset_database_is_401(aiohttp_client, config):
    """Same secret file, new database: a token for old user 1 does not act as new user 1."""
    config = dataclasses.replace(config, jwt_secret=None)  # the secret file beside the db
    client = await serve(aiohttp_client, create_app(config))
    old_token = await register(client, "alice")
    await create_task(client, old_token)
    old_id = int(claims(old_token)["sub"])
    await client.close()
    secret = config.secret_path.read_text()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{config.db_path}{suffix}").unlink(missing_ok=True)

    client = await serve(aiohttp_client, create_app(config))
    new_token = await register(client, "mallory")
    assert config.secret_path.read_text() == secret
    assert int(claims(new_token)["sub"]) == old_id  # the id the old token names is taken
    await assert_token_dead(client, old_token)
    assert await me_status(client, old_token) == (401, "invalid_token")
    assert (await me_status(client, new_token))[0] == 200


# -- logout --------------------------------------------------------------------------------


async def test_logout_ends_the_token_at_once(client):
    """POST /auth/logout: 204; that token is 401 everywhere and its open socket closes 4401,
    while another session of the same user goes on."""
    await register(client, "alice")
    token, other = await login(client, "alice"), await login(client, "alice")
    ws, other_ws = await ws_connect(client, token), await ws_connect(client, other)
    resp = await client.post(f"{API}/auth/logout", headers=auth_headers(token))
    assert resp.status == 204 and await resp.read() == b""
    await assert_closed_4401(ws)
    await assert_token_dead(client, token)
    assert (await me_status(client, other))[0] == 200
    await assert_open(other_ws)
    await other_ws.close()


async def test_logout_all_ends_every_session_of_the_user(client):
    """?all=true logs every session of the user out; other users are untouched."""
    await register(client, "alice")
    bob = await register(client, "bob")
    first, second = await login(client, "alice"), await login(client, "alice")
    sockets = [await ws_connect(client, first), await ws_connect(client, second)]
    bobs_ws = await ws_connect(client, bob)
    resp = await client.post(f"{API}/auth/logout?all=true", headers=auth_headers(first))
    assert resp.status == 204
    for ws in sockets:
        await assert_closed_4401(ws)
    for token in (first, second):
        await assert_token_dead(client, token)
    assert (await me_status(client, bob))[0] == 200
    await assert_open(bobs_ws)
    await bobs_ws.close()


async def test_logout_needs_a_valid_token_and_a_valid_query(client):
    """Logout without a token is 401; ?all=maybe is 422 and logs nothing out."""
    token = await register(client, "alice")
    await assert_error_shape(await client.post(f"{API}/auth/logout"), 401, "missing_token")
    resp = await client.post(f"{API}/auth/logout?all=maybe", headers=auth_headers(token))
    await assert_error_shape(resp, 422, "validation_error")
    assert (await me_status(client, token))[0] == 200


# -- password change ---------------------------------------------------------------------


async def change_password(client: Any, token: str, current: str, new: str) -> Any:
    return await client.post(
        f"{API}/auth/password",
        json={"current_password": current, "new_password": new},
        headers=auth_headers(token),
    )


async def test_password_change_revokes_every_session(client):
    """The right current password: 204, every session of the user ends, old password void."""
    await register(client, "alice")
    token, other = await login(client, "alice"), await login(client, "alice")
    ws = await ws_connect(client, other)
    resp = await change_password(client, token, PASSWORD, "brand-new-password")
    assert resp.status == 204
    await assert_closed_4401(ws)
    for old in (token, other):
        await assert_token_dead(client, old)
    resp = await client.post(f"{API}/auth/login", json={"username": "alice", "password": PASSWORD})
    await assert_error_shape(resp, 401, "invalid_credentials")
    assert (await me_status(client, await login(client, "alice", "brand-new-password")))[0] == 200


async def test_password_change_refuses_a_wrong_or_weak_password(client):
    """Wrong current → 401 invalid_credentials, short new → 422; neither changes anything."""
    token = await register(client, "alice")
    resp = await change_password(client, token, "not-my-password", "brand-new-password")
    await assert_error_shape(resp, 401, "invalid_credentials")
    resp = await change_password(client, token, PASSWORD, "short")
    error = await assert_error_shape(resp, 422, "validation_error")
    assert list(error["fields"]) == ["new_password"]
    resp = await client.post(
        f"{API}/auth/password",
        json={"new_password": "brand-new-password"},
        headers=auth_headers(token),
    )
    await assert_error_shape(resp, 422, "validation_error")
    assert (await me_status(client, token))[0] == 200
    await login(client, "alice")  # the old password still works


# -- refresh -------------------------------------------------------------------------------


async def test_refresh_chain_ends_at_session_max_age(aiohttp_client, make_app):
    """Refreshing keeps the session and never passes login + --session-max-age; then 401
    session_expired, and only a new login helps."""
    client = await serve(aiohttp_client, make_app(session_max_age=2))
    await register(client, "alice")
    token = await login(client, "alice")
    first = claims(token)
    assert first["exp"] == first["iat"] + 2
    refreshed = 0

    async def session_over() -> bool:
        nonlocal token, refreshed
        resp = await client.post(f"{API}/auth/refresh", headers=auth_headers(token))
        body = await resp.json()
        if resp.status == 401:
            assert body["error"]["code"] == "session_expired", body
            return True
        assert resp.status == 200, body
        new = claims(body["access_token"])
        assert new["sid"] == first["sid"] and new["exp"] <= first["iat"] + 2
        assert body["expires_in"] == new["exp"] - new["iat"] >= 1
        token, refreshed = body["access_token"], refreshed + 1
        return False

    await eventually(session_over, timeout=10)
    assert refreshed >= 1
    assert (await me_status(client, token))[0] == 401
    assert (await me_status(client, await login(client, "alice")))[0] == 200


async def test_refresh_of_an_expired_token_in_a_live_session_is_token_expired(
    aiohttp_client, make_app
):
    """A token past its own exp (the session still alive) is 401 token_expired, as before."""
    client = await serve(aiohttp_client, make_app(token_ttl=1))
    await register(client, "alice")
    token = await login(client, "alice")

    async def expired() -> bool:
        return (await me_status(client, token)) == (401, "token_expired")

    await eventually(expired)
    resp = await client.post(f"{API}/auth/refresh", headers=auth_headers(token))
    await assert_error_shape(resp, 401, "token_expired")


# -- revocation from elsewhere -----------------------------------------------------------


async def test_a_session_revoked_in_the_database_ends_within_seconds(client, config):
    """Revoked behind this node's back (another node, an operator): its token is refused and
    its open socket closed 4401 within a few cache lifetimes."""
    await register(client, "alice")
    token = await login(client, "alice")
    ws = await ws_connect(client, token)
    assert (await me_status(client, token))[0] == 200  # now cached as alive
    with contextlib.closing(sqlite3.connect(config.db_path)) as db, db:
        db.execute(
            "UPDATE sessions SET revoked_at = '2026-01-01T00:00:00.000Z' WHERE id = ?",
            (claims(token)["sid"],),
        )

    async def refused() -> bool:
        return (await me_status(client, token)) == (401, "invalid_token")

    await eventually(refused, timeout=3 * CACHE_TTL)
    msg = await ws.receive(timeout=3 * CACHE_TTL)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4401)


# -- the session service against a real database ------------------------------------------


@pytest.fixture
async def accounts(tmp_path):
    db = await open_database(tmp_path / "s.db", PROJECT_ROOT / "migrations" / "sqlite")
    accounts = AccountStore(db)
    await accounts.create_user("alice", "x", "2026-01-01T00:00:00.000Z")
    yield accounts
    await db.close()


def identity(session: Any) -> Identity:
    return Identity(session.user_id, session.id, session.expires_at)


async def test_logins_beyond_the_cap_revoke_the_oldest_session(accounts, tmp_path):
    """More than max_per_user live sessions: the oldest is revoked (and its sockets told);
    dead rows are deleted at the next login, so the table stays bounded."""
    ended: list[set[str]] = []
    sessions = SessionService(accounts, 3600, max_per_user=2)
    sessions.add_listener(ended.append)
    first, second, third = [await sessions.create(1) for _ in range(3)]
    assert ended == [{first.id}]
    with pytest.raises(Unauthorized) as exc:
        await sessions.check(identity(first))
    assert exc.value.code == "invalid_token"
    for alive in (second, third):
        assert await sessions.check(identity(alive)) == alive.expires_at
    fourth = await sessions.create(1)
    assert ended == [{first.id}, {second.id}]
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        rows = dict(db.execute("SELECT id, revoked_at IS NULL FROM sessions").fetchall())
    # first (revoked before this login) is gone; second was revoked by it.
    assert rows == {second.id: 0, third.id: 1, fourth.id: 1}


async def test_a_session_belongs_to_its_user_and_ends_at_its_max_age(accounts):
    """Another user's id with a real session id is refused; so is a session past its end."""
    sessions = SessionService(accounts, 3600)
    session = await sessions.create(1)
    with pytest.raises(Unauthorized):
        await sessions.check(Identity(2, session.id, session.expires_at))
    assert session.expires_at - time.time() <= 3600
    short = SessionService(accounts, 1, cache_ttl=0.0)
    ended = await short.create(1)

    async def expired() -> bool:
        try:
            await short.check(identity(ended))
        except Unauthorized as exc:
            return exc.code == "session_expired"
        return False

    await eventually(expired)
