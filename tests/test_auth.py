"""Auth over HTTP: forged, expired and malformed tokens are 401; passwords are argon2id hashes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import sqlite3
import threading
import time
import warnings
from typing import Any

import argon2
import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from server.auth import HashBusy, Passwords
from server.web.keys import metrics_key, passwords_key

from .helpers import (
    MS,
    PASSWORD,
    SECRET,
    TIMEOUT,
    auth_headers,
    create_task,
    eventually,
    register,
)
from .test_error_shape import assert_error_shape

API = "/api/v1"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    """A JWT built by hand (any header, any signature)."""
    parts = [json.dumps(header).encode(), json.dumps(claims).encode()]
    return ".".join([*(_b64url(p) for p in parts), signature])


def _claims(token: str, **changes: Any) -> dict[str, Any]:
    """The claims of a real `token` (its sub, sid, db), fresh iat/exp; `changes` set or
    (with None) drop claims."""
    real = jwt.decode(token, options={"verify_signature": False})
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": real["sub"],
        "sid": real["sid"],
        "db": real["db"],
        "iat": now,
        "exp": now + 600,
    }
    for key, value in changes.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    return claims


async def _user_id(client: Any, token: str) -> int:
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(token))
    assert resp.status == 200
    return (await resp.json())["id"]


async def _assert_401(client: Any, headers: dict[str, str], code: str | None = None) -> None:
    """GET /auth/me and GET /tasks with `headers` are both 401 JSON errors."""
    for path in (f"{API}/auth/me", f"{API}/tasks"):
        resp = await client.get(path, headers=headers)
        assert resp.status == 401, (path, await resp.text())
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert isinstance(error["message"], str) and error["fields"] == {}
        if code is not None:
            assert error["code"] == code
        assert "Bearer" in resp.headers.get("WWW-Authenticate", "Bearer")


@pytest.fixture
async def alice(client: Any) -> tuple[str, int]:
    """A registered user: (token, id)."""
    token = await register(client, "alice")
    return token, await _user_id(client, token)


# -- sanity: the forging helpers produce tokens the server accepts when honest ---------


async def test_hand_signed_token_with_the_real_secret_works(client, alice):
    """Control: a token signed with the server's secret and HS256 is accepted."""
    real, uid = alice
    token = jwt.encode(_claims(real), SECRET, algorithm="HS256")
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(token))
    assert resp.status == 200
    assert (await resp.json())["id"] == uid


async def test_bearer_scheme_is_case_insensitive(client, alice):
    """`bearer <token>` (lower case scheme) is accepted, as RFC 7235 allows."""
    token, _ = alice
    resp = await client.get(f"{API}/auth/me", headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200


# -- missing and malformed ---------------------------------------------------------------


async def test_missing_token_is_401(client, alice):
    """No Authorization header at all is 401 missing_token."""
    await _assert_401(client, {}, "missing_token")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "Basic YWxpY2U6Y29ycmVjdCBob3JzZQ==",
        "Token {token}",
        "{token}",
        "Bearer{token}",
        "Bearer not-a-jwt",
        "Bearer a.b.c",
        "Bearer {token}x",
        "Bearer {token} extra",
        "Bearer {token}.{token}",
    ],
)
async def test_malformed_authorization_header_is_401(client, alice, value):
    """Wrong schemes, empty or garbled tokens are 401."""
    token, _ = alice
    await _assert_401(client, {"Authorization": value.format(token=token)})


async def test_token_in_query_string_is_not_accepted_over_http(client, alice):
    """?token= works only for WebSocket upgrades, not for the HTTP API."""
    token, _ = alice
    resp = await client.get(f"{API}/auth/me", params={"token": token})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "missing_token"


# -- forged ------------------------------------------------------------------------------


async def test_token_signed_with_another_secret_is_401(client, alice):
    """A well-formed HS256 token signed with another secret is 401."""
    token, _ = alice
    forged = jwt.encode(_claims(token), OTHER_SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(forged), "invalid_token")


