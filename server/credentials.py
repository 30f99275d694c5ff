"""API keys and share tokens: credentials besides a login, each narrower than one.

- An API key (`pk_<id>_<secret>`) acts as its owner for the scopes it was given
  (`tasks:read`, `tasks:write`) until revoked: what a worker pool or a cron script holds.
- A share token (`st_<id>_<secret>`) reads exactly one task until it expires or its task's
  shares are revoked: what a browser that only watches gets.

Only the sha256 of a secret is stored (the secrets are 256 random bits, so a slow hash
would add nothing but CPU per request). A credential's state is read from the store and
trusted from memory for `CACHE_TTL` seconds: a revocation on this node takes effect at
once, one on another node within that time. Sockets opened with a credential are
registered under its `session_id` (`pk:<id>`, `st:<id>`), so ending it closes them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from .auth import Identity
from .errors import QuotaExceeded, Unauthorized
from .models import utc_now
from .store import ApiKeyRecord, Grants, ShareRecord

log = logging.getLogger(__name__)

READ, WRITE = "tasks:read", "tasks:write"
SCOPES = (READ, WRITE)
API_KEY_PREFIX, SHARE_PREFIX = "pk_", "st_"
#: Live API keys one user may hold.
MAX_KEYS_PER_USER = 100
#: Live share tokens of one task.
MAX_SHARES_PER_TASK = 100
SHARE_TTL_DEFAULT = 24 * 3600
SHARE_TTL_MAX = 30 * 24 * 3600
#: Seconds a credential's state is trusted from memory.
CACHE_TTL = 5.0
#: Credentials whose state is kept in memory.
CACHE_SIZE = 20_000
#: Seconds between two `last_used_at` writes of one key (a busy worker is not a write load).
TOUCH_EVERY = 60.0
#: The id part: 16 hex digits; the secret: 43 URL-safe characters (256 bits).
_ID_HEX = 16
_SECRET_BYTES = 32

#: Told the `session_id`s of credentials that just ended, to close their sockets.
EndListener = Callable[[set[str]], None]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str, prefix: str) -> tuple[str, str] | None:
    """(id, secret) of `<prefix><id>_<secret>`; None if it is not shaped so."""
    if not token.startswith(prefix):
        return None
    credential_id, sep, secret = token[len(prefix) :].partition("_")
    if (
        not sep
        or len(credential_id) != _ID_HEX
        or not 16 <= len(secret) <= 128
        or any(c not in "0123456789abcdef" for c in credential_id)
    ):
        return None
    return credential_id, secret


def is_credential(token: str) -> bool:
    """True for an API key or share token (as opposed to a login JWT)."""
    return token.startswith((API_KEY_PREFIX, SHARE_PREFIX))


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A credential just made: its record and the token, shown to its owner only now."""

    id: str
    token: str
    secret_hash: str


