"""Accounts on PostgreSQL: users, login sessions, the instance id and the shared secret.

The same semantics as sqlite_accounts.py. Usernames are unique and looked up without
case, as SQLite's NOCASE does: ASCII letters only (`fold`), against the unique index on
`lower(username)` (which folds ASCII only in the "C" collation the column has).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import asyncpg

from ..models import User
from .postgres_db import PostgresDatabase, lock_key
from .records import SessionRecord, UsernameTaken, UserSummary, epoch_time, iso_time

#: Rows deleted per transaction by `remove_user`, so a big account never holds locks long.
DELETE_PAGE = 2000
#: Bytes of randomness of the JWT secret made for a shared store (HS256 wants >= 32).
SECRET_BYTES = 48

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold(username: str) -> str:
    """A username as compared: ASCII letters lowered, nothing else changed (NOCASE)."""
    return username.translate(_ASCII_LOWER)


def _session_from_row(row: asyncpg.Record) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        user_id=row["user_id"],
        created_at=epoch_time(row["created_at"]),
        expires_at=epoch_time(row["expires_at"]),
        revoked=row["revoked_at"] is not None,
    )


async def _revoke_all(conn: asyncpg.Connection, user_id: int, at: str) -> list[str]:
    rows = await conn.fetch(
        "UPDATE sessions SET revoked_at = $1 WHERE user_id = $2 AND revoked_at IS NULL"
        " RETURNING id",
        at,
        user_id,
    )
    return [row[0] for row in rows]


#: The unique index on lower(username) (migrations/postgres/0001_initial.sql): only its
#: violation means the name is taken.
USERNAME_INDEX = "users_by_name"


class PostgresAccounts:
    """Users and sessions; reads on the read pool, each write one transaction."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    async def instance_id(self) -> str:
        """This database's random id, made by the first migration."""
        value = await self._db.fetchval("SELECT value FROM meta WHERE key = 'instance_id'")
        if value is None:
            raise LookupError("meta.instance_id is missing")
        return str(value)

    async def shared_secret(self) -> str:
        """The JWT secret of every node of this database, made by whichever asks first.

        Nodes starting together each offer one; the first insert wins and all read it.
        """
        offered = secrets.token_urlsafe(SECRET_BYTES)
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('jwt_secret', $1) ON CONFLICT (key) DO NOTHING",
            offered,
        )
        return str(await self._db.fetchval("SELECT value FROM meta WHERE key = 'jwt_secret'"))

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str, created_at: str) -> User:
        """Insert a user. Raises UsernameTaken."""
        try:
            user_id = await self._db.write(
                lambda conn: conn.fetchval(
                    "INSERT INTO users (username, password_hash, created_at)"
                    " VALUES ($1, $2, $3) RETURNING id",
                    username,
                    password_hash,
                    created_at,
                )
            )
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != USERNAME_INDEX:  # e.g. an id sequence set back by hand
                raise
            raise UsernameTaken(username) from exc
        return User(id=int(user_id), username=username)

    async def username_taken(self, username: str) -> bool:
        return (
            await self._db.fetchval(
                "SELECT 1 FROM users WHERE lower(username) = $1", fold(username)
            )
            is not None
        )

    async def find_credentials(self, username: str) -> tuple[User, str] | None:
        row = await self._db.fetchrow(
            "SELECT id, username, password_hash FROM users WHERE lower(username) = $1",
            fold(username),
        )
        if row is None:
            return None
        return User(id=row["id"], username=row["username"]), row["password_hash"]

    async def password_hash(self, user_id: int) -> str | None:
        value = await self._db.fetchval("SELECT password_hash FROM users WHERE id = $1", user_id)
        return None if value is None else str(value)

    async def get_user(self, user_id: int) -> User | None:
        row = await self._db.fetchrow("SELECT id, username FROM users WHERE id = $1", user_id)
        return None if row is None else User(id=row["id"], username=row["username"])

    async def find_user(self, username: str) -> User | None:
        row = await self._db.fetchrow(
            "SELECT id, username FROM users WHERE lower(username) = $1", fold(username)
        )
        return None if row is None else User(id=row["id"], username=row["username"])

    async def replace_password_hash(self, user_id: int, old: str, new: str) -> bool:
        """Store a rehash of the same password, unless the password changed meanwhile."""
        return (
            await self._db.execute(
                "UPDATE users SET password_hash = $1 WHERE id = $2 AND password_hash = $3",
                new,
                user_id,
                old,
            )
            > 0
        )

    async def change_password(self, user_id: int, new_hash: str, at: float) -> list[str]:
        """Set a new password and revoke every session of the user, in one transaction."""

        async def transaction(conn: asyncpg.Connection) -> list[str]:
            await conn.execute(
                "UPDATE users SET password_hash = $1 WHERE id = $2", new_hash, user_id
            )
            return await _revoke_all(conn, user_id, iso_time(at))

        return await self._db.write(transaction)

    async def list_users(self) -> list[UserSummary]:
        rows = await self._db.fetch(
            "SELECT u.id, u.username, u.created_at,"
            " (SELECT count(*) FROM tasks t WHERE t.user_id = u.id) AS tasks"
            " FROM users u ORDER BY u.id",
            bulk=True,
        )
        return [
            UserSummary(
                id=r["id"], username=r["username"], created_at=r["created_at"], tasks=r["tasks"]
            )
            for r in rows
        ]

    async def remove_user(self, user_id: int, at: float) -> list[str]:
        """Delete a user with their sessions, tasks, events and subscription rows.

        As on SQLite: the account is locked (no password matches `!`) and its sessions
        revoked first; then its rows go in pages of DELETE_PAGE, one short transaction
        each; the last transaction deletes what is left and the user. Interrupted, it
        leaves a locked account: run it again. Returns the sessions revoked.
        """

        async def lock(conn: asyncpg.Connection) -> list[str]:
            await conn.execute("UPDATE users SET password_hash = '!' WHERE id = $1", user_id)
            return await _revoke_all(conn, user_id, iso_time(at))

        revoked = await self._db.write(lock)
        pages = (
            "DELETE FROM subscriptions WHERE id IN"
            " (SELECT id FROM subscriptions WHERE user_id = $1 LIMIT $2)",
            "DELETE FROM task_events WHERE (task_id, seq) IN (SELECT e.task_id, e.seq"
            " FROM tasks t JOIN task_events e ON e.task_id = t.id WHERE t.user_id = $1"
            " LIMIT $2)",
            # In id order under lock, as the write path locks tasks: a job still writing
            # to one of them waits instead of deadlocking.
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE user_id = $1"
            " ORDER BY id LIMIT $2 FOR UPDATE)",
        )
        for sql in pages:
            while await self._db.execute(sql, user_id, DELETE_PAGE) > 0:
                pass

        async def finish(conn: asyncpg.Connection) -> None:
            # Tasks created while the pages went (a token is good until its session's
            # cache entry expires) go here; their events and leases cascade.
            await conn.execute("DELETE FROM subscriptions WHERE user_id = $1", user_id)
            await conn.execute(
                "DELETE FROM tasks WHERE id IN"
                " (SELECT id FROM tasks WHERE user_id = $1 ORDER BY id FOR UPDATE)",
                user_id,
            )
            await conn.execute("DELETE FROM sessions WHERE user_id = $1", user_id)
            await conn.execute("DELETE FROM users WHERE id = $1", user_id)

        await self._db.write(finish)
        return revoked

    # -- sessions ------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        user_id: int,
        created_at: float,
        expires_at: float,
        max_per_user: int,
    ) -> list[str]:
        """Record a login; returns the ids of older sessions revoked to make room.

        The user's dead sessions are deleted on the way, and beyond `max_per_user` live
        ones the oldest are revoked. One user's logins on several nodes take turns (an
        advisory lock per user), so the cap holds across nodes.
        """
        now = iso_time(created_at)

        async def transaction(conn: asyncpg.Connection) -> list[str]:
            # One user's logins take turns across nodes, so the cap on live sessions holds.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(f"login:{user_id}"))
            await conn.execute(
                "DELETE FROM sessions WHERE user_id = $1"
                " AND (expires_at <= $2 OR revoked_at IS NOT NULL)",
                user_id,
                now,
            )
            await conn.execute(
                "INSERT INTO sessions (id, user_id, created_at, expires_at)"
                " VALUES ($1, $2, $3, $4)",
                session_id,
                user_id,
                now,
                iso_time(expires_at),
            )
            rows = await conn.fetch(
                "UPDATE sessions SET revoked_at = $1 WHERE id IN (SELECT id FROM sessions"
                " WHERE user_id = $2 AND revoked_at IS NULL ORDER BY row_no DESC OFFSET $3)"
                " RETURNING id",
                now,
                user_id,
                max_per_user,
            )
            return [row[0] for row in rows]

        return await self._db.write(transaction)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._db.fetchrow(
            "SELECT id, user_id, created_at, expires_at, revoked_at FROM sessions WHERE id = $1",
            session_id,
        )
        return None if row is None else _session_from_row(row)

    async def live_sessions(self, session_ids: Sequence[str], now: float) -> set[str]:
        """Which of `session_ids` exist, are not revoked and have not expired."""
        if not session_ids:
            return set()
        rows = await self._db.fetch(
            "SELECT id FROM sessions WHERE id = ANY($1::text[])"
            " AND revoked_at IS NULL AND expires_at > $2",
            list(session_ids),
            iso_time(now),
        )
        return {row[0] for row in rows}

    async def revoke_session(self, session_id: str, at: float) -> bool:
        """Revoke one session; False if it was already revoked or does not exist."""
        return (
            await self._db.execute(
                "UPDATE sessions SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                iso_time(at),
                session_id,
            )
            > 0
        )

    async def revoke_user_sessions(self, user_id: int, at: float) -> list[str]:
        """Revoke every live session of a user; returns their ids."""
        return await self._db.write(lambda conn: _revoke_all(conn, user_id, iso_time(at)))
