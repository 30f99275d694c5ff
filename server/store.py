"""All SQL lives here. Returns models; knows nothing of HTTP or WebSockets."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiosqlite

from .db import Database
from .models import Event, EventType, Task, TaskStatus, User

_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at"
)
_EVENT_COLUMNS = "task_id, seq, event, status, progress, step, message, result, error, ts"


class UsernameTaken(Exception):
    """Another account already has this username (compared without case)."""


@dataclass(frozen=True, slots=True)
class TaskWrite:
    """One task's new state and the events that led to it, for `Store.commit`."""

    task: Task
    events: Sequence[Event]
    is_new: bool = False


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    task_id: str
    connection_id: str
    subscribed_at: str
    unsubscribed_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "connection_id": self.connection_id,
            "subscribed_at": self.subscribed_at,
            "unsubscribed_at": self.unsubscribed_at,
        }


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _load_or_none(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def _task_from_row(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        params=json.loads(row["params"]),
        status=TaskStatus(row["status"]),
        progress=row["progress"],
        step=row["step"],
        message=row["message"],
        result=_load_or_none(row["result"]),
        error=row["error"],
        seq=row["seq"],
        checkpoint=_load_or_none(row["checkpoint"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


def _event_from_row(row: sqlite3.Row) -> Event:
    return Event(
        task_id=row["task_id"],
        seq=row["seq"],
        event=EventType(row["event"]),
        status=TaskStatus(row["status"]),
        progress=row["progress"],
        step=row["step"],
        message=row["message"],
        result=_load_or_none(row["result"]),
        error=row["error"],
        ts=row["ts"],
    )


def _task_params(task: Task) -> tuple[Any, ...]:
    return (
        task.status.value,
        task.progress,
        task.step,
        task.message,
        _json_or_none(task.result),
        task.error,
        task.seq,
        _json_or_none(task.checkpoint),
        task.updated_at,
        task.started_at,
        task.finished_at,
        task.id,
    )


def _event_params(event: Event) -> tuple[Any, ...]:
    return (
        event.task_id,
        event.seq,
        event.event.value,
        event.status.value,
        event.progress,
        event.step,
        event.message,
        _json_or_none(event.result),
        event.error,
        event.ts,
    )


class Store:
    """Reads through the reader connection; writes one transaction at a time on the writer."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # -- users ---------------------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str, created_at: str) -> User:
        """Insert a user. Raises UsernameTaken."""
        async with self._db.write_lock:
            try:
                cur = await self._db.writer.execute(
                    "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)",
                    (username, password_hash, created_at),
                )
            except sqlite3.IntegrityError as exc:
                raise UsernameTaken(username) from exc
            return User(id=cur.lastrowid or 0, username=username)

    async def find_credentials(self, username: str) -> tuple[User, str] | None:
        """The user and their password hash, or None."""
        async with self._db.reader.execute(
            "SELECT id, username, password_hash FROM users WHERE username = ?", (username,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        return User(id=row["id"], username=row["username"]), row["password_hash"]

    async def get_user(self, user_id: int) -> User | None:
        async with self._db.reader.execute(
            "SELECT id, username FROM users WHERE id = ?", (user_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else User(id=row["id"], username=row["username"])

    # -- tasks and events: reads ---------------------------------------------------------

    async def get_task(self, task_id: str, *, for_write: bool = False) -> Task | None:
        """A task by id; `for_write` reads through the writer (call it holding no lock)."""
        conn = self._db.writer if for_write else self._db.reader
        async with conn.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else _task_from_row(row)

    async def list_tasks(
        self, user_id: int, statuses: Iterable[TaskStatus] | None, limit: int
    ) -> list[Task]:
        """A user's tasks, newest first, optionally only those in `statuses`."""
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE user_id = ?"
        args: list[Any] = [user_id]
        if statuses is not None:
            wanted = [s.value for s in statuses]
            sql += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        args.append(limit)
        async with self._db.reader.execute(sql, args) as cur:
            return [_task_from_row(row) for row in await cur.fetchall()]

    async def list_events(self, task_id: str, after_seq: int, limit: int) -> list[Event]:
        """Events with seq > after_seq, in seq order."""
        async with self._db.reader.execute(
            f"SELECT {_EVENT_COLUMNS} FROM task_events WHERE task_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (task_id, after_seq, limit),
        ) as cur:
            return [_event_from_row(row) for row in await cur.fetchall()]

    async def first_kept_seq(self, task_id: str) -> int | None:
        """The lowest seq still stored for a task (history may be trimmed), or None."""
        async with self._db.reader.execute(
            "SELECT MIN(seq) FROM task_events WHERE task_id = ?", (task_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def tasks_to_resume(self, kinds: Iterable[str]) -> list[Task]:
        """Unfinished tasks of the given kinds, oldest first (built-in jobs after a restart)."""
        wanted = list(kinds)
        if not wanted:
            return []
        async with self._db.reader.execute(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status IN ('pending', 'running')"
            f" AND kind IN ({','.join('?' * len(wanted))}) ORDER BY created_at",
            wanted,
        ) as cur:
            return [_task_from_row(row) for row in await cur.fetchall()]

    # -- tasks and events: the one write path --------------------------------------------

    async def commit(self, writes: Sequence[TaskWrite]) -> None:
        """Store new and changed tasks with their events in one transaction.

        When this returns the transaction is committed (and, with synchronous=FULL, on disk).
        On error everything is rolled back and the error propagates.
        """
        new_tasks = [w.task for w in writes if w.is_new]
        changed = [w.task for w in writes if not w.is_new]
        events = [e for w in writes for e in w.events]
        async with self._db.write_lock:
            conn = self._db.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if new_tasks:
                    await conn.executemany(
                        f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES"
                        " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                t.id,
                                t.user_id,
                                t.kind,
                                json.dumps(t.params),
                                t.status.value,
                                t.progress,
                                t.step,
                                t.message,
                                _json_or_none(t.result),
                                t.error,
                                t.seq,
                                _json_or_none(t.checkpoint),
                                t.created_at,
                                t.updated_at,
                                t.started_at,
                                t.finished_at,
                            )
                            for t in new_tasks
                        ],
                    )
                if changed:
                    await conn.executemany(
                        "UPDATE tasks SET status = ?, progress = ?, step = ?, message = ?,"
                        " result = ?, error = ?, seq = ?, checkpoint = ?, updated_at = ?,"
                        " started_at = ?, finished_at = ? WHERE id = ?",
                        [_task_params(t) for t in changed],
                    )
                if events:
                    await conn.executemany(
                        f"INSERT INTO task_events ({_EVENT_COLUMNS})"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [_event_params(e) for e in events],
                    )
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise

    # -- subscription history ------------------------------------------------------------

    async def record_subscriptions(
        self,
        opened: Sequence[tuple[str, int, str, str]],
        closed: Sequence[tuple[str, str, str]],
    ) -> None:
        """Record (connection_id, user_id, task_id, at) opened and (connection_id, task_id, at)
        closed subscriptions in one transaction."""
        if not opened and not closed:
            return
        async with self._db.write_lock:
            conn = self._db.writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                if opened:
                    await conn.executemany(
                        "INSERT INTO subscriptions (connection_id, user_id, task_id, subscribed_at)"
                        " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?3)",
                        opened,
                    )
                if closed:
                    await conn.executemany(
                        "UPDATE subscriptions SET unsubscribed_at = ?3"
                        " WHERE connection_id = ?1 AND task_id = ?2 AND unsubscribed_at IS NULL",
                        closed,
                    )
                await conn.execute("COMMIT")
            except BaseException:
                await _rollback(conn)
                raise

    async def close_open_subscriptions(self, at: str) -> int:
        """Mark every still-open subscription closed (at startup: no connection survived)."""
        async with self._db.write_lock:
            cur = await self._db.writer.execute(
                "UPDATE subscriptions SET unsubscribed_at = ? WHERE unsubscribed_at IS NULL", (at,)
            )
            return cur.rowcount

    async def list_subscriptions(self, user_id: int, limit: int) -> list[SubscriptionRecord]:
        """A user's subscription history, newest first."""
        async with self._db.reader.execute(
            "SELECT task_id, connection_id, subscribed_at, unsubscribed_at FROM subscriptions"
            " WHERE user_id = ? ORDER BY subscribed_at DESC, id DESC LIMIT ?",
            (user_id, limit),
        ) as cur:
            return [
                SubscriptionRecord(
                    task_id=r["task_id"],
                    connection_id=r["connection_id"],
                    subscribed_at=r["subscribed_at"],
                    unsubscribed_at=r["unsubscribed_at"],
                )
                for r in await cur.fetchall()
            ]


async def _rollback(conn: aiosqlite.Connection) -> None:
    if conn.in_transaction:
        try:
            await conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
