"""Login sessions: created at login, checked on every authenticated request, revoked.

A token is only as good as its session: the session must exist, belong to the token's
user, be unrevoked and unexpired (`--session-max-age` from the login; refreshing never
extends it). Sessions are looked up in SQLite and cached here for `CACHE_TTL` seconds,
so a busy client costs one indexed read every few seconds, not one per request. A
revocation on this node takes effect at once (its cache entry is replaced and the
listeners, which close the session's WebSockets, are told); one made elsewhere (another
node, `run.py users remove`) within CACHE_TTL seconds, and `sweep` finds the open
sockets of such sessions on the same schedule.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .auth import Identity
from .errors import Unauthorized
from .store import Accounts, SessionRecord

log = logging.getLogger(__name__)

#: Seconds a session's state is trusted from memory before it is read again.
CACHE_TTL = 5.0
#: Sessions whose state is kept in memory (least recently used forgotten first).
CACHE_SIZE = 20_000
#: Live sessions one user may have; a login beyond revokes the oldest (the table stays
#: bounded although scripts that log in for every run never log out).
MAX_SESSIONS_PER_USER = 1000
#: Session ids checked per query by `sweep`.
SWEEP_CHUNK = 500

#: Told the ids of sessions that just ended, to close their WebSockets.
RevokeListener = Callable[[set[str]], None]


def new_session_id() -> str:
    """192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


@dataclass(frozen=True, slots=True)
class _Entry:
    #: None: no such session.
    user_id: int | None
    expires_at: float
    revoked: bool
    #: Monotonic clock reading when this was read from the database.
    loaded_at: float


def _entry(record: SessionRecord | None, loaded_at: float) -> _Entry:
    if record is None:
        return _Entry(None, 0.0, True, loaded_at)
    return _Entry(record.user_id, record.expires_at, record.revoked, loaded_at)


class SessionService:
    """Creates, checks and revokes sessions; tells listeners which sessions ended."""

    def __init__(
        self,
        accounts: Accounts,
        max_age: float,
        *,
        cache_ttl: float = CACHE_TTL,
        max_per_user: int = MAX_SESSIONS_PER_USER,
    ) -> None:
        self._accounts = accounts
        #: --session-max-age, seconds from the login.
        self.max_age = max_age
        self._cache_ttl = cache_ttl
        self._max_per_user = max_per_user
        #: Session state by id, as last read or revoked here (least recently used first).
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        #: Reads in flight, so a burst of requests of one session makes one query.
        self._loading: dict[str, asyncio.Future[_Entry]] = {}
        self._listeners: list[RevokeListener] = []
        self._sweeper: asyncio.Task[None] | None = None

    def add_listener(self, listener: RevokeListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle -------------------------------------------------------------------------

    async def create(self, user_id: int) -> SessionRecord:
        """A new session for a login that just succeeded."""
        now = time.time()
        # Ends on a whole second, as token exps do: the last token expires with it.
        ends = math.floor(now) + self.max_age
        session = SessionRecord(new_session_id(), user_id, now, ends, False)
        evicted = await self._accounts.create_session(
            session.id, user_id, now, session.expires_at, self._max_per_user
        )
        self._remember(session.id, _entry(session, time.monotonic()))
        if evicted:
            self._ended(set(evicted))
        return session

    async def check(self, identity: Identity) -> float:
        """The end (epoch seconds) of the token's session if it is alive; else Unauthorized.

        Raises `invalid_token` for an unknown, revoked or someone else's session and
        `session_expired` past the session's end.
        """
        entry = self._cache.get(identity.session_id)
        if entry is None or time.monotonic() - entry.loaded_at >= self._cache_ttl:
            entry = await self._load(identity.session_id)
        else:
            self._cache.move_to_end(identity.session_id)
        if entry.revoked or entry.user_id != identity.user_id:
            raise Unauthorized("session ended: log in again", code="invalid_token")
        if entry.expires_at <= time.time():
            raise Unauthorized("session expired: log in again", code="session_expired")
        return entry.expires_at

    async def revoke(self, session_id: str) -> None:
        """Log one session out."""
        await self._accounts.revoke_session(session_id, time.time())
        self._ended({session_id})

    async def revoke_all(self, user_id: int) -> set[str]:
        """Log out every session of a user; returns their ids."""
        ended = set(await self._accounts.revoke_user_sessions(user_id, time.time()))
        self._ended(ended)
        return ended

    def ended(self, session_ids: Iterable[str]) -> None:
        """Sessions revoked in the database by someone else (e.g. a password change)."""
        self._ended(set(session_ids))

    # -- open WebSockets -------------------------------------------------------------------

    def start(self, open_sessions: Callable[[], Collection[str]]) -> None:
        """Every CACHE_TTL seconds, end the sockets of sessions revoked elsewhere."""
        self._sweeper = asyncio.create_task(self._sweep_loop(open_sessions), name="sessions")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    async def sweep(self, session_ids: Collection[str]) -> set[str]:
        """Tell the listeners about those of `session_ids` no longer alive; returns them."""
        ids = list(session_ids)
        dead: set[str] = set()
        now = time.time()
        for start in range(0, len(ids), SWEEP_CHUNK):
            chunk = ids[start : start + SWEEP_CHUNK]
            dead.update(set(chunk) - await self._accounts.live_sessions(chunk, now))
        if dead:
            self._ended(dead)
        return dead

    async def _sweep_loop(self, open_sessions: Callable[[], Collection[str]]) -> None:
        while True:
            await asyncio.sleep(self._cache_ttl)
            try:
                await self.sweep(open_sessions())
            except Exception:  # a locked or busy database: try again next time
                log.exception("sessions.sweep_failed")

    # -- the cache -------------------------------------------------------------------------

    async def _load(self, session_id: str) -> _Entry:
        # One read per session at a time, in a task of its own: a caller that goes away
        # (a dropped request) does not fail the others waiting for the same answer.
        loading = self._loading.get(session_id)
        if loading is None:
            loading = asyncio.ensure_future(self._read(session_id))
            self._loading[session_id] = loading
        return await asyncio.shield(loading)

    async def _read(self, session_id: str) -> _Entry:
        try:
            entry = _entry(await self._accounts.get_session(session_id), time.monotonic())
            current = self._cache.get(session_id)
            if current is not None and current.revoked:
                # Revoked here while the read was in flight: the read may predate it.
                entry = current
            self._remember(session_id, entry)
            return entry
        finally:
            del self._loading[session_id]

    def _remember(self, session_id: str, entry: _Entry) -> None:
        self._cache[session_id] = entry
        self._cache.move_to_end(session_id)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def _ended(self, session_ids: set[str]) -> None:
        if not session_ids:
            return
        revoked = _Entry(None, 0.0, True, time.monotonic())
        for session_id in session_ids:
            self._remember(session_id, revoked)
        for listener in self._listeners:
            try:
                listener(session_ids)
            except Exception:
                log.exception("sessions.listener_failed")
