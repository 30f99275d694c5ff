"""The task write path on PostgreSQL: lock, plan, write, commit, in one transaction.

Any node may write any task at any moment, so nothing is cached across batches: each
batch reads what its plan needs inside its own transaction, under row locks held until
commit:

1. the tasks it changes, `FOR NO KEY UPDATE` in one statement in id order (two nodes lock
   a shared set of tasks in the same order, so they wait for each other instead of
   deadlocking);
2. then the users involved (the creators, and the owners of those tasks), the same way
   in id order, with their stored bytes; then, for creators when a quota asks for it,
   their unfinished tasks, counted in a statement of its own: a statement's snapshot
   predates the lock it waited for, and the count must see the batch that held it;
3. `lifecycle.plan_batch` decides on that state (pure), and one statement writes the plan:
   new tasks, changed tasks, events and byte deltas, as `unnest` arrays;
4. commit. Acknowledged means committed (synchronous_commit=on, PostgreSQL's default).

`NO KEY UPDATE` rather than `UPDATE`: it excludes other writers just the same, but not
the foreign-key checks (`KEY SHARE`) of a subscription, an event or a lease inserted for
the same task or user meanwhile. Every other transaction that locks tasks and users does
so in this order too (tasks first, then users, each by id; see the delete triggers in
migrations/postgres/0001_initial.sql), and the rare deadlock left is retried by
`PostgresDatabase.write`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ..idempotency import KEEP_SECONDS, Answer, Claim
from ..lifecycle import Create, Plan, Quotas, Request, TaskWrite, plan_batch
from ..models import TaskState, TaskStatus
from .postgres_db import PostgresDatabase
from .records import iso_time

_LOCK_TASKS = (
    "SELECT id, user_id, kind, status, progress, step, seq, created_at, updated_at,"
    " started_at, finished_at FROM tasks WHERE id = ANY($1::text[])"
    " ORDER BY id FOR NO KEY UPDATE"
)
_LOCK_USERS = (
    "SELECT id, stored_bytes FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
)
_COUNT_UNFINISHED = (
    "SELECT user_id, count(*) FROM tasks WHERE user_id = ANY($1::bigint[])"
    " AND status IN ('pending', 'running') GROUP BY user_id"
)
#: The whole plan in one statement. Data-modifying CTEs all run, on one snapshot; no task
#: is both inserted and updated (a task created in the batch is written once, in its final
#: state), and the events' foreign keys are checked at the end of the statement, when the
#: new tasks exist.
_WRITE_PLAN = """
WITH new_tasks AS (
    INSERT INTO tasks (id, user_id, kind, params, status, progress, step, message, result,
                       error, seq, checkpoint, created_at, updated_at, started_at,
                       finished_at, bytes)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                         $6::float8[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::bigint[], $12::text[], $13::text[], $14::text[], $15::text[],
                         $16::text[], $17::bigint[])
), changed AS (
    UPDATE tasks t SET
        status = u.status, progress = u.progress, step = u.step,
        message = CASE WHEN u.set_message THEN u.message ELSE t.message END,
        result = COALESCE(u.result, t.result), error = COALESCE(u.error, t.error),
        seq = u.seq,
        checkpoint = CASE WHEN u.set_checkpoint THEN u.checkpoint ELSE t.checkpoint END,
        updated_at = u.updated_at, started_at = u.started_at, finished_at = u.finished_at,
        bytes = t.bytes + u.bytes
    FROM unnest($18::text[], $19::text[], $20::float8[], $21::text[], $22::bool[],
                $23::text[], $24::text[], $25::text[], $26::bigint[], $27::bool[],
                $28::text[], $29::text[], $30::text[], $31::text[], $32::bigint[])
        AS u(id, status, progress, step, set_message, message, result, error, seq,
             set_checkpoint, checkpoint, updated_at, started_at, finished_at, bytes)
    WHERE t.id = u.id
), events AS (
    INSERT INTO task_events (task_id, seq, event, status, progress, step, message, result,
                             error, ts, bytes)
    SELECT * FROM unnest($33::text[], $34::bigint[], $35::text[], $36::text[],
                         $37::float8[], $38::text[], $39::text[], $40::text[],
                         $41::text[], $42::text[], $43::bigint[])
), charged AS (
    UPDATE users SET stored_bytes = stored_bytes + d.delta
    FROM unnest($44::bigint[], $45::bigint[]) AS d(id, delta)
    WHERE users.id = d.id
)
SELECT 1
"""
_INSERT_COLUMNS, _UPDATE_COLUMNS, _EVENT_COLUMNS = 17, 15, 11
_READ_ANSWERS = (
    "SELECT k.user_id, k.key, k.fingerprint, k.status, k.body FROM idempotency_keys k"
    " JOIN unnest($1::bigint[], $2::text[]) AS c(user_id, key)"
    " ON k.user_id = c.user_id AND k.key = c.key WHERE k.created_at > $3"
)
#: A key another node stored meanwhile (its transaction committed while we planned) is
#: not overwritten: fewer rows come back, and the batch is rolled back and retried.
_STORE_ANSWERS = """
INSERT INTO idempotency_keys (user_id, key, fingerprint, status, body, created_at)
SELECT u.user_id, u.key, u.fingerprint, u.status, u.body, $6
FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::text[])
    AS u(user_id, key, fingerprint, status, body)
