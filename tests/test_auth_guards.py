"""The anonymous routes' guards: body size, form fields, per-address rate, login throttle.

Rates are set so that no token comes back during a test; the throttle is driven by a fake
clock, except where a test waits for a real (1 s) delay to pass by polling.
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from server.auth import FREE_FAILURES, MAX_DELAY, MAX_USERNAMES, LoginThrottle
from server.errors import TooManyRequests
from server.web.guards import (
    AUTH_BODY_BYTES,
    client_address,
    parse_address,
    parse_networks,
    rate_key,
)
from server.web.keys import accounts_key, metrics_key, passwords_key

from .helpers import PASSWORD, TIMEOUT, auth_headers, eventually, register
from .test_auth import _blocker
from .test_error_shape import assert_error_shape

API = "/api/v1"
AUTH_PATHS = ("register", "login", "refresh", "logout", "password")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _login(client: Any, username: str, password: str = PASSWORD, **kwargs: Any) -> Any:
    return await client.post(
        f"{API}/auth/login", json={"username": username, "password": password}, **kwargs
    )


async def _raw(client: Any, head: bytes, body: bytes = b"") -> tuple[int, dict[str, Any]]:
    """Send `head` (and `body`) on a raw connection; the status and JSON of the answer.

    Nothing more is sent: if the server waited for the rest of a declared body, this
    would time out instead of answering.
    """
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(head + body)
        await writer.drain()
        async with asyncio.timeout(TIMEOUT):
            status_line = await reader.readline()
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            payload = await reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), json.loads(payload)
    finally:
        writer.close()


def _head(path: str, *lines: str) -> bytes:
    return "\r\n".join([f"POST {API}/auth/{path} HTTP/1.1", "Host: x", *lines, "", ""]).encode()


# -- body size and form fields -----------------------------------------------------------


@pytest.mark.parametrize("path", AUTH_PATHS)
async def test_declared_body_over_4_kib_is_refused_before_it_is_sent(client, path):
    """Content-Length over 4 KiB (here 1 MiB that never comes) is 413 at once, on every route."""
    token = await register(client, f"user-{path}")
    head = _head(
        path,
        "Content-Type: application/json",
        f"Authorization: Bearer {token}",
        f"Content-Length: {1024 * 1024}",
    )
    status, body = await _raw(client, head)
    assert (status, body["error"]["code"]) == (413, "payload_too_large")
    assert client.app[metrics_key].refusals.counts["auth_body_too_large"] >= 1


async def test_chunked_body_is_read_only_up_to_the_limit(client):
    """A chunked login body is refused once it passes 4 KiB, though it never ends."""
    head = _head("login", "Content-Type: application/json", "Transfer-Encoding: chunked")
    chunk = b"x" * (AUTH_BODY_BYTES + 100)
    status, body = await _raw(client, head, b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert (status, body["error"]["code"]) == (413, "payload_too_large")


async def test_1_mib_login_body_is_413_and_the_server_goes_on(client):
    """A whole 1 MiB login body gets 413; the same client then logs in normally."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/login",
        data=io.BytesIO(b'{"username": "alice", "password": "' + b"p" * (1024 * 1024) + b'"}'),
        headers={"Content-Type": "application/json"},
    )
    await assert_error_shape(resp, 413, "payload_too_large")
    assert (await _login(client, "alice")).status == 200


