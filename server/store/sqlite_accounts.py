"""Accounts SQL: users, their login sessions, and the database's instance id.

Same `Database` as the Store (one writer thread, the reader pool); this module only holds
the account tables' SQL, so the task store stays about tasks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from ..models import User
from .records import SessionRecord, UsernameTaken, UserSummary, epoch_time, iso_time
from .sqlite_db import Database

#: Rows deleted per transaction by `remove_user`, so a big account never holds the write
#: lock for long while the server runs.
DELETE_PAGE = 2000


def _session_from_row(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        user_id=row["user_id"],
        created_at=epoch_time(row["created_at"]),
        expires_at=epoch_time(row["expires_at"]),
        revoked=row["revoked_at"] is not None,
    )


def _revoke_all(conn: sqlite3.Connection, user_id: int, at: str) -> list[str]:
    rows = conn.execute(
        "UPDATE sessions SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL RETURNING id",
        (at, user_id),
    ).fetchall()
    return [row[0] for row in rows]


class SQLiteAccounts:
    """Users and sessions; reads on the reader pool, writes one transaction each."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def _one(self, sql: str, args: Sequence[Any]) -> sqlite3.Row | None:
        rows = await self._db.fetch(sql, args)
        return rows[0] if rows else None

    async def instance_id(self) -> str:
        """This database's random id, made when it was created (migration 0003)."""
        row = await self._one("SELECT value FROM meta WHERE key = 'instance_id'", ())
        if row is None:  # only if someone deleted the row by hand: make a new one
            raise LookupError("meta.instance_id is missing")
        return str(row[0])

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str, created_at: str) -> User:
        """Insert a user. Raises UsernameTaken."""

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)",
                (username, password_hash, created_at),
            )
            return cur.lastrowid or 0

        try:
            user_id = await self._db.write(insert)
        except sqlite3.IntegrityError as exc:
            raise UsernameTaken(username) from exc
        return User(id=user_id, username=username)

    async def username_taken(self, username: str) -> bool:
        return await self._one("SELECT 1 FROM users WHERE username = ?", (username,)) is not None

    async def find_credentials(self, username: str) -> tuple[User, str] | None:
        """The user and their password hash, or None."""
        row = await self._one(
            "SELECT id, username, password_hash FROM users WHERE username = ?", (username,)
        )
        if row is None:
            return None
        return User(id=row["id"], username=row["username"]), row["password_hash"]

    async def password_hash(self, user_id: int) -> str | None:
        row = await self._one("SELECT password_hash FROM users WHERE id = ?", (user_id,))
        return None if row is None else str(row[0])

    async def get_user(self, user_id: int) -> User | None:
        row = await self._one("SELECT id, username FROM users WHERE id = ?", (user_id,))
        return None if row is None else User(id=row["id"], username=row["username"])

    async def find_user(self, username: str) -> User | None:
        row = await self._one("SELECT id, username FROM users WHERE username = ?", (username,))
        return None if row is None else User(id=row["id"], username=row["username"])

    async def replace_password_hash(self, user_id: int, old: str, new: str) -> bool:
        """Store a rehash of the same password, unless the password changed meanwhile."""
        changed = await self._db.execute(
            "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?",
            (new, user_id, old),
        )
        return changed > 0

    async def change_password(self, user_id: int, new_hash: str, at: float) -> list[str]:
        """Set a new password and revoke every session of the user, in one transaction.

        Returns the ids of the sessions revoked.
        """

        def transaction(conn: sqlite3.Connection) -> list[str]:
            conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (new_hash, user_id))
            return _revoke_all(conn, user_id, iso_time(at))

        return await self._db.write(transaction)

    async def list_users(self) -> list[UserSummary]:
        rows = await self._db.fetch(
            "SELECT u.id, u.username, u.created_at,"
            " (SELECT COUNT(*) FROM tasks t WHERE t.user_id = u.id) AS tasks"
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

        First the account is locked (no password matches `!`) and its sessions revoked, so
        it can do nothing more; then its rows go in pages of DELETE_PAGE (a live server
        waits for one small transaction at a time); the last transaction deletes whatever
        is left and the user. Interrupted, it leaves a locked account: run it again.
        Returns the sessions revoked.
        """

        def lock(conn: sqlite3.Connection) -> list[str]:
            conn.execute("UPDATE users SET password_hash = '!' WHERE id = ?", (user_id,))
            return _revoke_all(conn, user_id, iso_time(at))

        revoked = await self._db.write(lock)
        pages = (
            "DELETE FROM subscriptions WHERE id IN"
            " (SELECT id FROM subscriptions WHERE user_id = ? LIMIT ?)",
            "DELETE FROM task_events WHERE (task_id, seq) IN (SELECT e.task_id, e.seq"
            " FROM tasks t JOIN task_events e ON e.task_id = t.id WHERE t.user_id = ? LIMIT ?)",
            "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks WHERE user_id = ? LIMIT ?)",
        )
        for sql in pages:
            while await self._db.execute(sql, (user_id, DELETE_PAGE)) > 0:
                pass

        def finish(conn: sqlite3.Connection) -> None:
            # Tasks created while the pages went (a token is good until its session's
            # cache entry expires) go here; their events cascade.
            conn.execute("DELETE FROM subscriptions WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM tasks WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
            conn.execute("DELETE FROM users WHERE id = ?", (user_id,))

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
        """Record a login. Returns the ids of older sessions revoked to make room.

        The user's dead sessions (expired, or revoked) are deleted on the way, and beyond
        `max_per_user` live ones the oldest are revoked: the table stays bounded by the
        number of users without a sweeper.
        """
        now = iso_time(created_at)

        def transaction(conn: sqlite3.Connection) -> list[str]:
            conn.execute(
                "DELETE FROM sessions WHERE user_id = ?"
                " AND (expires_at <= ? OR revoked_at IS NOT NULL)",
                (user_id, now),
            )
            conn.execute(
                "INSERT INTO sessions (id, user_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (session_id, user_id, now, iso_time(expires_at)),
            )
            rows = conn.execute(
                "UPDATE sessions SET revoked_at = ? WHERE id IN (SELECT id FROM sessions"
                " WHERE user_id = ? AND revoked_at IS NULL"
                " ORDER BY rowid DESC LIMIT -1 OFFSET ?) RETURNING id",
                (now, user_id, max_per_user),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._db.write(transaction)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        row = await self._one(
            "SELECT id, user_id, created_at, expires_at, revoked_at FROM sessions WHERE id = ?",
            (session_id,),
        )
        return None if row is None else _session_from_row(row)

    async def live_sessions(self, session_ids: Sequence[str], now: float) -> set[str]:
        """Which of `session_ids` exist, are not revoked and have not expired."""
        if not session_ids:
            return set()
        marks = ",".join("?" * len(session_ids))
        rows = await self._db.fetch(
            f"SELECT id FROM sessions WHERE id IN ({marks})"
            " AND revoked_at IS NULL AND expires_at > ?",
            (*session_ids, iso_time(now)),
        )
        return {row[0] for row in rows}

    async def revoke_session(self, session_id: str, at: float) -> bool:
        """Revoke one session; False if it was already revoked or does not exist."""
        changed = await self._db.execute(
            "UPDATE sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
            (iso_time(at), session_id),
        )
        return changed > 0

    async def revoke_user_sessions(self, user_id: int, at: float) -> list[str]:
        """Revoke every live session of a user; returns their ids."""
        return await self._db.write(lambda conn: _revoke_all(conn, user_id, iso_time(at)))
