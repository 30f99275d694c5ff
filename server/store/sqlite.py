"""The SQLite store: every read, and the task write path (planned and written on the writer
thread by `sqlite_writes.TaskWriter`); accounts are in sqlite_accounts.py. Returns models;
knows nothing of HTTP or WebSockets.

Every read is executed and fetched in one call on a reader of the pool (see sqlite_db);
reads that can be long (lists, replays) go in the pool's bulk lane and are bounded in
bytes as well as rows: their sizes are read first (small rows), then exactly the rows that
fit, so a page is never loaded only to find out it is too big.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..lifecycle import Plan, Quotas, Request
from ..models import Event, EventType, Task, TaskStatus
from .sqlite_db import Database
from .sqlite_writes import TaskWriter

#: Bytes of one page of a list or a replay, about (a page always has at least one row).
MAX_PAGE_BYTES = 1024 * 1024

_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at"
)
_EVENT_COLUMNS = "task_id, seq, event, status, progress, step, message, result, error, ts"


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


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    #: (created_at, rowid) to continue from, or None: nothing more.
    next: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    #: True when the page stopped at a limit and later events may exist.
    more: bool


def _fit(rows: Sequence[sqlite3.Row], max_bytes: int, size_index: int) -> tuple[list[Any], bool]:
    """The leading rows whose sizes add up to at most `max_bytes` (at least one row), and
    whether rows were left out for it."""
    total = 0
    for i, row in enumerate(rows):
        total += row[size_index] or 0
        if total > max_bytes and i > 0:
            return list(rows[:i]), True
    return list(rows), False


def _task_from_row(row: sqlite3.Row) -> Task:
    return Task(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        params=row["params"],
        status=TaskStatus(row["status"]),
        progress=row["progress"],
        step=row["step"],
        message=row["message"],
        result=row["result"],
        error=row["error"],
        seq=row["seq"],
        checkpoint=row["checkpoint"],
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
        result=row["result"],
        error=row["error"],
        ts=row["ts"],
    )


def _span_from_row(row: sqlite3.Row) -> EventSpan:
    return EventSpan(
        task_id=row["id"],
        finished_at=row["finished_at"],
        seq=row["seq"],
        first_kept=row["first_kept"],
        subscriptions=row["subscriptions"],
    )


class Store:
    """Reads on the reader pool; writes one transaction at a time on the writer thread."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._writer = TaskWriter(db)

    # -- tasks and events: reads ---------------------------------------------------------

    async def get_task(self, task_id: str) -> Task | None:
        """A task by id, with its params, result and checkpoint."""
        rows = await self._db.fetch(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = ?", (task_id,))
        return _task_from_row(rows[0]) if rows else None

    async def list_tasks(
        self,
        user_id: int,
        statuses: Iterable[TaskStatus] | None,
        limit: int,
        *,
        before: tuple[str, int] | None = None,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> TaskPage:
        """A user's tasks, newest first, optionally only those in `statuses`.

        At most `limit` tasks and about `max_bytes` (at least one task): `before` is the
        continuation of the previous page, `(created_at, rowid)` of its last task.
        """
        where = "user_id = ?"
        args: list[Any] = [user_id]
        if statuses is not None:
            wanted = [s.value for s in statuses]
            where += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        if before is not None:
            where += " AND (created_at, rowid) < (?, ?)"
            args += list(before)
        sizes = await self._db.fetch(
            "SELECT rowid, created_at, bytes + coalesce(length(CAST(message AS BLOB)), 0)"
            f" + coalesce(length(CAST(error AS BLOB)), 0) FROM tasks WHERE {where}"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            [*args, limit + 1],
            bulk=True,
        )
        chosen, cut = _fit(sizes[:limit], max_bytes, 2)
        if not chosen:
            return TaskPage([], None)
        rows = await self._db.fetch(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE rowid IN ({','.join('?' * len(chosen))})"
            " ORDER BY created_at DESC, rowid DESC",
            [row[0] for row in chosen],
            bulk=True,
        )
        more = cut or len(sizes) > limit
        last = chosen[-1]
        return TaskPage([_task_from_row(row) for row in rows], (last[1], last[0]) if more else None)

    async def list_events(
        self, task_id: str, after_seq: int, limit: int, *, max_bytes: int = MAX_PAGE_BYTES
    ) -> EventPage:
        """Events with seq > after_seq, in seq order: at most `limit` and about `max_bytes`."""
        sizes = await self._db.fetch(
            "SELECT seq, bytes FROM task_events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (task_id, after_seq, limit + 1),
            bulk=True,
        )
        chosen, cut = _fit(sizes[:limit], max_bytes, 1)
        if not chosen:
            return EventPage([], False)
        rows = await self._db.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM task_events"
            " WHERE task_id = ? AND seq BETWEEN ? AND ? ORDER BY seq",
            (task_id, chosen[0][0], chosen[-1][0]),
            bulk=True,
        )
        return EventPage([_event_from_row(row) for row in rows], cut or len(sizes) > limit)

    async def first_kept_seq(self, task_id: str) -> int | None:
        """The lowest seq still stored for a task (history may be trimmed), or None."""
        rows = await self._db.fetch(
            "SELECT MIN(seq) FROM task_events WHERE task_id = ?", (task_id,)
        )
        return rows[0][0] if rows else None

    async def count_tasks_by_status(self) -> dict[str, int]:
        """Number of tasks per status (metrics); reads the `tasks_by_status` index only."""
        rows = await self._db.fetch("SELECT status, COUNT(*) FROM tasks GROUP BY status")
        return {row[0]: row[1] for row in rows}

    async def count_unfinished(self, kinds: Iterable[str]) -> int:
        """How many tasks of the given kinds are pending or running (jobs to resume)."""
        wanted = list(kinds)
        if not wanted:
            return 0
        rows = await self._db.fetch(
            "SELECT COUNT(*) FROM tasks WHERE status IN ('pending', 'running')"
            f" AND kind IN ({','.join('?' * len(wanted))})",
            wanted,
        )
        return int(rows[0][0])

    async def tasks_to_resume(
        self, kinds: Iterable[str], after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[Task]:
        """Unfinished tasks of the given kinds, oldest first, a page at a time.

        `after` is (created_at, id) of the last task of the previous page.
        """
        wanted = list(kinds)
        if not wanted:
            return []
        since, since_id = after or ("", "")
        rows = await self._db.fetch(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE status IN ('pending', 'running')"
            f" AND kind IN ({','.join('?' * len(wanted))}) AND (created_at, id) > (?, ?)"
            " ORDER BY created_at, id LIMIT ?",
            [*wanted, since, since_id, limit],
            bulk=True,
        )
        return [_task_from_row(row) for row in rows]

    # -- tasks and events: the one write path --------------------------------------------

    async def apply(
        self, requests: Sequence[Request], quotas: Quotas, clock: Callable[[], str]
    ) -> Plan:
        """Plan and commit a batch of task changes in one transaction (see sqlite_writes)."""
        return await self._writer.apply(requests, quotas, clock)

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
        rows = await self._db.fetch(
            "SELECT task_id, connection_id, subscribed_at, unsubscribed_at FROM subscriptions"
            " WHERE user_id = ? ORDER BY subscribed_at DESC, id DESC LIMIT ?",
            (user_id, limit),
        )
        return [
            SubscriptionRecord(
                task_id=r["task_id"],
                connection_id=r["connection_id"],
                subscribed_at=r["subscribed_at"],
                unsubscribed_at=r["unsubscribed_at"],
            )
            for r in rows
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
        rows = await self._db.fetch(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT MIN(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            f" {subs} AS subscriptions"
            " FROM tasks t WHERE t.finished_at < ? AND (t.finished_at, t.id) > (?, ?)"
            " AND +t.status IN ('completed', 'failed', 'cancelled')"
            " ORDER BY t.finished_at, t.id LIMIT ?",
            (finished_before, since, since_id, limit),
            bulk=True,
        )
        return [_span_from_row(row) for row in rows]

    async def task_spans(self, task_ids: Sequence[str]) -> list[EventSpan]:
        """The event spans of the given tasks (those that still exist)."""
        if not task_ids:
            return []
        rows = await self._db.fetch(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT MIN(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            " 0 AS subscriptions"
            f" FROM tasks t WHERE t.id IN ({','.join('?' * len(task_ids))})",
            list(task_ids),
            bulk=True,
        )
        return [_span_from_row(row) for row in rows]

    async def tasks_with_seq_over(
        self, seq: int, after_rowid: int, limit: int
    ) -> tuple[int | None, list[str]]:
        """One page of a scan of all tasks: ids of those whose latest seq is above `seq`.

        Looks at up to `limit` tasks after `after_rowid` (so other reads get their turn
        between pages); returns the last rowid looked at (None: the scan is over) and the ids.
        """
        rows = await self._db.fetch(
            "SELECT rowid, id, seq FROM tasks WHERE rowid > ? ORDER BY rowid LIMIT ?",
            (after_rowid, limit),
            bulk=True,
        )
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
            # Events first: their quota trigger finds the task's owner through the task row.
            events = conn.executemany("DELETE FROM task_events WHERE task_id = ?", ids).rowcount
            subs = conn.executemany("DELETE FROM subscriptions WHERE task_id = ?", ids).rowcount
            tasks = conn.executemany("DELETE FROM tasks WHERE id = ?", ids).rowcount
            return tasks, events, subs

        return await self._db.write(transaction)