ON CONFLICT (user_id, key) DO UPDATE SET
    fingerprint = EXCLUDED.fingerprint, status = EXCLUDED.status, body = EXCLUDED.body,
    created_at = EXCLUDED.created_at
WHERE idempotency_keys.created_at <= $7
RETURNING 1
"""


class IdempotencyRace(Exception):
    """Another node stored an answer for a key of this batch first: retry the batch (the
    tracker then plans each request alone, and this one is answered from that answer)."""


def number(value: float) -> float:
    """50.0 as 50, as SQLite's NUMERIC gives it back (JSON answers show `50`)."""
    return int(value) if float(value).is_integer() else value


def state_from_row(row: asyncpg.Record) -> TaskState:
    return TaskState(
        id=row["id"],
        user_id=row["user_id"],
        kind=row["kind"],
        status=TaskStatus(row["status"]),
        progress=number(row["progress"]),
        step=row["step"],
        seq=row["seq"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


class _View:
    """A `lifecycle.TaskView` over the rows this transaction locked."""

    def __init__(
        self, tasks: dict[str, TaskState], stored: dict[int, int], unfinished: dict[int, int]
    ) -> None:
        self._tasks = tasks
        self._stored = stored
        self._unfinished = unfinished
        #: Stored answers of the batch's idempotency keys, read before planning.
        self.answers: dict[tuple[int, str], Answer] = {}

    def task(self, task_id: str) -> TaskState | None:
        return self._tasks.get(task_id)

    def unfinished_tasks(self, user_id: int) -> int:
        return self._unfinished.get(user_id, 0)

    def stored_bytes(self, user_id: int) -> int | None:
        return self._stored.get(user_id)

    def answer(self, claim: Claim) -> Answer | None:
        return self.answers.get((claim.user_id, claim.key))


async def plan_and_write(
    conn: asyncpg.Connection,
    requests: Sequence[Request],
    quotas: Quotas,
    clock: Callable[[], str],
) -> Plan:
    """Inside a transaction: lock what the batch touches, plan it, write the plan."""
    task_ids = sorted({r.task_id for r in requests if not isinstance(r.change, Create)})
    creators = {r.change.user_id for r in requests if isinstance(r.change, Create)}
    tasks: dict[str, TaskState] = {}
    if task_ids:
        for row in await conn.fetch(_LOCK_TASKS, task_ids):
            state = state_from_row(row)
            tasks[state.id] = state
    user_ids = sorted(creators | {state.user_id for state in tasks.values()})
    stored: dict[int, int] = {}
    if user_ids:
        stored = {row[0]: row[1] for row in await conn.fetch(_LOCK_USERS, user_ids)}
    unfinished: dict[int, int] = {}
    # The count matters only to the quota (a plan's unfinished_delta is a difference).
    counted = [user_id for user_id in sorted(creators) if user_id in stored]
    if quotas.max_unfinished_tasks and counted:
        unfinished = {row[0]: row[1] for row in await conn.fetch(_COUNT_UNFINISHED, counted)}
    view = _View(tasks, stored, unfinished)
    claims = [r.claim for r in requests if r.claim is not None]
    if claims:
        cutoff = iso_time(time.time() - KEEP_SECONDS)
        rows = await conn.fetch(
            _READ_ANSWERS, [c.user_id for c in claims], [c.key for c in claims], cutoff
        )
        view.answers = {(r[0], r[1]): Answer(r[2], r[3], r[4]) for r in rows}
    plan = plan_batch(requests, view, quotas, clock)
    if plan.answers:
        answers = plan.answers
        stored_rows = await conn.fetch(
            _STORE_ANSWERS,
            [c.user_id for c, _ in answers],
            [c.key for c, _ in answers],
            [a.fingerprint for _, a in answers],
            [a.status for _, a in answers],
            [a.body for _, a in answers],
            clock(),
            iso_time(time.time() - KEEP_SECONDS),
        )
        if len(stored_rows) != len(answers):
            raise IdempotencyRace("an idempotency key of this batch was stored meanwhile")
    if plan.writes:
        await conn.execute(_WRITE_PLAN, *_plan_arguments(plan))
    return plan


async def apply(
    db: PostgresDatabase, requests: Sequence[Request], quotas: Quotas, clock: Callable[[], str]
) -> Plan:
    """Plan and commit a batch in one transaction (retried whole after a deadlock)."""
    return await db.write(lambda conn: plan_and_write(conn, requests, quotas, clock))


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as one list per column (the `unnest` arrays), `width` lists when empty."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _plan_arguments(plan: Plan) -> list[list[Any]]:
    inserts: list[tuple[Any, ...]] = []
    updates: list[tuple[Any, ...]] = []
    events: list[tuple[Any, ...]] = []
    for write in plan.writes.values():
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
            )
            for e in write.events
        )
    deltas = [(user_id, delta) for user_id, delta in sorted(plan.bytes_delta.items()) if delta]
    return [
        *_columns(inserts, _INSERT_COLUMNS),
        *_columns(updates, _UPDATE_COLUMNS),
        *_columns(events, _EVENT_COLUMNS),
        *_columns(deltas, 2),
    ]


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
    )


def _update_row(write: TaskWrite) -> tuple[Any, ...]:
    state = write.state
    return (
        state.id,
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
    )
