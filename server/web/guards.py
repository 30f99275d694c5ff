"""Checks run before a handler does any work: who is calling, from where, how often, how much.

- `authenticate`: the bearer token (or, for WebSockets and SSE, `?token=`): a login token
  and its session, an API key or a share token; then the route's scope.
- `client_address`: the caller's address, believing X-Forwarded-For only from
  `--trusted-proxies`; `rate_key` groups an IPv6 /64 (one host's usual allocation).
- `limit_attempts`: `--auth-rate`, attempts per client address per minute.
- `read_small_body`: the anonymous routes' body, refused beyond AUTH_BODY_BYTES before
  more than that is read.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import time
from collections.abc import Iterable, Sequence

from aiohttp import web

from ..auth import Identity, bearer_token
from ..credentials import is_credential
from ..errors import Forbidden, NotFound, PayloadTooLarge, TooManyRequests, Unauthorized
from .keys import (
    auth_rate_key,
    config_key,
    credentials_key,
    metrics_key,
    sessions_key,
    tokens_key,
    trusted_proxies_key,
)
from .middleware import BodyTimeout

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Largest body of register, login, refresh, logout and password, in bytes.
AUTH_BODY_BYTES = 4 * 1024
#: Most fields of a form body (the OAuth2 password grant has at most six).
FORM_FIELDS_MAX = 16
#: Characters of an X-Forwarded-For entry kept when it is not an address.
_HOP_CHARS = 64


async def authenticate(
    request: web.Request,
    *,
    allow_query: bool,
    scope: str | None = None,
    login_only: bool = False,
    allow_share: bool = False,
) -> Identity:
    """The caller's identity from `Authorization: Bearer` or (WebSocket, SSE) `?token=`.

    The token is a login JWT, an API key (`pk_…`) or a share token (`st_…`). `scope` is
    what the route needs (403 `insufficient_scope` without it); `login_only` routes
    (managing keys, the account) refuse keys and share tokens; a share token is refused
    (403) unless `allow_share`, and on a route of another task answers 404 like a task
    that does not exist.

    Raises Unauthorized: no token (`missing_token`), a bad one (`invalid_token`,
    `token_expired`), or one whose session was logged out or has ended.
    """
    token = bearer_token(request.headers.get("Authorization"))
    if token is None and allow_query:
        token = request.query.get("token") or None
    if token is None:
        raise Unauthorized("missing bearer token", code="missing_token")
    if is_credential(token):
        identity = await _identify_credential(request, token)
    else:
        identity = request.app[tokens_key].verify(token)
        await request.app[sessions_key].check(identity)
    if identity.kind == "login":
        return identity
    if login_only:
        raise Forbidden(
            "this route needs a login token, not an API key or share token",
            code="insufficient_scope",
        )
    if identity.kind == "share":
        if not allow_share:
            raise Forbidden("a share token reads its one task only", code="insufficient_scope")
        route_task = request.match_info.get("task_id")
        if route_task is not None and route_task != identity.task_id:
            raise NotFound("task not found")
    if scope is not None and scope not in identity.scopes:
        raise Forbidden(f"this credential lacks the {scope} scope", code="insufficient_scope")
    return identity


async def _identify_credential(request: web.Request, token: str) -> Identity:
    """An API key or share token; wrong ones spend the address's `--auth-rate` attempts,
    so guessing costs the guesser a 429, not the database a read per guess."""
    buckets = request.app[auth_rate_key]
    key = rate_key(peer_address(request)) if buckets.rate > 0 else None
    now = time.monotonic()
    if key is not None:
        wait = buckets.waiting(key, now)
        if wait > 0.0:
            raise _too_many_guesses(request, wait)
    try:
        return await request.app[credentials_key].identify(token)
    except Unauthorized:
        if key is not None:
            buckets.take(key, now)
        raise


def _too_many_guesses(request: web.Request, wait: float) -> TooManyRequests:
    request.app[metrics_key].refusals.note("credential_rate", f"peer={peer_address(request)}")
    return TooManyRequests(
        "too many invalid API keys or share tokens from this address; wait before retrying",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """`--trusted-proxies` as networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(item, strict=False) for item in items)