def _new(prefix: str) -> NewSecret:
    credential_id = secrets.token_hex(_ID_HEX // 2)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return NewSecret(credential_id, f"{prefix}{credential_id}_{secret}", _digest(secret))


@dataclass(frozen=True, slots=True)
class _Entry:
    record: ApiKeyRecord | ShareRecord | None
    loaded_at: float


class Credentials:
    """Makes, checks and revokes API keys and share tokens."""

    def __init__(self, grants: Grants, *, cache_ttl: float = CACHE_TTL) -> None:
        self._grants = grants
        self._cache_ttl = cache_ttl
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        #: Monotonic time of each key's last `last_used_at` write.
        self._touched: OrderedDict[str, float] = OrderedDict()
        self._listeners: list[EndListener] = []

    def add_listener(self, listener: EndListener) -> None:
        self._listeners.append(listener)

    # -- API keys ----------------------------------------------------------------------------

    async def create_key(
        self, user_id: int, name: str, scopes: Sequence[str]
    ) -> tuple[ApiKeyRecord, str]:
        """A new key of the user; the token is returned only here."""
        if await self._grants.count_api_keys(user_id) >= MAX_KEYS_PER_USER:
            raise QuotaExceeded(
                f"at most {MAX_KEYS_PER_USER} API keys per user; revoke one first",
                fields={"quota": "api_keys"},
            )
        made = _new(API_KEY_PREFIX)
        ordered = tuple(s for s in SCOPES if s in scopes)
        at = utc_now()
        await self._grants.create_api_key(made.id, user_id, name, ordered, made.secret_hash, at)
        record = ApiKeyRecord(made.id, user_id, name, ordered, made.secret_hash, at, None, False)
        return record, made.token

    async def list_keys(self, user_id: int) -> list[ApiKeyRecord]:
        return await self._grants.list_api_keys(user_id)

    async def revoke_key(self, user_id: int, key_id: str) -> bool:
        """False if the user has no such live key (someone else's is no such key)."""
        if not await self._grants.revoke_api_key(key_id, user_id, utc_now()):
            return False
        self._ended([f"pk:{key_id}"], [key_id])
        return True

    # -- share tokens ------------------------------------------------------------------------

    async def create_share(self, task_id: str, user_id: int, ttl_s: float) -> tuple[str, float]:
        """A read-only token of the task; returns it and its end (epoch seconds)."""
        now = time.time()
        if await self._grants.count_live_shares(task_id, now) >= MAX_SHARES_PER_TASK:
            raise QuotaExceeded(
                f"at most {MAX_SHARES_PER_TASK} live share tokens per task; revoke them first",
                fields={"quota": "share_tokens"},
            )
        made = _new(SHARE_PREFIX)
        expires_at = float(int(now + ttl_s))
        await self._grants.create_share(
            made.id, task_id, user_id, made.secret_hash, utc_now(), expires_at
        )
        return made.token, expires_at

    async def revoke_shares(self, task_id: str) -> int:
        """End every share token of the task; returns how many were live."""
        ended = await self._grants.revoke_shares(task_id, utc_now())
        self._ended([f"st:{share_id}" for share_id in ended], ended)
        return len(ended)

    # -- checking ----------------------------------------------------------------------------

    async def identify(self, token: str) -> Identity:
        """The identity an API key or share token speaks for; Unauthorized if it is none."""
        if token.startswith(API_KEY_PREFIX):
            parts = split_token(token, API_KEY_PREFIX)
            record = await self._record(parts[0], API_KEY_PREFIX) if parts else None
            if (
                not isinstance(record, ApiKeyRecord)
                or record.revoked
                or not _matches(parts, record.secret_hash)
            ):
                raise Unauthorized("invalid or revoked API key", code="invalid_token")
            await self._touch(record.id)
            return Identity(
                user_id=record.user_id,
                session_id=f"pk:{record.id}",
                expires_at=float("inf"),
                kind="api_key",
                scopes=frozenset(record.scopes),
            )
        parts = split_token(token, SHARE_PREFIX)
        record = await self._record(parts[0], SHARE_PREFIX) if parts else None
        if (
            not isinstance(record, ShareRecord)
            or record.revoked
            or not _matches(parts, record.secret_hash)
        ):
            raise Unauthorized("invalid or revoked share token", code="invalid_token")
        if record.expires_at <= time.time():
            raise Unauthorized("share token expired", code="token_expired")
        return Identity(
            user_id=record.user_id,
            session_id=f"st:{record.id}",
            expires_at=record.expires_at,
            kind="share",
            scopes=frozenset({READ}),
            task_id=record.task_id,
        )

    async def sweep(self, session_ids: Collection[str]) -> set[str]:
        """Of the sockets' `session_id`s, those of credentials ended elsewhere; tells the
        listeners. Login sessions (no `pk:`/`st:` prefix) are not this service's."""
        dead: set[str] = set()
        now = time.time()
        for session_id in session_ids:
            prefix, _, credential_id = session_id.partition(":")
            if prefix not in ("pk", "st"):
                continue
            self._cache.pop(credential_id, None)
            record = await self._record(credential_id, f"{prefix}_")
            if (
                record is None
                or record.revoked
                or (isinstance(record, ShareRecord) and record.expires_at <= now)
            ):
                dead.add(session_id)
        if dead:
            for listener in self._listeners:
                listener(dead)
        return dead

    async def _record(self, credential_id: str, prefix: str) -> ApiKeyRecord | ShareRecord | None:
        entry = self._cache.get(credential_id)
        if entry is None or time.monotonic() - entry.loaded_at >= self._cache_ttl:
            if prefix == API_KEY_PREFIX:
                record: ApiKeyRecord | ShareRecord | None = await self._grants.get_api_key(
                    credential_id
                )
            else:
                record = await self._grants.get_share(credential_id)
            entry = _Entry(record, time.monotonic())
            self._cache[credential_id] = entry
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(credential_id)
        return entry.record

    async def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        last = self._touched.get(key_id)
        if last is not None and now - last < TOUCH_EVERY:
            return
        self._touched[key_id] = now
        self._touched.move_to_end(key_id)
        while len(self._touched) > CACHE_SIZE:
            self._touched.popitem(last=False)
        try:
            await self._grants.touch_api_key(key_id, utc_now())
        except Exception:  # last_used_at is a hint; a busy database must not fail the request
            log.warning("credentials.touch_failed key=%s", key_id, exc_info=True)

    def _ended(self, session_ids: Iterable[str], credential_ids: Iterable[str]) -> None:
        for credential_id in credential_ids:
            self._cache.pop(credential_id, None)
        ended = set(session_ids)
        if ended:
            for listener in self._listeners:
                listener(ended)


def _matches(parts: tuple[str, str] | None, secret_hash: str) -> bool:
    return parts is not None and hmac.compare_digest(_digest(parts[1]), secret_hash)