async def test_tampered_payload_is_401(client, alice):
    """Swapping the payload of a real token (another sub) breaks its signature: 401."""
    token, uid = alice
    bob_token = await register(client, "bob")
    header, _, signature = token.split(".")
    payload = _b64url(json.dumps(_claims(token, sub=str(uid + 1))).encode())
    await _assert_401(client, auth_headers(f"{header}.{payload}.{signature}"), "invalid_token")
    assert await _user_id(client, bob_token) == uid + 1  # bob exists: a real target


async def test_alg_none_token_from_pyjwt_is_401(client, alice):
    """An unsigned alg "none" token made by pyjwt is 401."""
    token, _ = alice
    forged = jwt.encode(_claims(token), key=None, algorithm="none")
    assert forged.endswith(".")
    await _assert_401(client, auth_headers(forged), "invalid_token")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("with_signature", [False, True])
async def test_alg_none_token_by_hand_is_401(client, alice, alg, with_signature):
    """Hand-built alg none tokens (any case; with or without the real signature) are 401."""
    token, _ = alice
    signature = token.split(".")[2] if with_signature else ""
    forged = _unsigned({"alg": alg, "typ": "JWT"}, _claims(token), signature)
    await _assert_401(client, auth_headers(forged), "invalid_token")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_other_hmac_algorithms_are_401(client, alice, alg):
    """Only HS256 is accepted, even with the right secret."""
    token, _ = alice
    with warnings.catch_warnings():  # our 44-byte test secret is short for HS384/HS512
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        forged = jwt.encode(_claims(token), SECRET, algorithm=alg)
    await _assert_401(client, auth_headers(forged), "invalid_token")


# -- claims ------------------------------------------------------------------------------


async def test_expired_token_is_401(client, alice):
    """A token whose exp has passed is 401 token_expired."""
    token, _ = alice
    past = int(time.time()) - 60
    expired = jwt.encode(_claims(token, iat=past - 600, exp=past), SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(expired), "token_expired")


async def test_token_expired_one_second_ago_is_401(client, alice):
    """There is no leeway that keeps a just-expired token alive."""
    token, _ = alice
    now = int(time.time())
    expired = jwt.encode(_claims(token, iat=now - 60, exp=now - 1), SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(expired), "token_expired")


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"exp": None}, "no exp"),
        ({"sub": None}, "no sub"),
        ({"sub": None, "exp": None}, "no claims that matter"),
        ({"sub": "abc"}, "non-integer sub"),
        ({"sub": "1.5"}, "fractional sub"),
        ({"sub": ""}, "empty sub"),
        ({"sub": 1}, "sub not a string"),
        ({"sub": [1]}, "sub a list"),
        ({"exp": "never"}, "exp not a number"),
        ({"nbf": int(time.time()) + 3600}, "not valid yet"),
        ({"sid": None}, "no session (a token from before sessions)"),
        ({"sid": "x" * 32}, "unknown session"),
        ({"sid": 7}, "sid not a string"),
        ({"db": None}, "no database id"),
        ({"db": "0" * 32}, "another database's id"),
        ({"iat": None}, "no iat"),
    ],
)
async def test_token_with_bad_claims_is_401(client, alice, changes, why):
    """Correctly signed tokens without exp/sub/sid/db/iat, or with malformed ones, are 401."""
    token, _ = alice
    forged = jwt.encode(_claims(token, **changes), SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(forged), "invalid_token")


async def test_token_of_a_user_that_does_not_exist_is_401(client, alice):
    """A correctly signed token for an unknown user id cannot act: 401 on me and on create."""
    token, uid = alice
    ghost = jwt.encode(_claims(token, sub=str(uid + 1000)), SECRET, algorithm="HS256")
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(ghost))
    assert resp.status == 401
    resp = await client.post(f"{API}/tasks", json={"kind": "x"}, headers=auth_headers(ghost))
    assert resp.status == 401, await resp.text()
    resp = await client.post(
        f"{API}/stock/analyze", json={"code": "AAPL"}, headers=auth_headers(ghost)
    )
    assert resp.status == 401, await resp.text()


