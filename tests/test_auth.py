"""Auth over HTTP: forged, expired and malformed tokens are 401; passwords are scrypt hashes."""

from __future__ import annotations

import base64
import contextlib
import json
import sqlite3
import time
import warnings
from typing import Any

import jwt
import pytest
from jwt.warnings import InsecureKeyLengthWarning

from .helpers import PASSWORD, SECRET, auth_headers, create_task, register

API = "/api/v1"
OTHER_SECRET = "another-secret-0123456789abcdef0123456789"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    """A JWT built by hand (any header, any signature)."""
    parts = [json.dumps(header).encode(), json.dumps(claims).encode()]
    return ".".join([*(_b64url(p) for p in parts), signature])


def _claims(user_id: int, **changes: Any) -> dict[str, Any]:
    """Claims like the server's own; `changes` set or (with None) drop claims."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": str(user_id), "name": "alice", "iat": now, "exp": now + 600}
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
    _, uid = alice
    token = jwt.encode(_claims(uid), SECRET, algorithm="HS256")
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
    _, uid = alice
    forged = jwt.encode(_claims(uid), OTHER_SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(forged), "invalid_token")


async def test_tampered_payload_is_401(client, alice):
    """Swapping the payload of a real token (another sub) breaks its signature: 401."""
    token, uid = alice
    bob_token = await register(client, "bob")
    header, _, signature = token.split(".")
    payload = _b64url(json.dumps(_claims(uid + 1)).encode())
    await _assert_401(client, auth_headers(f"{header}.{payload}.{signature}"), "invalid_token")
    assert await _user_id(client, bob_token) == uid + 1  # bob exists: a real target


async def test_alg_none_token_from_pyjwt_is_401(client, alice):
    """An unsigned alg "none" token made by pyjwt is 401."""
    _, uid = alice
    forged = jwt.encode(_claims(uid), key=None, algorithm="none")
    assert forged.endswith(".")
    await _assert_401(client, auth_headers(forged), "invalid_token")


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("with_signature", [False, True])
async def test_alg_none_token_by_hand_is_401(client, alice, alg, with_signature):
    """Hand-built alg none tokens (any case; with or without the real signature) are 401."""
    token, uid = alice
    signature = token.split(".")[2] if with_signature else ""
    forged = _unsigned({"alg": alg, "typ": "JWT"}, _claims(uid), signature)
    await _assert_401(client, auth_headers(forged), "invalid_token")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
async def test_other_hmac_algorithms_are_401(client, alice, alg):
    """Only HS256 is accepted, even with the right secret."""
    _, uid = alice
    with warnings.catch_warnings():  # our 44-byte test secret is short for HS384/HS512
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        forged = jwt.encode(_claims(uid), SECRET, algorithm=alg)
    await _assert_401(client, auth_headers(forged), "invalid_token")


# -- claims ------------------------------------------------------------------------------


async def test_expired_token_is_401(client, alice):
    """A token whose exp has passed is 401 token_expired."""
    _, uid = alice
    past = int(time.time()) - 60
    expired = jwt.encode(_claims(uid, iat=past - 600, exp=past), SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(expired), "token_expired")


async def test_token_expired_one_second_ago_is_401(client, alice):
    """There is no leeway that keeps a just-expired token alive."""
    _, uid = alice
    now = int(time.time())
    expired = jwt.encode(_claims(uid, iat=now - 60, exp=now - 1), SECRET, algorithm="HS256")
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
    ],
)
async def test_token_with_bad_claims_is_401(client, alice, changes, why):
    """Correctly signed tokens without exp/sub, or with malformed ones, are 401."""
    _, uid = alice
    forged = jwt.encode(_claims(uid, **changes), SECRET, algorithm="HS256")
    await _assert_401(client, auth_headers(forged))


async def test_token_of_a_user_that_does_not_exist_is_401(client, alice):
    """A correctly signed token for an unknown user id cannot act: 401 on me and on create."""
    _, uid = alice
    ghost = jwt.encode(_claims(uid + 1000), SECRET, algorithm="HS256")
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
        jwt.encode(_claims(uid), OTHER_SECRET, algorithm="HS256"),
        jwt.encode(_claims(uid), key=None, algorithm="none"),
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


async def test_password_is_stored_as_a_salted_scrypt_hash(client, config):
    """The stored hash is scrypt, never the password, and salted (same password, other hash)."""
    await register(client, "alice")
    await register(client, "bob")
    hashes = _password_hashes(config.db_path)
    assert set(hashes) == {"alice", "bob"}
    for stored in hashes.values():
        assert stored != PASSWORD
        assert PASSWORD not in stored
        assert stored.startswith("scrypt$")
        scheme, n, r, p, salt, digest = stored.split("$")
        assert int(n) >= 2**14 and int(r) >= 8 and int(p) >= 1
        assert len(base64.b64decode(salt)) >= 16
        assert len(base64.b64decode(digest)) >= 32
    assert hashes["alice"] != hashes["bob"]


async def test_password_hash_verifies_with_scrypt(client, config):
    """The stored digest is hashlib.scrypt of the password with the stored salt and cost."""
    import hashlib

    await register(client, "alice")
    _, n, r, p, salt, digest = _password_hashes(config.db_path)["alice"].split("$")
    expected = base64.b64decode(digest)
    actual = hashlib.scrypt(
        PASSWORD.encode(),
        salt=base64.b64decode(salt),
        n=int(n),
        r=int(r),
        p=int(p),
        maxmem=64 * 1024 * 1024,
        dklen=len(expected),
    )
    assert actual == expected


async def test_password_is_never_echoed(client):
    """Neither register nor login responses contain the password or its hash."""
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    text = await resp.text()
    assert PASSWORD not in text and "scrypt" not in text
    resp = await client.post(f"{API}/auth/login", json={"username": "alice", "password": PASSWORD})
    text = await resp.text()
    assert PASSWORD not in text and "scrypt" not in text
