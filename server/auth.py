"""Passwords (scrypt from the standard library) and JWT access tokens (HS256 only)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import jwt

from .errors import Unauthorized

# scrypt cost: ~16 MiB and tens of milliseconds per hash; run off the event loop.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_ALGORITHM = "HS256"
#: Verified tokens remembered (see TokenService.verify).
_VERIFIED_CACHE = 4096
#: Clock skew tolerated when checking exp, in seconds.
_LEEWAY = 0


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=64 * 1024 * 1024, dklen=32
    )


def hash_password_sync(password: str) -> str:
    """A salted scrypt hash: "scrypt$n$r$p$salt$hash" (base64)."""
    salt = os.urandom(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P)
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password_sync(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


#: Compared against when the username is unknown, so timing does not reveal which names exist.
_DUMMY_HASH = hash_password_sync(secrets.token_hex(8))


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(hash_password_sync, password)


async def verify_password(password: str, stored: str | None) -> bool:
    """True when `password` matches; with `stored=None` spends the same time, returns False."""
    ok = await asyncio.to_thread(verify_password_sync, password, stored or _DUMMY_HASH)
    return ok and stored is not None


class SecretFileError(RuntimeError):
    """The stored JWT secret cannot be trusted; the message says what to do."""


def load_or_create_secret(path: Path) -> str:
    """The JWT secret at `path`, created (mode 0600) on first use: tokens survive restarts.

    Raises:
        SecretFileError: the file exists and its mode lets group or others at it. Whoever
            can read the secret can sign tokens for any user, so the server refuses to
            start rather than use it (as ssh refuses a private key readable by others).
    """
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            what = "readable" if mode & 0o044 else "writable"
            raise SecretFileError(f"{path} is {what} by others; chmod 600 {path}")
        secret = path.read_text(encoding="ascii").strip()
        if len(secret) >= 32:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secret + "\n")
    return secret


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a valid token speaks for, and until when (epoch seconds)."""

    user_id: int
    expires_at: float


class TokenService:
    """Issues and checks HS256 access tokens carrying `sub` (user id) and `exp`."""

    def __init__(self, secret: str, ttl: int) -> None:
        if len(secret.encode()) < 32:
            raise ValueError("the JWT secret must be at least 32 bytes")
        self._secret = secret
        self.ttl = ttl
        #: Tokens already verified, by token string (least recently used first).
        self._verified: OrderedDict[str, Identity] = OrderedDict()

    def issue(self, user_id: int, username: str) -> str:
        now = int(time.time())
        claims = {"sub": str(user_id), "name": username, "iat": now, "exp": now + self.ttl}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str) -> Identity:
        """Raises Unauthorized for anything but a well-signed, unexpired HS256 token.

        A token that verified once is remembered until it expires (bounded LRU): its
        signature cannot change, and decoding costs more than the rest of a progress post.
        """
        known = self._verified.get(token)
        if known is not None and time.time() < known.expires_at:
            self._verified.move_to_end(token)
            return known
        identity = self._decode(token)
        self._verified[token] = identity
        if len(self._verified) > _VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return identity

    def _decode(self, token: str) -> Identity:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                options={"require": ["exp", "sub"]},
                leeway=_LEEWAY,
            )
            user_id = int(claims["sub"])
        except jwt.ExpiredSignatureError as exc:
            raise Unauthorized("token expired", code="token_expired") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthorized("invalid token", code="invalid_token") from exc
        return Identity(user_id=user_id, expires_at=float(claims["exp"]))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
