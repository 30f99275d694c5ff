"""Tasks, events and subscriptions SQL (accounts: sqlite_accounts.py). Returns models;
knows nothing of HTTP or WebSockets."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from ..models import Event, EventType, Task, TaskStatus
from .sqlite_db import Database

_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at"
)
_EVENT_COLUMNS = "task_id, seq, event, status, progress, step, message, result, error, ts"


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


@dataclass(frozen=True, slots=True)
class EventSpan:
    """Which of a task's events are still stored: always the gapless run first_kept..seq.

    Retention only ever deletes a prefix of a task's history, so a count is a subtraction.
    """

    task_id: str
    #: None while the task is not finished.
    finished_at: str | None
    #: The seq of the task's latest event.
    seq: int
    #: The lowest seq still stored; None when no event is (left).
    first_kept: int | None
    #: Rows in `subscriptions` for the task (only counted when asked for, else 0).
    subscriptions: int = 0

    @property
    def kept(self) -> int:
        """Events stored for the task."""
        return 0 if self.first_kept is None else self.seq - self.first_kept + 1


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


class _Rows:
    """Rows already fetched, behind the cursor methods the queries use."""

    __slots__ = ("_rows",)

    def __init__(self, rows: Iterable[sqlite3.Row]) -> None:
        self._rows = list(rows)

    async def fetchall(self) -> list[sqlite3.Row]:
        return self._rows

    async def fetchone(self) -> sqlite3.Row | None:
        return self._rows[0] if self._rows else None


class Store:
    """Reads through the reader connection; writes one transaction at a time on the writer."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @asynccontextmanager
    async def _query(
        self, sql: str, args: Sequence[Any] = (), *, bulk: bool = False
    ) -> AsyncIterator[_Rows]:
        """Run a read and fetch all its rows in one call on the reader's thread.

        Why one call: with execute and fetch as separate calls, the statements of concurrent
        readers overlap on the shared connection, and SQLite keeps one read transaction (one
        snapshot) open for as long as any statement is active. Under a burst of subscribes
        such a chain lasted hundreds of milliseconds, and a subscriber was shown a task older
        than events already published to others (a gap in its stream). Stepped to the end
        in one call, each query starts from the latest commit.
        """
        yield _Rows(await self._db.fetch(sql, args, bulk=bulk))

    # -- tasks and events: reads ---------------------------------------------------------

    async def get_task(self, task_id: str, *, for_write: bool = False) -> Task | None:
        """A task by id; `for_write` reads through the writer (call it holding no lock)."""
        sql = f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?"
        if for_write:
            rows = await self._db.writer.run(
                lambda conn: conn.execute(sql, (task_id,)).fetchall(), transaction=False
            )
        else:
            rows = await self._db.fetch(sql, (task_id,))
        return _task_from_row(rows[0]) if rows else None

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
        async with self._query(sql, args) as cur:
            return [_task_from_row(row) for row in await cur.fetchall()]

    async def list_events(self, task_id: str, after_seq: int, limit: int) -> list[Event]:
        """Events with seq > after_seq, in seq order."""
        async with self._query(
            f"SELECT {_EVENT_COLUMNS} FROM task_events WHERE task_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (task_id, after_seq, limit),
        ) as cur:
            return [_event_from_row(row) for row in await cur.fetchall()]

    async def first_kept_seq(self, task_id: str) -> int | None:
        """The lowest seq still stored for a task (history may be trimmed), or None."""
        async with self._query(
            "SELECT MIN(seq) FROM task_events WHERE task_id = ?", (task_id,)
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def count_tasks_by_status(self) -> dict[str, int]:
        """Number of tasks per status (metrics); reads the `tasks_by_status` index only."""
        async with self._query("SELECT status, COUNT(*) FROM tasks GROUP BY status") as cur:
            return {row[0]: row[1] for row in await cur.fetchall()}

    async def tasks_to_resume(self, kinds: Iterable[str]) -> list[Task]:
        """Unfinished tasks of the given kinds, oldest first (built-in jobs after a restart)."""
        wanted = list(kinds)
        if not wanted:
            return []
        async with self._query(
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

        def transaction(conn: sqlite3.Connection) -> None:
            if new_tasks:
                conn.executemany(
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
                conn.executemany(
                    "UPDATE tasks SET status = ?, progress = ?, step = ?, message = ?,"
                    " result = ?, error = ?, seq = ?, checkpoint = ?, updated_at = ?,"
                    " started_at = ?, finished_at = ? WHERE id = ?",
                    [_task_params(t) for t in changed],
                )
            if events:
                conn.executemany(
                    f"INSERT INTO task_events ({_EVENT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_event_params(e) for e in events],
                )

        await self._db.write(transaction)

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

        def transaction(conn: sqlite3.Connection) -> None:
            if opened:
                conn.executemany(
                    "INSERT INTO subscriptions (connection_id, user_id, task_id, subscribed_at)"
                    " SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?3)",
                    opened,
                )
            if closed:
                conn.executemany(
                    "UPDATE subscriptions SET unsubscribed_at = ?3"
                    " WHERE connection_id = ?1 AND task_id = ?2 AND unsubscribed_at IS NULL",
                    closed,
                )

        await self._db.write(transaction)

    async def close_open_subscriptions(self, at: str) -> int:
        """Mark every still-open subscription closed (at startup: no connection survived)."""
        return await self._db.execute(
            "UPDATE subscriptions SET unsubscribed_at = ? WHERE unsubscribed_at IS NULL", (at,)
        )

    async def list_subscriptions(self, user_id: int, limit: int) -> list[SubscriptionRecord]:
        """A user's subscription history, newest first."""
        async with self._query(
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

    # -- retention: bounded reads to plan, bounded transactions to delete ----------------

    async def finished_task_spans(
        self,
        finished_before: str,
        after: tuple[str, str] | None,
        limit: int,
        *,
        count_subscriptions: bool = False,
    ) -> list[EventSpan]:
        """Finished tasks with finished_at < `finished_before`, by (finished_at, id).

        `after` is the (finished_at, id) of the last row of the previous page (keyset paging);
        None starts at the oldest.
        """
        subs = (
            "(SELECT COUNT(*) FROM subscriptions s WHERE s.task_id = t.id)"
            if count_subscriptions
            else "0"
        )
        since, since_id = after or ("", "")
        # `+t.status` keeps the planner on tasks_finished (in finished_at order), not the
        # status index; finished_at is set exactly when the status becomes terminal.
        async with self._query(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT MIN(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            f" {subs} AS subscriptions"
            " FROM tasks t WHERE t.finished_at < ? AND (t.finished_at, t.id) > (?, ?)"
            " AND +t.status IN ('completed', 'failed', 'cancelled')"
            " ORDER BY t.finished_at, t.id LIMIT ?",
            (finished_before, since, since_id, limit),
        ) as cur:
            return [_span_from_row(row) for row in await cur.fetchall()]

    async def task_spans(self, task_ids: Sequence[str]) -> list[EventSpan]:
        """The event spans of the given tasks (those that still exist)."""
        if not task_ids:
            return []
        async with self._query(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT MIN(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            " 0 AS subscriptions"
            f" FROM tasks t WHERE t.id IN ({','.join('?' * len(task_ids))})",
            list(task_ids),
        ) as cur:
            return [_span_from_row(row) for row in await cur.fetchall()]

    async def tasks_with_seq_over(
        self, seq: int, after_rowid: int, limit: int
    ) -> tuple[int | None, list[str]]:
        """One page of a scan of all tasks: ids of those whose latest seq is above `seq`.

        Looks at up to `limit` tasks after `after_rowid` (so other reads get their turn
        between pages); returns the last rowid looked at (None: the scan is over) and the ids.
        """
        async with self._query(
            "SELECT rowid, id, seq FROM tasks WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after_rowid, limit),
        ) as cur:
            rows = await cur.fetchall()
        if not rows:
            return None, []
        return rows[-1][0], [row["id"] for row in rows if row["seq"] > seq]

    async def delete_event_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> int:
        """Delete events (task_id, first_seq, last_seq inclusive) in one transaction.

        The caller keeps each task's latest event out of its ranges (unless the task itself
        is about to be deleted). Returns the number of events deleted.
        """
        if not ranges:
            return 0
        return await self._db.write(
            lambda conn: (
                conn.executemany(
                    "DELETE FROM task_events WHERE task_id = ? AND seq BETWEEN ? AND ?", ranges
                ).rowcount
            )
        )

    async def delete_subscriptions_of(self, task_id: str, limit: int) -> int:
        """Delete up to `limit` subscription rows of one task; returns how many."""
        return await self._db.execute(
            "DELETE FROM subscriptions WHERE id IN"
            " (SELECT id FROM subscriptions WHERE task_id = ? LIMIT ?)",
            (task_id, limit),
        )

    async def delete_finished_tasks(self, task_ids: Sequence[str]) -> tuple[int, int, int]:
        """Delete finished tasks with their events and subscription rows, in one transaction.

        A task that is not finished is left alone. Returns (tasks, events, subscriptions)
        deleted; the caller keeps the total small.
        """
        if not task_ids:
            return 0, 0, 0

        def transaction(conn: sqlite3.Connection) -> tuple[int, int, int]:
            ids = [
                (row[0],)
                for row in conn.execute(
                    "SELECT id FROM tasks WHERE finished_at IS NOT NULL"
                    f" AND id IN ({','.join('?' * len(task_ids))})",
                    list(task_ids),
                )
            ]
            events = conn.executemany("DELETE FROM task_events WHERE task_id = ?", ids).rowcount
            subs = conn.executemany("DELETE FROM subscriptions WHERE task_id = ?", ids).rowcount
            tasks = conn.executemany("DELETE FROM tasks WHERE id = ?", ids).rowcount
            return tasks, events, subs

        return await self._db.write(transaction)


def _span_from_row(row: sqlite3.Row) -> EventSpan:
    return EventSpan(
        task_id=row["id"],
        finished_at=row["finished_at"],
        seq=row["seq"],
        first_kept=row["first_kept"],
        subscriptions=row["subscriptions"],
    )
