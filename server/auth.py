"""Passwords (argon2id, legacy scrypt), JWT access tokens (HS256 only), login throttling.

- `Passwords`: hashes and verifies off the event loop, on a few threads of its own behind
  a bounded wait queue; when that is full the caller gets 503 `overloaded` at once
  (`HashBusy`) instead of a growing pile of 19 MiB hashes.
- `TokenService`: tokens name a user (`sub`), a login session (`sid`) and this database
  (`db`); whether the session is still alive is `sessions.SessionService`'s business.
- `LoginThrottle`: after `FREE_FAILURES` wrong passwords in a row for a username, each
  further attempt waits 2^(failures - FREE_FAILURES) seconds, at most `MAX_DELAY`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import os
import random
import secrets
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import argon2
import jwt
from argon2.exceptions import InvalidHashError, VerificationError

from .errors import TooManyRequests, Unauthorized, Unavailable

T = TypeVar("T")

_ALGORITHM = "HS256"
#: Verified tokens remembered (see TokenService.verify).
_VERIFIED_CACHE = 4096
#: Clock skew tolerated when checking exp, in seconds.
_LEEWAY = 0
#: Claims every token must carry.
_REQUIRED_CLAIMS = ["exp", "iat", "sub", "sid", "db"]

#: argon2id time cost (passes over memory) and lanes; the memory is --password-hash-cost.
ARGON2_TIME_COST = 2
ARGON2_LANES = 1
#: Seconds a hash may wait for a thread before it is refused with 503.
HASH_WAIT_MAX = 5.0
#: Legacy scrypt hashes: the biggest cost verified (a stored hash names its own cost).
_SCRYPT_MAXMEM = 64 * 1024 * 1024


class HashBusy(Unavailable):
    """Every password-hashing thread is taken and the wait queue is full (or too slow)."""

    code = "overloaded"

    def __init__(self) -> None:
        super().__init__(
            "server busy checking passwords: retry later",
            headers={"Retry-After": str(random.randint(1, 3))},  # jitter spreads retries
        )


@dataclass(frozen=True, slots=True)
class Verified:
    """The outcome of a password check."""

    ok: bool
    #: The stored hash is legacy or weaker than the current parameters: store a new one.
    needs_rehash: bool = False


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _scrypt_hash(password: bytes, n: int, r: int, p: int) -> str:
    """A hash in the legacy format `scrypt$n$r$p$salt$hash` (tests make old accounts with it)."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=32)
    encode = base64.b64encode
    return f"scrypt${n}${r}${p}${encode(salt).decode()}${encode(digest).decode()}"


def _scrypt_verify(password: bytes, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = _b64decode(digest)
        actual = hashlib.scrypt(
            password,
            salt=_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_SCRYPT_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):  # malformed, or a cost over maxmem
        return False
    return hmac.compare_digest(actual, expected)


def _encode(password: str) -> bytes:
    # Request validation already refuses lone surrogates; "surrogatepass" keeps any other
    # caller from crashing a hashing thread with UnicodeEncodeError.
    return password.encode("utf-8", "surrogatepass")


#: Nice value of the hashing threads: under a flood the event loop (heartbeats, fan-out,
#: every other request) comes first, and hashes take what CPU is left.
HASH_THREAD_NICE = 10


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux schedules threads one by one)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HASH_THREAD_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at normal priority
        pass


