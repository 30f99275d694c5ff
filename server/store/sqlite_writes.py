"""The task write path on SQLite: plan a batch and write it, all on the writer thread.

One call (`TaskWriter.apply`) is one transaction and one thread hand-off: it reads what
the plan needs (the tasks' states, the users' counts) through a `TaskView` on the write
connection, lets the pure planner (`lifecycle.plan_batch`) decide, writes the plan with a
few `executemany`, commits, and then updates its caches from what was committed.

The caches are safe because this process is the only writer of task rows (a lock file
keeps a second server out): the states of recently written unfinished tasks (small
`TaskState`s, never params or results), each user's number of unfinished tasks, and each
user's stored bytes (re-read now and then, since retention lowers it behind our back).
Only the writer thread touches them, and only after a commit, so a rolled-back plan
leaves no trace.
"""

from __future__ import annotations

import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from ..idempotency import KEEP_SECONDS, Answer, Claim
from ..lifecycle import Plan, Quotas, Request, TaskWrite, plan_batch
from ..models import TaskState, TaskStatus
from .records import StoreUnavailable, iso_time
from .sqlite_db import Database

#: Unfinished tasks whose state is cached (about 300 bytes each).
STATE_CACHE = 10_000
#: Users whose unfinished-task count and stored bytes are cached.
USER_CACHE = 100_000
#: Seconds a cached stored-bytes figure is trusted (retention lowers it meanwhile).
BYTES_TTL = 60.0

_STATE_COLUMNS = (
    "id, user_id, kind, status, progress, step, seq, created_at, updated_at, started_at,"
    " finished_at, parent_id, weight, depth, finish, tree, rate, eta_s, meter"
)
_TASK_COLUMNS = (
    "id, user_id, kind, params, status, progress, step, message, result, error, seq,"
    " checkpoint, created_at, updated_at, started_at, finished_at, bytes,"
    " parent_id, weight, depth, finish, tree, rate, eta_s, meter"
)
_EVENT_COLUMNS = (
    "task_id, seq, event, status, progress, step, message, result, error, ts, bytes,"
    " rate, eta_s, child"
)
#: SQLite result codes that say the database cannot take writes now, whatever the request:
#: busy or locked, full, read-only, I/O error, corrupt, cannot open.
TRANSIENT_CODES = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_CORRUPT,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOTADB,
    }
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that belong to the database, not to one request."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in TRANSIENT_CODES
    return isinstance(exc, sqlite3.OperationalError)


def _state_from_row(row: sqlite3.Row) -> TaskState:
    return TaskState(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        status=TaskStatus(row["status"]),
        progress=row["progress"],
        step=row["step"],
        seq=row["seq"],
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
        meter=row["meter"],
    )


class _View:
    """A `lifecycle.TaskView` on the write connection, in front of the writer's caches."""

    def __init__(self, conn: sqlite3.Connection, writer: TaskWriter) -> None:
        self._conn = conn
        self._writer = writer

    def task(self, task_id: str) -> TaskState | None:
        cached = self._writer.states.get(task_id)
        if cached is not None:
            return cached
        row = self._conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return None if row is None else _state_from_row(row)

    def unfinished_tasks(self, user_id: int) -> int:
        count = self._writer.unfinished.get(user_id)
        if count is None:
            count = self._conn.execute(
                "SELECT COUNT(*) FROM tasks WHERE user_id = ? AND status IN ('pending', 'running')",
                (user_id,),
            ).fetchone()[0]
            self._writer.remember_unfinished(user_id, count)
        return count

    def stored_bytes(self, user_id: int) -> int | None:
        cached = self._writer.user_bytes.get(user_id)
        if cached is not None and time.monotonic() - cached[1] < BYTES_TTL:
            return cached[0]
        row = self._conn.execute(
            "SELECT stored_bytes FROM users WHERE id = ?", (user_id,)
        ).fetchone()
        if row is None:
            return None
        self._writer.remember_bytes(user_id, row[0])
        return int(row[0])

    def children(self, parent_id: str) -> list[TaskState]:
        rows = self._conn.execute(
            f"SELECT {_STATE_COLUMNS} FROM tasks WHERE parent_id = ?", (parent_id,)
        ).fetchall()
        return [self._writer.states.get(row["id"]) or _state_from_row(row) for row in rows]

    def results(self, task_ids: Sequence[str]) -> dict[str, str | None]:
        if not task_ids:
            return {}
        rows = self._conn.execute(
            f"SELECT id, result FROM tasks WHERE id IN ({','.join('?' * len(task_ids))})",
            list(task_ids),
        ).fetchall()
        return {row[0]: row[1] for row in rows}

    def answer(self, claim: Claim) -> Answer | None:
        row = self._conn.execute(
            "SELECT fingerprint, status, body FROM idempotency_keys"
            " WHERE user_id = ? AND key = ? AND created_at > ?",
            (claim.user_id, claim.key, iso_time(time.time() - KEEP_SECONDS)),
        ).fetchone()
        return None if row is None else Answer(row[0], row[1], row[2])