async def test_forged_token_cannot_touch_a_task(client, alice):
    """A forged token for the owner can neither read nor write the owner's task."""
    token, uid = alice
    task = await create_task(client, token)
    for forged in (
        jwt.encode(_claims(token), OTHER_SECRET, algorithm="HS256"),
        jwt.encode(_claims(token), key=None, algorithm="none"),
    ):
        headers = auth_headers(forged)
        resp = await client.get(f"{API}/tasks/{task['id']}", headers=headers)
        assert resp.status == 401
        resp = await client.post(
            f"{API}/tasks/{task['id']}/progress", json={"progress": 5}, headers=headers
        )
        assert resp.status == 401
        resp = await client.post(f"{API}/tasks/{task['id']}/cancel", headers=headers)
        assert resp.status == 401
    resp = await client.get(f"{API}/tasks/{task['id']}/events", headers=auth_headers(token))
    assert [e["event"] for e in (await resp.json())["events"]] == ["created"]


async def test_server_tokens_carry_sub_and_exp_and_use_hs256(client, alice):
    """Issued tokens are HS256 with a string sub (the user id) and an exp in the future."""
    token, uid = alice
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], options={"require": ["exp", "sub"]})
    assert claims["sub"] == str(uid)
    assert claims["exp"] > time.time()
    assert PASSWORD not in json.dumps(claims)


# -- passwords ---------------------------------------------------------------------------


def _password_hashes(db_path: Any) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return dict(db.execute("SELECT username, password_hash FROM users").fetchall())


def _set_password_hash(db_path: Any, username: str, stored: str) -> None:
    with contextlib.closing(sqlite3.connect(db_path)) as db, db:
        db.execute("UPDATE users SET password_hash = ? WHERE username = ?", (stored, username))