@functools.lru_cache(maxsize=4096)  # per request, and ipaddress is slow: a flood repeats
def parse_address(text: str) -> Address | None:
    """An IP address from `1.2.3.4`, `1.2.3.4:80`, `::1` or `[::1]:80`; None if it is not one.

    An IPv4-mapped IPv6 address (`::ffff:1.2.3.4`) is the IPv4 address.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)


def client_address(request: web.BaseRequest, trusted: Sequence[Network]) -> str:
    """The address the request came from, as text.

    The TCP peer, unless the peer is one of `trusted` (a reverse proxy): then the
    right-most X-Forwarded-For entry that is not itself a trusted proxy. Entries to the
    left of it were written by the client and are ignored, so a client cannot pick its
    own address; from an untrusted peer the header is not read at all.
    """
    remote = request.remote or ""
    peer = parse_address(remote)
    if peer is None or not trusted or not _trusted(peer, trusted):
        return str(peer) if peer is not None else remote
    hops = [
        hop.strip()
        for value in request.headers.getall("X-Forwarded-For", ())
        for hop in value.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        address = parse_address(hop)
        if address is None:
            return hop[:_HOP_CHARS]  # what the proxy wrote ("unknown", a name): its key
        if not _trusted(address, trusted):
            return str(address)
    # No header, or every hop is a proxy of ours: the farthest one is the client.
    first = parse_address(hops[0]) if hops else None
    return str(first) if first is not None else str(peer)


@functools.lru_cache(maxsize=4096)
def rate_key(address: str) -> str:
    """What a per-address limit counts by: the address, or its /64 for IPv6.

    An IPv6 host usually holds a whole /64; counted per address it could take a fresh
    address for every attempt.
    """
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return address


def public_origin(request: web.BaseRequest) -> str:
    """The scheme://host clients reach this server at: the request's own, or, from a
    `--trusted-proxies` peer, what its `X-Forwarded-Proto` and `X-Forwarded-Host` say (a
    TLS-terminating proxy talks plain HTTP to us)."""
    scheme, host = request.scheme, request.host
    peer = parse_address(request.remote or "")
    trusted = request.app[trusted_proxies_key]
    if peer is not None and trusted and _trusted(peer, trusted):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
        forwarded_host = request.headers.get("X-Forwarded-Host", "").split(",")[0].strip()
        if forwarded_host and len(forwarded_host) <= 255 and forwarded_host.isprintable():
            host = forwarded_host
    return f"{scheme}://{host}"


def peer_address(request: web.BaseRequest) -> str:
    """`client_address` with the app's `--trusted-proxies`."""
    return client_address(request, request.app[trusted_proxies_key])


def limit_attempts(request: web.Request) -> None:
    """`--auth-rate`: 429 `rate_limited` once this address has used its attempts."""
    buckets = request.app[auth_rate_key]
    if buckets.rate <= 0:
        return
    address = peer_address(request)
    wait = buckets.take(rate_key(address), time.monotonic())
    if wait > 0.0:
        request.app[metrics_key].refusals.note("auth_rate", f"peer={address}")
        raise TooManyRequests(
            f"more than {buckets.burst} login or register attempts per minute from this"
            " address; wait before trying again",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def read_small_body(request: web.Request) -> bytes:
    """The body, at most AUTH_BODY_BYTES (or a smaller --max-body-bytes); 413 beyond.

    A Content-Length over the limit is refused before anything is read; a chunked (or
    compressed) body is read up to one byte past the limit, and the rest is left unread.
    """
    config = request.app[config_key]
    limit = min(AUTH_BODY_BYTES, config.max_body_bytes)
    length = request.content_length
    if length is not None and length > limit:
        _too_large(request, limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(config.header_timeout):
            while True:
                chunk = await request.content.read(limit + 1 - size)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    _too_large(request, limit)
    except TimeoutError:
        raise BodyTimeout from None


def _too_large(request: web.Request, limit: int) -> None:
    request.app[metrics_key].refusals.note("auth_body_too_large", f"path={request.path}")
    raise PayloadTooLarge(f"body larger than {limit} bytes")