class TaskWriter:
    """Plans and writes batches of task changes on the writer thread; owns its caches."""

    def __init__(self, db: Database) -> None:
        self._db = db
        #: Committed state of recently written unfinished tasks (LRU).
        self.states: OrderedDict[str, TaskState] = OrderedDict()
        #: user id -> unfinished tasks, as committed.
        self.unfinished: dict[int, int] = {}
        #: user id -> (stored bytes as committed, monotonic time it was read).
        self.user_bytes: dict[int, tuple[int, float]] = {}

    async def apply(
        self, requests: Sequence[Request], quotas: Quotas, clock: Callable[[], str]
    ) -> Plan:
        """Plan `requests` on the committed state, write the plan and commit: one hand-off.

        Raises:
            StoreUnavailable: the database could not commit (nothing was written).
            Exception: anything else failed (nothing was written); it may belong to one
                request, so the caller may retry the requests one by one.
        """

        def transaction(conn: sqlite3.Connection) -> Plan:
            plan = plan_batch(requests, _View(conn, self), quotas, clock)
            self._write(conn, plan.writes.values(), plan.bytes_delta)
            if plan.answers:
                at = clock()
                # REPLACE: an expired answer (not yet deleted by retention) gives way.
                conn.executemany(
                    "INSERT OR REPLACE INTO idempotency_keys"
                    " (user_id, key, fingerprint, status, body, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (c.user_id, c.key, a.fingerprint, a.status, a.body, at)
                        for c, a in plan.answers
                    ],
                )
            return plan

        try:
            return await self._db.writer.run(transaction, after_commit=self._remember)
        except sqlite3.Error as exc:
            if is_transient(exc):
                raise StoreUnavailable(str(exc)) from exc
            raise

    # -- caches: updated only after a commit, on the writer thread ------------------------

    def _remember(self, plan: Plan) -> None:
        for task_id, write in plan.writes.items():
            if write.state.status.is_terminal:
                self.states.pop(task_id, None)
            else:
                self.states[task_id] = write.state
                self.states.move_to_end(task_id)
        while len(self.states) > STATE_CACHE:
            self.states.popitem(last=False)
        for user_id, delta in plan.unfinished_delta.items():
            if user_id in self.unfinished:
                self.unfinished[user_id] += delta
        for user_id, delta in plan.bytes_delta.items():
            cached = self.user_bytes.get(user_id)
            if cached is not None:
                self.user_bytes[user_id] = (cached[0] + delta, cached[1])

    def remember_unfinished(self, user_id: int, count: int) -> None:
        if len(self.unfinished) >= USER_CACHE:
            self.unfinished.clear()
        self.unfinished[user_id] = count

    def remember_bytes(self, user_id: int, stored: int) -> None:
        if len(self.user_bytes) >= USER_CACHE:
            self.user_bytes.clear()
        self.user_bytes[user_id] = (stored, time.monotonic())

    def forget(self) -> None:
        """Drop every cached figure (another process changed the database)."""
        self.states.clear()
        self.unfinished.clear()
        self.user_bytes.clear()

    # -- the writes -------------------------------------------------------------------------

    @staticmethod
    def _write(conn: sqlite3.Connection, writes: Any, bytes_delta: dict[int, int]) -> None:
        inserts: list[tuple[Any, ...]] = []
        updates: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        for write in writes:
            if write.created is not None:
                inserts.append(_insert_row(write))
            else:
                updates.append(_update_row(write))
            events.extend(
                (
                    e.task_id,
                    e.seq,
                    e.event.value,
                    e.status.value,
                    e.progress,
                    e.step,
                    e.message,
                    e.result,
                    e.error,
                    e.ts,
                    e.stored_bytes,
                    e.rate,
                    e.eta_s,
                    e.child,
                )
                for e in write.events
            )
        if inserts:
            conn.executemany(
                f"INSERT INTO tasks ({_TASK_COLUMNS}) VALUES ({', '.join('?' * 25)})",
                inserts,
            )
        if updates:
            conn.executemany(
                "UPDATE tasks SET status = ?, progress = ?, step = ?,"
                " message = CASE WHEN ? THEN ? ELSE message END,"
                " result = COALESCE(?, result), error = COALESCE(?, error), seq = ?,"
                " checkpoint = CASE WHEN ? THEN ? ELSE checkpoint END, updated_at = ?,"
                " started_at = ?, finished_at = ?, bytes = bytes + ?, tree = ?, rate = ?,"
                " eta_s = ?, meter = ? WHERE id = ?",
                updates,
            )
        if events:
            conn.executemany(
                f"INSERT INTO task_events ({_EVENT_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                events,
            )
        if bytes_delta:
            conn.executemany(
                "UPDATE users SET stored_bytes = stored_bytes + ? WHERE id = ?",
                [(delta, user_id) for user_id, delta in bytes_delta.items() if delta],
            )


def _insert_row(write: TaskWrite) -> tuple[Any, ...]:
    task, state = write.created, write.state
    assert task is not None
    return (
        task.id,
        task.user_id,
        task.kind,
        task.params,
        state.status.value,
        state.progress,
        state.step,
        write.message if write.set_message else None,
        write.result,
        write.error,
        state.seq,
        write.checkpoint if write.set_checkpoint else None,
        task.created_at,
        state.updated_at,
        state.started_at,
        state.finished_at,
        write.row_bytes,
        task.parent_id,
        task.weight,
        task.depth,
        task.finish,
        state.tree,
        state.rate,
        state.eta_s,
        state.meter,
    )


def _update_row(write: TaskWrite) -> tuple[Any, ...]:
    state = write.state
    return (
        state.status.value,
        state.progress,
        state.step,
        write.set_message,
        write.message,
        write.result,
        write.error,
        state.seq,
        write.set_checkpoint,
        write.checkpoint,
        state.updated_at,
        state.started_at,
        state.finished_at,
        write.row_bytes,
        state.tree,
        state.rate,
        state.eta_s,
        state.meter,
        state.id,
    )