async def test_a_body_of_exactly_4_kib_is_accepted(client):
    """The limit is inclusive: a 4096-byte login body is read and answered."""
    await register(client, "alice")
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    body = body[:-1] + b" " * (AUTH_BODY_BYTES - len(body)) + b"}"
    assert len(body) == AUTH_BODY_BYTES
    resp = await client.post(
        f"{API}/auth/login", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 200, await resp.text()


async def test_form_with_too_many_fields_is_400(client):
    """A login form of many small fields is 400, not parsed field by field."""
    await register(client, "alice")
    form = "&".join(["a=1"] * 500) + f"&username=alice&password={PASSWORD}"
    resp = await client.post(
        f"{API}/auth/login",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    error = await assert_error_shape(resp, 400, "bad_request")
    assert "fields" in error["message"]


async def test_50k_field_form_is_refused(client):
    """A 50 000-field form is refused (it is far over the size limit) and nothing is parsed."""
    form = "&" * 50_000 + "username=alice&password=x"
    resp = await client.post(
        f"{API}/auth/login",
        data=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await assert_error_shape(resp, 413, "payload_too_large")


# -- per-address rate ----------------------------------------------------------------------


async def test_auth_rate_limits_attempts_per_address(aiohttp_client, make_app):
    """--auth-rate 3: the 4th login or register from one address within a minute is 429."""
    client = await aiohttp_client(make_app(auth_rate=3))
    for name in ("a1", "a2", "a3"):  # other names each time: the username throttle is apart
        assert (await _login(client, name, "wrong-password")).status == 401
    resp = await _login(client, "a4")
    error = await assert_error_shape(resp, 429, "rate_limited")
    assert "per minute" in error["message"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 20
    resp = await client.post(f"{API}/auth/register", json={"username": "zed", "password": PASSWORD})
    await assert_error_shape(resp, 429, "rate_limited")
    assert await client.app[accounts_key].find_user("zed") is None
    assert client.app[metrics_key].refusals.counts["auth_rate"] == 2


async def test_auth_rate_zero_is_off(aiohttp_client, make_app):
    """--auth-rate 0: no per-address limit at all."""
    client = await aiohttp_client(make_app(auth_rate=0))
    for i in range(30):
        assert (await _login(client, f"nobody{i}", "wrong-password")).status == 401


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(aiohttp_client, make_app):
    """Without --trusted-proxies, X-Forwarded-For cannot buy a client fresh attempts."""
    client = await aiohttp_client(make_app(auth_rate=2))
    for i in range(2):
        headers = {"X-Forwarded-For": f"198.51.100.{i}"}
        assert (await _login(client, f"u{i}", "wrong-password", headers=headers)).status == 401
    resp = await _login(client, "u3", headers={"X-Forwarded-For": "198.51.100.99"})
    await assert_error_shape(resp, 429, "rate_limited")


async def test_trusted_proxy_counts_per_forwarded_client(aiohttp_client, make_app):
    """Behind a trusted proxy each forwarded client has its own attempts; spoofing the left
    part of X-Forwarded-For does not help."""
    client = await aiohttp_client(make_app(auth_rate=2, trusted_proxies=("127.0.0.0/8",)))

    async def attempt(forwarded: str) -> int:
        resp = await _login(client, "nobody", "wrong", headers={"X-Forwarded-For": forwarded})
        return resp.status

    assert [await attempt("203.0.113.5") for _ in range(2)] == [401, 401]
    assert await attempt("203.0.113.5") == 429
    # The proxy appends the real peer; what the client wrote is to its left.
    assert await attempt("10.9.9.9, 203.0.113.5") == 429
    assert await attempt("203.0.113.6") == 401  # another client behind the proxy


def _request(remote: str, *forwarded: str) -> Any:
    headers = [("X-Forwarded-For", value) for value in forwarded]
    return make_mocked_request("POST", "/", headers=headers).clone(remote=remote)


@pytest.mark.parametrize(
    ("remote", "forwarded", "trusted", "expected"),
    [
        ("198.51.100.7", ["1.2.3.4"], [], "198.51.100.7"),  # no proxies: header ignored
        ("198.51.100.7", ["1.2.3.4"], ["10.0.0.0/8"], "198.51.100.7"),  # peer not a proxy
        ("10.0.0.2", [], ["10.0.0.0/8"], "10.0.0.2"),  # a proxy's own request
        ("10.0.0.2", ["1.2.3.4"], ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], ["10.0.0.0/8"], "1.2.3.4"),  # spoofed left part
        ("10.0.0.2", ["6.6.6.6", "1.2.3.4, 10.0.0.3"], ["10.0.0.0/8"], "1.2.3.4"),  # 2 proxies
        ("10.0.0.2", ["10.0.0.5, 10.0.0.3"], ["10.0.0.0/8"], "10.0.0.5"),  # all ours
        ("10.0.0.2", ["[2001:db8::1]:443"], ["10.0.0.0/8"], "2001:db8::1"),
        ("10.0.0.2", ["1.2.3.4:5678"], ["10.0.0.0/8"], "1.2.3.4"),
        ("10.0.0.2", ["unknown"], ["10.0.0.0/8"], "unknown"),
        ("::ffff:10.0.0.2", ["1.2.3.4"], ["10.0.0.2"], "1.2.3.4"),  # v4-mapped peer
    ],
)
def test_client_address(remote, forwarded, trusted, expected):
    """The right-most X-Forwarded-For entry that is not a trusted proxy, from a proxy only."""
    assert client_address(_request(remote, *forwarded), parse_networks(trusted)) == expected


def test_ipv6_clients_are_counted_per_64():
    """One IPv6 host's /64 is one key; IPv4 addresses are their own."""
    assert rate_key("2001:db8::1") == rate_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert rate_key("2001:db8:0:1::1") != rate_key("2001:db8::1")
    assert rate_key("192.0.2.1") == "192.0.2.1"
    assert parse_address("::ffff:192.0.2.1") == parse_address("192.0.2.1")
    assert parse_address("not an address") is None


# -- per-username login throttle ---------------------------------------------------------


def test_throttle_grows_resets_and_never_exceeds_its_cap():
    """Waits after FREE_FAILURES failures: 1, 2, 4, 8, 16 s, then MAX_DELAY; success resets."""
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    waits = []
    for _ in range(FREE_FAILURES):
        throttle.attempt("alice")  # each let through, counted until it succeeds
    for _ in range(10):
        wait = throttle.wait("alice")
        waits.append(wait)
        assert wait <= MAX_DELAY
        clock.now += wait
        throttle.attempt("alice")
    assert waits == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    assert throttle.wait("ALICE") == MAX_DELAY  # names compare without case
    assert throttle.wait("bob") == 0
    throttle.succeeded("Alice")
    assert throttle.wait("alice") == 0


def test_throttle_refuses_with_retry_after_until_the_wait_passed():
    """While a name must wait, attempts raise 429 login_throttled and do not add to it."""
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES + 1):
        clock.now += 100
        throttle.attempt("alice")
    for _ in range(50):  # refused attempts do not make the wait longer
        with pytest.raises(TooManyRequests) as exc:
            throttle.attempt("alice")
        assert exc.value.status == 429 and exc.value.code == "login_throttled"
        assert exc.value.headers["Retry-After"] == "2"
    clock.now += 2
    throttle.attempt("alice")


def test_throttle_forgets_old_failures_and_bounds_its_memory():
    """A name idle for FORGET_AFTER starts afresh; at most MAX_USERNAMES names are held."""
    clock = FakeClock()
    throttle = LoginThrottle(clock)
    for _ in range(FREE_FAILURES + 3):
        clock.now += 100
        throttle.attempt("alice")
    clock.now += 15 * 60
    assert throttle.wait("alice") == 0
    for i in range(MAX_USERNAMES + 10):
        throttle.attempt(f"name{i}")
    assert len(throttle) == MAX_USERNAMES


async def test_login_throttle_over_http(client):
    """5 wrong passwords, then 429 login_throttled (even with the right one) until the wait
    passes; other names are not affected; success resets."""
    await register(client, "alice")
    await register(client, "bob")
    for _ in range(FREE_FAILURES):
        assert (await _login(client, "alice", "wrong-password")).status == 401
    resp = await _login(client, "alice", "wrong-password")
    assert (await _login(client, "bob")).status == 200
    await assert_error_shape(resp, 429, "login_throttled")
    assert resp.headers["Retry-After"] == "1"
    assert client.app[metrics_key].refusals.counts["login_throttled"] >= 1

    async def logged_in() -> bool:
        resp = await _login(client, "alice")
        assert resp.status in (200, 429)
        return resp.status == 200

    await eventually(logged_in)
    assert (await _login(client, "alice", "wrong-password")).status == 401  # reset: free again


async def test_login_throttle_is_checked_before_any_hashing(aiohttp_client, make_app):
    """A throttled name is answered 429 although every hashing thread is taken."""
    client = await aiohttp_client(make_app(password_hash_workers=1, password_hash_queue=0))
    for _ in range(FREE_FAILURES):
        assert (await _login(client, "ghost", "wrong-password")).status == 401
    started, release, fn = _blocker()
    running = asyncio.create_task(client.app[passwords_key].run(fn))
    try:
        await asyncio.to_thread(started.wait, TIMEOUT)
        await assert_error_shape(await _login(client, "ghost"), 429, "login_throttled")
        await assert_error_shape(await _login(client, "other"), 503, "overloaded")
    finally:
        release.set()
        await running


async def test_unknown_and_real_names_are_throttled_alike(client):
    """The throttle does not tell which usernames exist: both get 429 after 5 failures."""
    await register(client, "alice")
    for name in ("alice", "nobody"):
        for _ in range(FREE_FAILURES):
            assert (await _login(client, name, "wrong-password")).status == 401
        await assert_error_shape(await _login(client, name, "wrong"), 429, "login_throttled")


async def test_concurrent_guesses_cannot_slip_past_the_throttle(client):
    """20 guesses at once for one name: 5 are checked, the others refused before hashing."""
    await register(client, "alice")
    answers = await asyncio.gather(*(_login(client, "alice", f"guess-{i}") for i in range(20)))
    statuses = sorted(resp.status for resp in answers)
    assert statuses == [401] * FREE_FAILURES + [429] * (20 - FREE_FAILURES)


async def test_password_change_is_throttled_like_login(client):
    """Wrong current passwords on /auth/password count for the user's name, as at login."""
    token = await register(client, "alice")
    for _ in range(FREE_FAILURES):
        resp = await client.post(
            f"{API}/auth/password",
            json={"current_password": "wrong-password", "new_password": "new-password-1"},
            headers=auth_headers(token),
        )
        await assert_error_shape(resp, 401, "invalid_credentials")
    resp = await client.post(
        f"{API}/auth/password",
        json={"current_password": PASSWORD, "new_password": "new-password-1"},
        headers=auth_headers(token),
    )
    await assert_error_shape(resp, 429, "login_throttled")
    await assert_error_shape(await _login(client, "alice"), 429, "login_throttled")


# -- registration ------------------------------------------------------------------------


async def test_closed_registration_is_403(aiohttp_client, make_app):
    """--registration closed: register is 403 registration_closed and creates nothing."""
    client = await aiohttp_client(make_app(registration="closed"))
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    error = await assert_error_shape(resp, 403, "registration_closed")
    assert "operator" in error["message"]
    assert await client.app[accounts_key].find_user("alice") is None
    assert (await _login(client, "alice")).status == 401