class Passwords:
    """argon2id hashes at `cost_mib` MiB, computed on `workers` threads of their own.

    At most `workers` hashes run at once and at most `queue` wait; a hash that would wait
    beyond that, or longer than HASH_WAIT_MAX seconds, raises HashBusy (503). `refusals`
    (if given) is called with the reason of each refusal.
    """

    def __init__(
        self,
        cost_mib: int,
        *,
        workers: int = 0,
        queue: int = 64,
        wait_max: float = HASH_WAIT_MAX,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self._argon = argon2.PasswordHasher(
            time_cost=ARGON2_TIME_COST, memory_cost=cost_mib * 1024, parallelism=ARGON2_LANES
        )
        #: Threads hashing at once (0: one per core but one, which stays the event loop's).
        self.workers = workers or max(1, (os.cpu_count() or 1) - 1)
        #: Hashes allowed to wait for a thread.
        self.queue = queue
        self._wait_max = wait_max
        self._on_refused = on_refused
        self._executor = ThreadPoolExecutor(
            self.workers, thread_name_prefix="password-hash", initializer=_lower_priority
        )
        self._slots = asyncio.Semaphore(self.workers)
        #: Hashes waiting for a slot now.
        self.waiting = 0
        #: Hashed at start: what an unknown username is compared with, at the current cost,
        #: so the answer takes as long as for a real account.
        self._dummy: str | None = None

    # -- synchronous: on a hashing thread, or in the admin command ----------------------

    def hash_sync(self, password: str) -> str:
        return self._argon.hash(_encode(password))

    def verify_sync(self, password: str, stored: str | None) -> Verified:
        """Check `password` against `stored` (argon2id or legacy scrypt; None: nobody)."""
        if stored is None:
            self._check_argon(password, self._dummy or self.hash_sync("dummy password"))
            return Verified(False)
        if stored.startswith("scrypt$"):
            return Verified(_scrypt_verify(_encode(password), stored), needs_rehash=True)
        if not self._check_argon(password, stored):
            return Verified(False)
        return Verified(True, needs_rehash=self._is_weaker(stored))

    def _check_argon(self, password: str, stored: str) -> bool:
        try:
            return self._argon.verify(stored, _encode(password))
        except (VerificationError, InvalidHashError):
            return False

    def _is_weaker(self, stored: str) -> bool:
        """True if `stored` was made with less than the current parameters.

        argon2's check_needs_rehash says True for any difference, also for a hash stronger
        than today's (an operator who lowered --password-hash-cost); those are kept.
        """
        if not self._argon.check_needs_rehash(stored):
            return False
        try:
            have = argon2.extract_parameters(stored)
        except InvalidHashError:
            return True
        want = self._argon
        return (
            have.type is not argon2.Type.ID
            or have.version < argon2.low_level.ARGON2_VERSION
            or have.memory_cost < want.memory_cost
            or have.time_cost < want.time_cost
            or have.hash_len < want.hash_len
            or have.salt_len < want.salt_len
        )

    # -- asynchronous: the server ---------------------------------------------------------

    async def start(self) -> None:
        """Make the dummy hash (one hash at the current cost)."""
        self._dummy = await self.run(self.hash_sync, secrets.token_hex(16))

    def close(self) -> None:
        """Stop the threads once they finish what they run; queued work is dropped."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def hash(self, password: str) -> str:
        """A new argon2id hash of `password`. Raises HashBusy."""
        return await self.run(self.hash_sync, password)

    async def verify(self, password: str, stored: str | None) -> Verified:
        """Check `password`; `stored=None` (unknown user) spends the same time. Raises HashBusy."""
        return await self.run(self.verify_sync, password, stored)

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a hashing thread, once one is free. Raises HashBusy."""
        if self._slots.locked() and self.waiting >= self.queue:
            self._refuse("password_hash_busy")
        self.waiting += 1
        try:
            async with asyncio.timeout(self._wait_max):
                await self._slots.acquire()
        except TimeoutError:
            self._refuse("password_hash_wait")
        finally:
            self.waiting -= 1
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, fn, *args)
        except BaseException:
            self._slots.release()
            raise
        # The slot is given back when the thread is done, not when the caller stops
        # waiting: a caller that goes away must not let a second hash share its thread.
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.shield(future)

    def _refuse(self, reason: str) -> None:
        if self._on_refused is not None:
            self._on_refused(reason)
        raise HashBusy()


class SecretFileError(RuntimeError):
    """The stored JWT secret cannot be trusted; the message says what to do."""


def load_or_create_secret(path: Path) -> str:
    """The JWT secret at `path`, created (mode 0600) on first use: tokens survive restarts.

    Raises:
        SecretFileError: the file exists and its mode lets group or others at it. Whoever
            can read the secret can sign tokens for any user, so the server refuses to
            start rather than use it (as ssh refuses a private key readable by others).
    """
    secret = read_secret(path)
    if secret is not None:
        return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret + "\n")
    return secret


def read_secret(path: Path) -> str | None:
    """The JWT secret kept at `path`, or None when there is none (or one too short to use,
    which `load_or_create_secret` replaces).

    Raises:
        SecretFileError: the file's mode lets group or others at it.
    """
    if not path.exists():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        what = "readable" if mode & 0o044 else "writable"
        raise SecretFileError(f"{path} is {what} by others; chmod 600 {path}")
    secret = path.read_text(encoding="ascii").strip()
    return secret if len(secret) >= 32 else None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, through which session, and until when (epoch seconds).

    `kind` is "login" (a user's access token: may do everything), "api_key" (limited to
    `scopes`) or "share" (reads `task_id` and nothing else); see credentials.py.
    """

    user_id: int
    session_id: str
    expires_at: float
    kind: str = "login"
    scopes: frozenset[str] = frozenset({"tasks:read", "tasks:write"})
    task_id: str | None = None

    @property
    def connection_key(self) -> Hashable:
        """What its sockets count under for --max-connections-per-user: the user, or for a
        share token ("shared", the owner), so viewers of a shared link can neither take the
        owner's own places nor hold more than the limit themselves."""
        return ("shared", self.user_id) if self.kind == "share" else self.user_id


