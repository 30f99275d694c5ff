"""The PostgreSQL store: any number of server nodes on one database.

The same contract as the SQLite store (sqlite.py is the reference; one suite,
tests/test_store_contract.py, runs against both), with what sharing a database among
nodes changes:

- the write path (`postgres_writes`) keeps no state across batches and locks what each
  batch touches, so seqs stay gapless and unique whichever node writes;
- job leases and the resume scan use the database's clock (`clock_timestamp()`), never a
  node's, so nodes whose clocks disagree still agree on who holds a lease;
- `exclusive` is a session-level advisory lock on a connection held for the duration;
- every failure of the database to serve is `StoreUnavailable`, reads included.

Pages are capped in bytes as on SQLite, in one statement: a window sum over the sizes of
the candidate rows picks the prefix that fits, and only those rows' columns are read.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg

from ..lifecycle import Plan, Quotas, Request
from ..models import Event, EventType, Task, TaskStatus
from . import postgres_writes
from .postgres_db import (
    CONNECT_TIMEOUT,
    PostgresDatabase,
    changed_rows,
    is_unavailable,
    lock_key,
    open_database,
    unavailable,
)
from .postgres_writes import number
from .records import (
    MAX_PAGE_BYTES,
    EventPage,
    EventSpan,
    SubscriptionRecord,
    TaskPage,
)

log = logging.getLogger(__name__)

_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at, parent_id, weight, depth,"
    " finish, tree, rate, eta_s"
)
_EVENT_COLUMNS = (
    "task_id, seq, event, status, progress, step, message, result, error, ts, rate, eta_s, child"
)
#: The same, of the tables aliased `t` and `e`.
_T_COLUMNS = ", ".join("t." + column.strip() for column in _TASK_COLUMNS.split(","))
_E_COLUMNS = ", ".join("e." + column.strip() for column in _EVENT_COLUMNS.split(","))
_TERMINAL = "('completed', 'failed', 'cancelled')"
_UNFINISHED = "('pending', 'running')"


def _task_from_row(row: asyncpg.Record) -> Task:
    return Task(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        params=row["params"],
        status=TaskStatus(row["status"]),
        progress=number(row["progress"]),
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
        weight=number(row["weight"]),
        depth=row["depth"],
        finish=row["finish"],
        tree=row["tree"],
        rate=row["rate"],
        eta_s=row["eta_s"],
    )


def _event_from_row(row: asyncpg.Record) -> Event:
    return Event(
        task_id=row["task_id"],
        seq=row["seq"],
        event=EventType(row["event"]),
        status=TaskStatus(row["status"]),
        progress=number(row["progress"]),
        step=row["step"],
        message=row["message"],
        result=row["result"],
        error=row["error"],
        ts=row["ts"],
        rate=row["rate"],
        eta_s=row["eta_s"],
        child=row["child"],
    )


def _span_from_row(row: asyncpg.Record) -> EventSpan:
    return EventSpan(
        task_id=row["id"],
        finished_at=row["finished_at"],
        seq=row["seq"],
        first_kept=row["first_kept"],
        subscriptions=row["subscriptions"],
    )


async def open_postgres(url: str, migrations_dir: Path) -> Any:
    """The PostgreSQL `Backend` (see store/__init__.py) for the database at `url`.

    Raises:
        StoreUnavailable: the server cannot be reached or refuses us.
        DatabaseError: its schema is newer than this version.
    """
    from . import Backend
    from .postgres_accounts import PostgresAccounts
    from .postgres_grants import PostgresGrants

    db = await open_database(url, migrations_dir)
    return Backend(
        kind="postgresql",
        store=PostgresStore(db),
        accounts=PostgresAccounts(db),
        grants=PostgresGrants(db),
        close=db.close,
        shared=True,
    )


class PostgresStore:
    """Reads on the read pool; each write one transaction on the write pool."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._db = db

    # -- tasks and events: reads ---------------------------------------------------------

    async def get_task(self, task_id: str) -> Task | None:
        row = await self._db.fetchrow(f"SELECT {_TASK_COLUMNS} FROM tasks WHERE id = $1", task_id)
        return None if row is None else _task_from_row(row)

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
        """A user's tasks, newest first: at most `limit` and about `max_bytes` (at least
        one); `before` continues after `(created_at, row_no)` of the last page's last;
        `roots_only`: only tasks with no parent."""
        where = "user_id = $1"
        args: list[Any] = [user_id, limit, max_bytes]
        if roots_only:
            where += " AND parent_id IS NULL"
        if statuses is not None:
            args.append([s.value for s in statuses])
            where += f" AND status = ANY(${len(args)}::text[])"
        if before is not None:
            args += [before[0], before[1]]
            where += f" AND (created_at, row_no) < (${len(args) - 1}, ${len(args)}::bigint)"
        return await self._task_page(where, args, "DESC")

    async def list_children(
        self,
        parent_id: str,
        limit: int,
        *,
        after: tuple[str, int] | None = None,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> TaskPage:
        """A task's children, oldest first; `after` continues a page as `before` does."""
        where = "parent_id = $1"
        args: list[Any] = [parent_id, limit, max_bytes]
        if after is not None:
            args += [after[0], after[1]]
            where += f" AND (created_at, row_no) > (${len(args) - 1}, ${len(args)}::bigint)"
        return await self._task_page(where, args, "ASC")

    async def _task_page(self, where: str, args: list[Any], direction: str) -> TaskPage:
        """Tasks matching `where` ($2 the limit, $3 the byte budget) in `direction` of
        (created_at, row_no)."""
        order = f"created_at {direction}, row_no {direction}"
        # The candidates (limit + 1, to know whether more exist) with their sizes' running
        # sum; then the full rows of the prefix that fits (`records.fit`: the first row
        # always, the next ones while the total is within max_bytes).
        rows = await self._db.fetch(
            "WITH candidates AS ("
            " SELECT id, created_at, row_no, row_number() OVER w AS n,"
            " sum(size) OVER w AS total FROM ("
            "  SELECT id, created_at, row_no, bytes + coalesce(octet_length(message), 0)"
            "  + coalesce(octet_length(error), 0) AS size"
            f"  FROM tasks WHERE {where} ORDER BY {order} LIMIT $2 + 1"
            f" ) c WINDOW w AS (ORDER BY {order}))"
            " SELECT c.n, c.created_at AS cursor_at, c.row_no AS cursor_no,"
            f" {_T_COLUMNS}"
            " FROM candidates c LEFT JOIN tasks t ON t.id = c.id"
            " AND c.n <= $2 AND (c.n = 1 OR c.total <= $3)"
            " ORDER BY c.n",
            *args,
            bulk=True,
        )
        chosen = [row for row in rows if row["id"] is not None]
        if not chosen:
            return TaskPage([], None)
        last = chosen[-1]
        more = len(rows) > len(chosen)
        return TaskPage(
            [_task_from_row(row) for row in chosen],
            (last["cursor_at"], last["cursor_no"]) if more else None,
        )

    async def list_events(
        self, task_id: str, after_seq: int, limit: int, *, max_bytes: int = MAX_PAGE_BYTES
    ) -> EventPage:
        """Events with seq > after_seq, in seq order: at most `limit` and about `max_bytes`."""
        rows = await self._db.fetch(
            "WITH candidates AS ("
            " SELECT seq, row_number() OVER w AS n, sum(bytes) OVER w AS total FROM ("
            "  SELECT seq, bytes FROM task_events WHERE task_id = $1 AND seq > $2"
            "  ORDER BY seq LIMIT $3 + 1"
            " ) c WINDOW w AS (ORDER BY seq))"
            f" SELECT c.n, {_E_COLUMNS}"
            " FROM candidates c LEFT JOIN task_events e ON e.task_id = $1 AND e.seq = c.seq"
            " AND c.n <= $3 AND (c.n = 1 OR c.total <= $4)"
            " ORDER BY c.n",
            task_id,
            after_seq,
            limit,
            max_bytes,
            bulk=True,
        )
        events = [_event_from_row(row) for row in rows if row["seq"] is not None]
        return EventPage(events, len(rows) > len(events))

    async def first_kept_seq(self, task_id: str) -> int | None:
        return await self._db.fetchval(
            "SELECT min(seq) FROM task_events WHERE task_id = $1", task_id
        )

    async def task_seqs(self, task_ids: Sequence[str]) -> dict[str, int]:
        """The latest seq of each task that exists."""
        if not task_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT id, seq FROM tasks WHERE id = ANY($1::text[])", list(task_ids)
        )
        return {row[0]: row[1] for row in rows}

    async def count_tasks_by_status(self) -> dict[str, int]:
        rows = await self._db.fetch("SELECT status, count(*) FROM tasks GROUP BY status")
        return {row[0]: row[1] for row in rows}

    async def count_unfinished(self, kinds: Iterable[str]) -> int:
        wanted = list(kinds)
        if not wanted:
            return 0
        return int(
            await self._db.fetchval(
                f"SELECT count(*) FROM tasks WHERE status IN {_UNFINISHED}"
                " AND kind = ANY($1::text[])",
                wanted,
            )
        )

    async def tasks_to_resume(
        self, kinds: Iterable[str], after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[Task]:
        """Unfinished tasks of `kinds` with no live lease (by the database's clock), oldest
        first; `after` is (created_at, id) of the previous page's last."""
        wanted = list(kinds)
        if not wanted:
            return []
        since, since_id = after or ("", "")
        rows = await self._db.fetch(
            f"SELECT {_T_COLUMNS} FROM tasks t LEFT JOIN job_leases l ON l.task_id = t.id"
            f" WHERE t.status IN {_UNFINISHED} AND t.kind = ANY($1::text[])"
            " AND (t.created_at, t.id) > ($2, $3)"
            " AND (l.task_id IS NULL OR l.expires_at < clock_timestamp())"
            " ORDER BY t.created_at, t.id LIMIT $4",
            wanted,
            since,
            since_id,
            limit,
            bulk=True,
        )
        return [_task_from_row(row) for row in rows]

    # -- job leases: by the database's clock ---------------------------------------------

    async def acquire_lease(self, task_id: str, node_id: str, ttl: float) -> bool:
        """Take or renew the lease unless another node holds one that has not expired."""
        try:
            taken = await self._db.write(
                lambda conn: conn.fetchval(
                    "INSERT INTO job_leases (task_id, node_id, expires_at)"
                    " SELECT $1, $2, clock_timestamp() + make_interval(secs => $3)"
                    " WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $1)"
                    " ON CONFLICT (task_id) DO UPDATE SET node_id = EXCLUDED.node_id,"
                    " expires_at = EXCLUDED.expires_at"
                    " WHERE job_leases.node_id = EXCLUDED.node_id"
                    " OR job_leases.expires_at < clock_timestamp()"
                    " RETURNING task_id",
                    task_id,
                    node_id,
                    float(ttl),
                )
            )
        except asyncpg.ForeignKeyViolationError:  # the task was deleted meanwhile
            return False
        return taken is not None

    async def renew_leases(self, node_id: str, task_ids: Sequence[str], ttl: float) -> set[str]:
        """Extend this node's leases; returns those it still holds."""
        if not task_ids:
            return set()
        rows = await self._db.write(
            lambda conn: conn.fetch(
                "UPDATE job_leases SET expires_at = clock_timestamp() + make_interval(secs => $3)"
                " WHERE node_id = $1 AND task_id = ANY($2::text[]) RETURNING task_id",
                node_id,
                list(task_ids),
                float(ttl),
            )
        )
        return {row[0] for row in rows}

    async def release_lease(self, task_id: str, node_id: str) -> None:
        await self._db.execute(
            "DELETE FROM job_leases WHERE task_id = $1 AND node_id = $2", task_id, node_id
        )

    # -- the one write path --------------------------------------------------------------

    async def apply(
        self, requests: Sequence[Request], quotas: Quotas, clock: Callable[[], str]
    ) -> Plan:
        """Plan and commit a batch in one transaction (see postgres_writes)."""
        return await postgres_writes.apply(self._db, requests, quotas, clock)

    # -- subscription history ------------------------------------------------------------

    async def record_subscriptions(
        self,
        opened: Sequence[tuple[str, int, str, str]],
        closed: Sequence[tuple[str, str, str]],
        node_id: str = "",
    ) -> None:
        """Record opened (connection_id, user_id, task_id, at) and closed (connection_id,
        task_id, at) subscriptions of this node in one transaction."""
        if not opened and not closed:
            return

        async def transaction(conn: asyncpg.Connection) -> None:
            if opened:
                # Joined to the rows they reference under KEY SHARE: a task (or user)
                # deleted meanwhile is skipped instead of failing the foreign key.
                await conn.execute(
                    "INSERT INTO subscriptions"
                    " (connection_id, user_id, task_id, subscribed_at, node_id)"
                    " SELECT x.c, x.u, x.t, x.a, $5 FROM unnest($1::text[], $2::bigint[],"
                    " $3::text[], $4::text[]) AS x(c, u, t, a)"
                    " JOIN tasks t ON t.id = x.t JOIN users u ON u.id = x.u"
                    " FOR KEY SHARE OF t, u",
                    *[list(column) for column in zip(*opened, strict=True)],
                    node_id,
                )
            if closed:
                await conn.execute(
                    "UPDATE subscriptions s SET unsubscribed_at = x.a"
                    " FROM unnest($1::text[], $2::text[], $3::text[]) AS x(c, t, a)"
                    " WHERE s.connection_id = x.c AND s.task_id = x.t"
                    " AND s.unsubscribed_at IS NULL",
                    *[list(column) for column in zip(*closed, strict=True)],
                )

        await self._db.write(transaction)

    async def close_open_subscriptions(self, at: str, node_id: str = "") -> int:
        """At start: none of this node's connections survived; other nodes' are theirs."""
        return await self._db.execute(
            "UPDATE subscriptions SET unsubscribed_at = $1"
            " WHERE unsubscribed_at IS NULL AND node_id = $2",
            at,
            node_id,
        )

    async def list_subscriptions(self, user_id: int, limit: int) -> list[SubscriptionRecord]:
        rows = await self._db.fetch(
            "SELECT task_id, connection_id, subscribed_at, unsubscribed_at FROM subscriptions"
            " WHERE user_id = $1 ORDER BY subscribed_at DESC, id DESC LIMIT $2",
            user_id,
            limit,
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

    # -- retention -----------------------------------------------------------------------

    async def finished_task_spans(
        self,
        finished_before: str,
        after: tuple[str, str] | None,
        limit: int,
        *,
        count_subscriptions: bool = False,
    ) -> list[EventSpan]:
        """Finished tasks with finished_at < `finished_before`, by (finished_at, id),
        after `after` (keyset paging; None: from the oldest)."""
        subs = (
            "(SELECT count(*) FROM subscriptions s WHERE s.task_id = t.id)"
            if count_subscriptions
            else "0"
        )
        since, since_id = after or ("", "")
        rows = await self._db.fetch(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT min(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            f" {subs} AS subscriptions"
            " FROM tasks t WHERE t.finished_at IS NOT NULL AND t.finished_at < $1"
            f" AND (t.finished_at, t.id) > ($2, $3) AND t.status IN {_TERMINAL}"
            " ORDER BY t.finished_at, t.id LIMIT $4",
            finished_before,
            since,
            since_id,
            limit,
            bulk=True,
        )
        return [_span_from_row(row) for row in rows]

    async def task_spans(self, task_ids: Sequence[str]) -> list[EventSpan]:
        if not task_ids:
            return []
        rows = await self._db.fetch(
            "SELECT t.id, t.finished_at, t.seq,"
            " (SELECT min(e.seq) FROM task_events e WHERE e.task_id = t.id) AS first_kept,"
            " 0 AS subscriptions FROM tasks t WHERE t.id = ANY($1::text[])",
            list(task_ids),
            bulk=True,
        )
        return [_span_from_row(row) for row in rows]

    async def tasks_with_seq_over(
        self, seq: int, after_id: str, limit: int
    ) -> tuple[str | None, list[str]]:
        """One page of a scan of all tasks by id: (last id looked at or None when the scan
        is over, the ids whose latest seq is above `seq`)."""
        rows = await self._db.fetch(
            "SELECT id, seq FROM tasks WHERE id > $1 ORDER BY id LIMIT $2",
            str(after_id),
            limit,
            bulk=True,
        )
        if not rows:
            return None, []
        return rows[-1]["id"], [row["id"] for row in rows if row["seq"] > seq]

    async def delete_event_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> int:
        """Delete events (task_id, first_seq, last_seq inclusive) in one transaction."""
        if not ranges:
            return 0
        tasks, firsts, lasts = (list(column) for column in zip(*ranges, strict=True))
        return await self._db.execute(
            "DELETE FROM task_events e USING unnest($1::text[], $2::bigint[], $3::bigint[])"
            " AS r(task_id, first, last)"
            " WHERE e.task_id = r.task_id AND e.seq BETWEEN r.first AND r.last",
            tasks,
            firsts,
            lasts,
        )

    async def delete_subscriptions_of(self, task_id: str, limit: int) -> int:
        return await self._db.execute(
            "DELETE FROM subscriptions WHERE id IN"
            " (SELECT id FROM subscriptions WHERE task_id = $1 LIMIT $2)",
            task_id,
            limit,
        )

    async def delete_finished_tasks(self, task_ids: Sequence[str]) -> tuple[int, int, int]:
        """Delete finished tasks with their events and subscription rows, in one
        transaction; unfinished ones are left alone. Returns (tasks, events, subs)."""
        if not task_ids:
            return 0, 0, 0

        async def transaction(conn: asyncpg.Connection) -> tuple[int, int, int]:
            # Locked first, in id order like the write path, before the triggers lock the
            # owners: a batch touching these tasks waits instead of deadlocking.
            rows = await conn.fetch(
                "SELECT id FROM tasks WHERE finished_at IS NOT NULL AND id = ANY($1::text[])"
                " ORDER BY id FOR UPDATE",
                list(task_ids),
            )
            ids = [row[0] for row in rows]
            if not ids:
                return 0, 0, 0
            # Events first: their trigger finds the owner through the task row.
            events = await conn.execute("DELETE FROM task_events WHERE task_id = ANY($1)", ids)
            subs = await conn.execute("DELETE FROM subscriptions WHERE task_id = ANY($1)", ids)
            tasks = await conn.execute("DELETE FROM tasks WHERE id = ANY($1)", ids)
            return changed_rows(tasks), changed_rows(events), changed_rows(subs)

        return await self._db.write(transaction)

    @asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[bool]:
        """Hold a session-level advisory lock named `name` for the block, on a connection
        of its own; yields False (and holds nothing) when another node holds it.

        If the connection drops meanwhile the server releases the lock with the session,
        so another node may start the same work: use it for work that tolerates an overlap
        now and then (retention does).
        """
        conn = await self._db.connect()
        try:
            key = lock_key(name)
            try:
                held = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))
            except Exception as exc:
                if is_unavailable(exc):
                    raise unavailable(exc) from exc
                raise
            yield held
            if held and not conn.is_closed():
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            try:
                await conn.close(timeout=CONNECT_TIMEOUT)
            except Exception:  # closing ends the session, and with it the lock
                conn.terminate()

    async def reclaim(self, pause: Callable[[], Awaitable[None]]) -> int:
        """Autovacuum gives deleted rows' space back to PostgreSQL: nothing to do."""
        return 0

    # -- operations ----------------------------------------------------------------------

    async def size_bytes(self) -> dict[str, int]:
        """The database's size on the server's disk."""
        return {"db": int(await self._db.fetchval("SELECT pg_database_size(current_database())"))}

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers now."""
        await self._db.fetchval("SELECT 1")
