"""The SQLite store: every read, and the task write path (planned and written on the writer
thread by `sqlite_writes.TaskWriter`); accounts are in sqlite_accounts.py. Returns models;
knows nothing of HTTP or WebSockets.

Every read is executed and fetched in one call on a reader of the pool (see sqlite_db);
reads that can be long (lists, replays) go in the pool's bulk lane and are bounded in
bytes as well as rows: their sizes are read first (small rows), then exactly the rows that
fit, so a page is never loaded only to find out it is too big.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from ..lifecycle import Plan, Quotas, Request
from ..models import Event, EventType, Task, TaskStatus
from .records import (
    MAX_PAGE_BYTES,
    EventPage,
    EventSpan,
    StoreUnavailable,
    SubscriptionRecord,
    TaskPage,
    fit,
)
from .sqlite_db import Database, DatabaseError, open_database
from .sqlite_writes import TaskWriter, is_transient

#: Pages handed back to the file system per incremental-vacuum step (1 MiB of 4 KiB
#: pages): each step holds the writer only briefly.
VACUUM_PAGES = 256
#: SQLite's `PRAGMA auto_vacuum` value for INCREMENTAL.
_AUTO_VACUUM_INCREMENTAL = 2

_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at, parent_id, weight, depth,"
    " finish, tree, rate, eta_s"
)
_EVENT_COLUMNS = (
    "task_id, seq, event, status, progress, step, message, result, error, ts, rate, eta_s, child"
)

log = logging.getLogger(__name__)


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
        parent_id=row["parent_id"],
        weight=row["weight"],
        depth=row["depth"],
        finish=row["finish"],
        tree=row["tree"],
        rate=row["rate"],
        eta_s=row["eta_s"],
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
        rate=row["rate"],
        eta_s=row["eta_s"],
        child=row["child"],
    )


def _span_from_row(row: sqlite3.Row) -> EventSpan:
    return EventSpan(
        task_id=row["id"],
        finished_at=row["finished_at"],
        seq=row["seq"],
        first_kept=row["first_kept"],
        subscriptions=row["subscriptions"],
    )


async def open_sqlite(path: Path, migrations_dir: Path, synchronous: str, readers: int) -> Any:
    """The SQLite `Backend` (see store/__init__.py) for the file at `path`."""
    from . import Backend
    from .sqlite_accounts import SQLiteAccounts
    from .sqlite_grants import SQLiteGrants

    db = await open_database(path, migrations_dir, synchronous, readers)
    # One process uses the file (its lock file sees to it): leases left by the previous
    # run are stale, and its jobs resume at once rather than when those leases expire.
    try:
        await db.execute("DELETE FROM job_leases")
    except BaseException as exc:
        # Closed here or never: its aiosqlite threads would keep the process from exiting.
        await db.close()
        if isinstance(exc, sqlite3.Error):  # e.g. "database is locked" by migrate-store
            raise DatabaseError(f"{path}: {exc}") from exc
        raise
    return Backend(
        kind="sqlite",
        store=SQLiteStore(db),
        accounts=SQLiteAccounts(db),
        grants=SQLiteGrants(db),
        close=db.close,
        shared=False,
        sqlite=db,
    )


class SQLiteStore:
    """Reads on the reader pool; writes one transaction at a time on the writer thread."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._writer = TaskWriter(db)
        #: auto_vacuum mode, read once (None: not yet).
        self._auto_vacuum: int | None = None

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
        roots_only: bool = False,
    ) -> TaskPage:
        """A user's tasks, newest first, optionally only those in `statuses` (and only
        those with no parent: `roots_only`).

        At most `limit` tasks and about `max_bytes` (at least one task): `before` is the
        continuation of the previous page, `(created_at, rowid)` of its last task.
        """
        where = "user_id = ?"
        args: list[Any] = [user_id]
        if roots_only:
            where += " AND parent_id IS NULL"
        if statuses is not None:
            wanted = [s.value for s in statuses]
            where += f" AND status IN ({','.join('?' * len(wanted))})"
            args += wanted
        if before is not None:
            where += " AND (created_at, rowid) < (?, ?)"
            args += list(before)
        return await self._task_page(where, args, "DESC", limit, max_bytes)

    async def list_children(
        self,
        parent_id: str,
        limit: int,
        *,
        after: tuple[str, int] | None = None,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> TaskPage:
        """A task's children, oldest first; `after` continues a page as `before` does."""
        where = "parent_id = ?"
        args: list[Any] = [parent_id]
        if after is not None:
            where += " AND (created_at, rowid) > (?, ?)"
            args += list(after)
        return await self._task_page(where, args, "ASC", limit, max_bytes)

    async def _task_page(
        self, where: str, args: list[Any], direction: str, limit: int, max_bytes: int
    ) -> TaskPage:
        """Tasks matching `where`, in `direction` of (created_at, rowid): the sizes first,
        then the rows of the prefix that fits `max_bytes` (`records.fit`)."""
        order = f"created_at {direction}, rowid {direction}"
        sizes = await self._db.fetch(
            "SELECT rowid, created_at, bytes + coalesce(length(CAST(message AS BLOB)), 0)"
            f" + coalesce(length(CAST(error AS BLOB)), 0) FROM tasks WHERE {where}"
            f" ORDER BY {order} LIMIT ?",
            [*args, limit + 1],
            bulk=True,
        )
        chosen, cut = fit(sizes[:limit], max_bytes, 2)
        if not chosen:
            return TaskPage([], None)
        rows = await self._db.fetch(
            f"SELECT {_TASK_COLUMNS} FROM tasks WHERE rowid IN ({','.join('?' * len(chosen))})"
            f" ORDER BY {order}",
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
        chosen, cut = fit(sizes[:limit], max_bytes, 1)
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
        """Unfinished tasks of the given kinds whose job lease is absent or expired, oldest
        first, a page at a time. `after` is (created_at, id) of the previous page's last."""
        wanted = list(kinds)
        if not wanted:
            return []
        since, since_id = after or ("", "")
        rows = await self._db.fetch(
            f"SELECT {_TASK_COLUMNS.replace('id,', 't.id,', 1)} FROM tasks t"
            " LEFT JOIN job_leases l ON l.task_id = t.id"
            " WHERE t.status IN ('pending', 'running')"
            f" AND t.kind IN ({','.join('?' * len(wanted))}) AND (t.created_at, t.id) > (?, ?)"
            " AND (l.task_id IS NULL OR l.expires_at < ?)"
            " ORDER BY t.created_at, t.id LIMIT ?",
            [*wanted, since, since_id, time.time(), limit],
            bulk=True,
        )
        return [_task_from_row(row) for row in rows]

    async def task_seqs(self, task_ids: Sequence[str]) -> dict[str, int]:
        """The latest seq of each task that exists."""
        found: dict[str, int] = {}
        for start in range(0, len(task_ids), 500):
            chunk = list(task_ids[start : start + 500])
            rows = await self._db.fetch(
                f"SELECT id, seq FROM tasks WHERE id IN ({','.join('?' * len(chunk))})", chunk
            )
            found.update((row[0], row[1]) for row in rows)
        return found

    # -- job leases ----------------------------------------------------------------------

    async def acquire_lease(self, task_id: str, node_id: str, ttl: float) -> bool:
        now = time.time()
        return (
            await self._db.execute(
                "INSERT INTO job_leases (task_id, node_id, expires_at)"
                " SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?1)"
                " ON CONFLICT (task_id) DO UPDATE SET node_id = ?2, expires_at = ?3"
                " WHERE job_leases.node_id = ?2 OR job_leases.expires_at < ?4",
                (task_id, node_id, now + ttl, now),
            )
            > 0
        )

    async def renew_leases(self, node_id: str, task_ids: Sequence[str], ttl: float) -> set[str]:
        if not task_ids:
            return set()
        ids = list(task_ids)

        def renew(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute(
                f"UPDATE job_leases SET expires_at = ? WHERE node_id = ?"
                f" AND task_id IN ({','.join('?' * len(ids))}) RETURNING task_id",
                (time.time() + ttl, node_id, *ids),
            ).fetchall()
            return {row[0] for row in rows}

        return await self._db.write(renew)

    async def release_lease(self, task_id: str, node_id: str) -> None:
        await self._db.execute(
            "DELETE FROM job_leases WHERE task_id = ? AND node_id = ?", (task_id, node_id)
        )

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
        node_id: str = "",
    ) -> None:
        """Record (connection_id, user_id, task_id, at) opened and (connection_id, task_id, at)
        closed subscriptions in one transaction."""
        if not opened and not closed:
            return

        def transaction(conn: sqlite3.Connection) -> None:
            if opened:
                conn.executemany(
                    "INSERT INTO subscriptions"
                    " (connection_id, user_id, task_id, subscribed_at, node_id)"
                    " SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM tasks WHERE id = ?3)",
                    [(*row, node_id) for row in opened],
                )
            if closed:
                conn.executemany(
                    "UPDATE subscriptions SET unsubscribed_at = ?3"
                    " WHERE connection_id = ?1 AND task_id = ?2 AND unsubscribed_at IS NULL",
                    closed,
                )

        try:
            await self._db.write(transaction)
        except sqlite3.Error as exc:
            if is_transient(exc):  # busy, full, read-only, I/O: worth trying again later
                raise StoreUnavailable(str(exc)) from exc
            raise

    async def close_open_subscriptions(self, at: str, node_id: str = "") -> int:
        """Mark every still-open subscription closed (at startup: no connection survived;
        one process uses a SQLite file, so that is every node's)."""
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
        self, seq: int, after_id: str, limit: int
    ) -> tuple[str | None, list[str]]:
        """One page of a scan of all tasks: ids of those whose latest seq is above `seq`.

        Looks at up to `limit` tasks after `after_id` (so other reads get their turn
        between pages); returns the last id looked at (None: the scan is over) and the ids.
        """
        rows = await self._db.fetch(
            "SELECT id, seq FROM tasks WHERE id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
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

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """One process uses a SQLite file (its lock file sees to it): always granted."""
        yield True

    async def reclaim(self, pause: Callable[[], Awaitable[None]]) -> int:
        """Give free pages back in small steps, then checkpoint and truncate the WAL."""
        if self._auto_vacuum is None:
            self._auto_vacuum = await self._db.auto_vacuum_mode()
        freed = 0
        if self._auto_vacuum == _AUTO_VACUUM_INCREMENTAL:
            free = await self._db.free_pages()
            # Bounded: each step frees up to VACUUM_PAGES; the loop stops when none are left.
            for _ in range(math.ceil(free / VACUUM_PAGES)):
                await self._db.incremental_vacuum(VACUUM_PAGES)
                await pause()
            if free:
                freed = max(0, free - await self._db.free_pages())
        busy, wal_pages, done = await self._db.checkpoint()
        if busy:
            log.debug("db.checkpoint_busy wal_pages=%d checkpointed=%d", wal_pages, done)
        return freed

    # -- operations ----------------------------------------------------------------------

    async def size_bytes(self) -> dict[str, int]:
        sizes = {}
        for name, path in (("db", self._db.path), ("wal", Path(f"{self._db.path}-wal"))):
            try:
                sizes[name] = path.stat().st_size
            except OSError:
                pass
        return sizes

    async def ping(self) -> None:
        try:
            await self._db.fetch("SELECT 1")
        except sqlite3.Error as exc:
            raise StoreUnavailable(str(exc)) from exc