class TokenService:
    """Issues and checks HS256 access tokens: `sub`, `sid`, `db`, `iat`, `exp`.

    `instance_id` is this database's id: a token minted for another database (one since
    reset or restored, with the same secret file) is refused.
    """

    def __init__(self, secret: str, ttl: int, instance_id: str) -> None:
        if len(secret.encode()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes")
        self._secret = secret
        self.ttl = ttl
        self.instance_id = instance_id
        #: Tokens already verified, by token string (least recently used first).
        self._verified: OrderedDict[str, Identity] = OrderedDict()

    def issue(self, user_id: int, session_id: str, session_expires_at: float) -> tuple[str, int]:
        """A token and its lifetime in seconds: `token_ttl`, cut at the session's end."""
        now = int(time.time())
        exp = min(now + self.ttl, math.floor(session_expires_at))
        claims = {
            "sub": str(user_id),
            "sid": session_id,
            "db": self.instance_id,
            "iat": now,
            "exp": exp,
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM), exp - now

    def verify(self, token: str) -> Identity:
        """Raises Unauthorized for anything but a well-signed, unexpired HS256 token of ours.

        A token that verified once is remembered until it expires (bounded LRU): its
        signature cannot change, and decoding costs more than the rest of a progress post.
        """
        known = self._verified.get(token)
        if known is not None and time.time() < known.expires_at:
            self._verified.move_to_end(token)
            return known
        identity = self._decode(token, verify_exp=True)
        self._verified[token] = identity
        if len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return identity

    def verify_expired(self, token: str) -> Identity:
        """Like verify, but an expired token passes (to tell token from session expiry)."""
        return self._decode(token, verify_exp=False)

    def _decode(self, token: str, *, verify_exp: bool) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                options={"require": _REQUIRED_CLAIMS, "verify_exp": verify_exp},
                leeway=_LEEWAY,
            )
            user_id = int(claims["sub"])
            session_id, instance = claims["sid"], claims["db"]
            expires_at = float(claims["exp"])
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired", code="token_expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as exc:
            raise Unauthorized("invalid token", code="invalid_token") from exc
        if not isinstance(session_id, str) or not session_id or len(session_id) > 64:
            raise Unauthorized("invalid token", code="invalid_token")
        if instance != self.instance_id:
            # Signed with our secret for another database: its user ids are not ours.
            raise Unauthorized("token from another database", code="invalid_token")
        return Identity(user_id=user_id, session_id=session_id, expires_at=expires_at)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


#: Failed logins in a row a username gets before it has to wait.
FREE_FAILURES = 5
#: Longest wait between two login attempts for one username, in seconds.
MAX_DELAY = 30.0
#: A username whose last failure is this old (seconds) starts afresh.
FORGET_AFTER = 15 * 60.0
#: Usernames remembered (least recently failed forgotten first).
MAX_USERNAMES = 50_000
#: Characters of a username used as its key (valid ones have at most 32).
_KEY_CHARS = 64


@dataclass(slots=True)
class _Failures:
    count: int
    #: Clock reading of the last failure.
    last: float


class LoginThrottle:
    """Per-username wait after repeated wrong passwords; checked before any hashing.

    Keyed by the name as typed (case-folded, like the users table), whether or not such
    an account exists, so the throttle does not tell which names are real. Each attempt
    counts as a failure from the moment it is let through (until it succeeds), so
    concurrent guesses cannot all slip past the check while the first is being hashed.
    The wait is capped at MAX_DELAY: whoever keeps failing for a real user's name delays
    the real user by at most that much per attempt, never locks them out for longer.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        #: Failures in a row by username key (least recently failed first).
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    @staticmethod
    def _key(username: str) -> str:
        return username[:_KEY_CHARS].lower()

    @staticmethod
    def delay(failures: int) -> float:
        """Seconds to wait after `failures` failures in a row."""
        if failures < FREE_FAILURES:
            return 0.0
        return min(MAX_DELAY, 2.0 ** (failures - FREE_FAILURES))

    def wait(self, username: str) -> float:
        """Seconds until `username` may try again (0.0: now)."""
        entry = self._failures.get(self._key(username))
        if entry is None:
            return 0.0
        elapsed = self._clock() - entry.last
        if elapsed >= FORGET_AFTER:
            return 0.0
        return max(0.0, self.delay(entry.count) - elapsed)

    def attempt(self, username: str) -> None:
        """Let one attempt through (counted as failed until `succeeded`), or raise 429
        `login_throttled` with Retry-After while `username` has to wait."""
        wait = self.wait(username)
        if wait > 0.0:
            raise TooManyRequests(
                "too many failed logins for this username; wait before trying again",
                code="login_throttled",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        key, now = self._key(username), self._clock()
        entry = self._failures.pop(key, None)
        if entry is None or now - entry.last >= FORGET_AFTER:
            entry = _Failures(0, now)
        entry.count += 1
        entry.last = now
        self._failures[key] = entry
        while len(self._failures) > MAX_USERNAMES:
            self._failures.popitem(last=False)

    def forgive(self, username: str) -> None:
        """Take back an attempt that checked nothing (the hashing threads were busy)."""
        entry = self._failures.get(self._key(username))
        if entry is not None:
            entry.count -= 1
            if entry.count <= 0:
                del self._failures[self._key(username)]

    def succeeded(self, username: str) -> None:
        """The right password: the name starts afresh."""
        self._failures.pop(self._key(username), None)