def _scrypt_hash(password: str, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    """A hash as the server stored them before argon2id: scrypt$n$r$p$salt$digest."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=2**26, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


async def _login(client: Any, username: str, password: str = PASSWORD) -> Any:
    return await client.post(f"{API}/auth/login", json={"username": username, "password": password})


async def test_password_is_stored_as_argon2id_at_the_default_cost(aiohttp_client, make_app, config):
    """At the default --password-hash-cost the hash is argon2id, 19 MiB, t=2, p=1, salted."""
    client = await aiohttp_client(make_app(password_hash_cost=19))
    await register(client, "alice")
    await register(client, "bob")
    hashes = _password_hashes(config.db_path)
    assert set(hashes) == {"alice", "bob"}
    for stored in hashes.values():
        assert PASSWORD not in stored
        params = argon2.extract_parameters(stored)
        assert (params.type, params.memory_cost, params.time_cost, params.parallelism) == (
            argon2.Type.ID,
            19 * 1024,
            2,
            1,
        )
        assert params.salt_len >= 16 and params.hash_len >= 32
        assert argon2.PasswordHasher().verify(stored, PASSWORD)  # standard argon2id
    assert hashes["alice"] != hashes["bob"]


async def test_password_is_never_echoed(client):
    """Neither register nor login responses contain the password or its hash."""
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    text = await resp.text()
    assert PASSWORD not in text and "argon2" not in text
    resp = await _login(client, "alice")
    text = await resp.text()
    assert PASSWORD not in text and "argon2" not in text


async def test_legacy_scrypt_hash_logs_in_and_is_rehashed(client, config):
    """An account from before argon2id logs in with its scrypt hash, which becomes argon2id."""
    await register(client, "alice")
    _set_password_hash(config.db_path, "alice", _scrypt_hash(PASSWORD))
    resp = await _login(client, "alice", "wrong-password")
    assert resp.status == 401
    assert _password_hashes(config.db_path)["alice"].startswith("scrypt$")  # kept on failure
    resp = await _login(client, "alice")
    assert resp.status == 200, await resp.text()
    stored = _password_hashes(config.db_path)["alice"]
    assert argon2.extract_parameters(stored).type is argon2.Type.ID
    assert argon2.PasswordHasher().verify(stored, PASSWORD)
    assert (await _login(client, "alice")).status == 200


async def test_weaker_hash_is_rehashed_and_a_stronger_one_kept(aiohttp_client, make_app, config):
    """Raising --password-hash-cost upgrades a hash at the next login; lowering it does not."""
    client = await aiohttp_client(make_app(password_hash_cost=1))
    await register(client, "alice")
    await client.close()
    client = await aiohttp_client(make_app(password_hash_cost=2))
    assert (await _login(client, "alice")).status == 200
    assert argon2.extract_parameters(_password_hashes(config.db_path)["alice"]).memory_cost == 2048
    await client.close()
    client = await aiohttp_client(make_app(password_hash_cost=1))
    assert (await _login(client, "alice")).status == 200
    assert argon2.extract_parameters(_password_hashes(config.db_path)["alice"]).memory_cost == 2048


async def test_a_malformed_stored_hash_never_matches(client, config):
    """A stored hash in no known format (hand-edited, truncated) refuses every password."""
    await register(client, "alice")
    for stored in ("", "!", "scrypt$1$2", "$argon2id$v=19$m=1024,t=2,p=1$bad", "plain"):
        _set_password_hash(config.db_path, "alice", stored)
        resp = await _login(client, "alice", stored or "x")
        assert resp.status == 401, stored


# -- the hashing threads -----------------------------------------------------------------


def _blocker() -> tuple[threading.Event, threading.Event, Any]:
    """(started, release, fn): fn runs on a hashing thread until `release` is set."""
    started, release = threading.Event(), threading.Event()

    def fn() -> str:
        started.set()
        release.wait(TIMEOUT)
        return "done"

    return started, release, fn


async def test_hash_threads_refuse_beyond_their_queue():
    """With every thread busy and the queue full, a hash is refused at once (HashBusy)."""
    refused: list[str] = []
    passwords = Passwords(1, workers=1, queue=1, on_refused=refused.append)
    started, release, fn = _blocker()
    try:
        running = asyncio.create_task(passwords.run(fn))
        await asyncio.to_thread(started.wait, TIMEOUT)
        queued = asyncio.create_task(passwords.hash("queued password"))

        async def one_waiting() -> bool:
            return passwords.waiting == 1

        await eventually(one_waiting)
        with pytest.raises(HashBusy) as exc:
            await passwords.hash("one too many")
        assert exc.value.status == 503 and exc.value.code == "overloaded"
        assert 1 <= int(exc.value.headers["Retry-After"]) <= 3
        assert refused == ["password_hash_busy"]
        release.set()
        assert await running == "done"
        assert (await queued).startswith("$argon2id$")
    finally:
        release.set()
        passwords.close()


async def test_hash_wait_is_bounded_in_time():
    """A hash that cannot get a thread within its wait bound is refused, not queued forever."""
    refused: list[str] = []
    passwords = Passwords(1, workers=1, queue=10, wait_max=10 * MS, on_refused=refused.append)
    started, release, fn = _blocker()
    try:
        running = asyncio.create_task(passwords.run(fn))
        await asyncio.to_thread(started.wait, TIMEOUT)
        with pytest.raises(HashBusy):
            await passwords.hash("waits too long")
        assert refused == ["password_hash_wait"]
        release.set()
        await running
    finally:
        release.set()
        passwords.close()


async def test_login_flood_gets_503_overloaded(aiohttp_client, make_app):
    """While the hashing threads are all taken, logins and registers get 503 + Retry-After."""
    client = await aiohttp_client(make_app(password_hash_workers=1, password_hash_queue=0))
    await register(client, "alice")
    passwords = client.app[passwords_key]
    started, release, fn = _blocker()
    running = asyncio.create_task(passwords.run(fn))
    try:
        await asyncio.to_thread(started.wait, TIMEOUT)
        answers = await asyncio.gather(
            *(_login(client, "alice") for _ in range(5)),
            client.post(f"{API}/auth/register", json={"username": "bob", "password": PASSWORD}),
        )
        for resp in answers:
            await assert_error_shape(resp, 503, "overloaded")
            assert 1 <= int(resp.headers["Retry-After"]) <= 3
        assert client.app[metrics_key].refusals.counts["password_hash_busy"] == 6
    finally:
        release.set()
        await running
    assert (await _login(client, "alice")).status == 200  # served again once a thread is free
    resp = await client.post(f"{API}/auth/register", json={"username": "bob", "password": PASSWORD})
    assert resp.status == 201  # the refused register stored nothing
