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
from ..lifecycle import (
    FINISHERS,
    Cancel,
    Complete,
    Create,
    Fail,
    Plan,
    Quotas,
    Request,
    TaskWrite,
    plan_batch,
)
from ..models import TaskState, TaskStatus
from ..tree import MAX_DEPTH
from .postgres_db import PostgresDatabase
from .records import iso_time

_STATE_COLUMNS = (
    "id, user_id, kind, status, progress, step, seq, created_at, updated_at, started_at,"
    " finished_at, parent_id, weight, depth, finish, tree, rate, eta_s, meter"
)
_LOCK_TASKS = (
    f"SELECT {_STATE_COLUMNS} FROM tasks WHERE id = ANY($1::text[]) ORDER BY id FOR NO KEY UPDATE"
)
_RESULTS = "SELECT id, result FROM tasks WHERE id = ANY($1::text[])"
_LOCK_SUBTREES = f"""
WITH RECURSIVE below(id) AS (
    SELECT id FROM tasks WHERE parent_id = ANY($1::text[])
    UNION ALL
    SELECT t.id FROM tasks t JOIN below b ON t.parent_id = b.id
)
SELECT {_STATE_COLUMNS} FROM tasks WHERE id IN (SELECT id FROM below)
ORDER BY id FOR NO KEY UPDATE
"""
_LOCK_USERS = (
    "SELECT id, stored_bytes FROM users WHERE id = ANY($1::bigint[]) ORDER BY id FOR NO KEY UPDATE"
)
_COUNT_UNFINISHED = (
    "SELECT user_id, count(*) FROM tasks WHERE user_id = ANY($1::bigint[])"
    " AND status IN ('pending', 'running') GROUP BY user_id"
)
_INSERT_TYPES = (
    "text bigint text text text float8 text text text text bigint text text text text text"
    " bigint text float8 int int text float8 float8 text"
).split()
_UPDATE_NAMES = (
    "id status progress step set_message message result error seq set_checkpoint checkpoint"
    " updated_at started_at finished_at bytes tree rate eta_s meter"
).split()
_UPDATE_TYPES = (
    "text text float8 text bool text text text bigint bool text text text text bigint text"
    " float8 float8 text"
).split()
_EVENT_TYPES = (
    "text bigint text text float8 text text text text text bigint float8 float8 text".split()
)


def _arrays(types: list[str], first: int) -> str:
    return ", ".join(f"${first + i}::{t}[]" for i, t in enumerate(types))


_I, _U, _E = len(_INSERT_TYPES), len(_UPDATE_TYPES), len(_EVENT_TYPES)
#: The whole plan in one statement. Data-modifying CTEs all run, on one snapshot; no task
#: is both inserted and updated (a task created in the batch is written once, in its final
#: state), and the events' foreign keys are checked at the end of the statement, when the
#: new tasks exist.
_WRITE_PLAN = f"""
WITH new_tasks AS (
    INSERT INTO tasks (id, user_id, kind, params, status, progress, step, message, result,
                       error, seq, checkpoint, created_at, updated_at, started_at,
                       finished_at, bytes, parent_id, weight, depth, finish, tree, rate,
                       eta_s, meter)
    SELECT * FROM unnest({_arrays(_INSERT_TYPES, 1)})
), changed AS (
    UPDATE tasks t SET
        status = u.status, progress = u.progress, step = u.step,
        message = CASE WHEN u.set_message THEN u.message ELSE t.message END,
        result = COALESCE(u.result, t.result), error = COALESCE(u.error, t.error),
        seq = u.seq,
        checkpoint = CASE WHEN u.set_checkpoint THEN u.checkpoint ELSE t.checkpoint END,
        updated_at = u.updated_at, started_at = u.started_at, finished_at = u.finished_at,
        bytes = t.bytes + u.bytes, tree = u.tree, rate = u.rate, eta_s = u.eta_s,
        meter = u.meter
    FROM unnest({_arrays(_UPDATE_TYPES, 1 + _I)}) AS u({", ".join(_UPDATE_NAMES)})
    WHERE t.id = u.id
), events AS (
    INSERT INTO task_events (task_id, seq, event, status, progress, step, message, result,
                             error, ts, bytes, rate, eta_s, child)
    SELECT * FROM unnest({_arrays(_EVENT_TYPES, 1 + _I + _U)})
), charged AS (
    UPDATE users SET stored_bytes = stored_bytes + d.delta
    FROM unnest(${1 + _I + _U + _E}::bigint[], ${2 + _I + _U + _E}::bigint[]) AS d(id, delta)
    WHERE users.id = d.id
)
SELECT 1
"""
_INSERT_COLUMNS, _UPDATE_COLUMNS, _EVENT_COLUMNS = _I, _U, _E
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
        parent_id=row["parent_id"],
        weight=number(row["weight"]),
        depth=row["depth"],
        finish=row["finish"],
        tree=row["tree"],
        rate=row["rate"],
        eta_s=row["eta_s"],
        meter=row["meter"],
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
        #: Children of the locked parents (read before planning), and their results.
        self.child_ids: dict[str, list[str]] = {}
        self.child_results: dict[str, str | None] = {}

    def task(self, task_id: str) -> TaskState | None:
        return self._tasks.get(task_id)

    def unfinished_tasks(self, user_id: int) -> int:
        return self._unfinished.get(user_id, 0)

    def stored_bytes(self, user_id: int) -> int | None:
        return self._stored.get(user_id)

    def answer(self, claim: Claim) -> Answer | None:
        return self.answers.get((claim.user_id, claim.key))

    def children(self, parent_id: str) -> list[TaskState]:
        if parent_id not in self.child_ids:
            # plan_and_write locks every subtree a plan may reach: this is a bug.
            raise RuntimeError(f"children of {parent_id} were not read before planning")
        return [self._tasks[i] for i in self.child_ids[parent_id]]

    def results(self, task_ids: Sequence[str]) -> dict[str, str | None]:
        return {i: self.child_results.get(i) for i in task_ids}


async def plan_and_write(
    conn: asyncpg.Connection,
    requests: Sequence[Request],
    quotas: Quotas,
    clock: Callable[[], str],
) -> Plan:
    """Inside a transaction: lock what the batch touches, plan it, write the plan."""
    task_ids = {r.task_id for r in requests if not isinstance(r.change, Create)}
    task_ids |= {
        r.change.parent_id
        for r in requests
        if isinstance(r.change, Create) and r.change.parent_id is not None
    }
    creators = {r.change.user_id for r in requests if isinstance(r.change, Create)}
    tasks: dict[str, TaskState] = {}
    wanted = sorted(task_ids)
    # The tasks, then their ancestors (a child's event changes its parents' progress),
    # level by level; the rare deadlock this order allows is retried by db.write.
    for _ in range(MAX_DEPTH + 1):
        if not wanted:
            break
        for row in await conn.fetch(_LOCK_TASKS, wanted):
            state = state_from_row(row)
            tasks[state.id] = state
        wanted = sorted(
            {s.parent_id for s in tasks.values() if s.parent_id and s.parent_id not in tasks}
        )
    child_ids, child_results = await _lock_subtrees(conn, requests, tasks)
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
    view.child_ids, view.child_results = child_ids, child_results
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


async def _lock_subtrees(
    conn: asyncpg.Connection, requests: Sequence[Request], tasks: dict[str, TaskState]
) -> tuple[dict[str, list[str]], dict[str, str | None]]:
    """Lock the descendants a batch's finishing changes may reach, into `tasks`.

    A task that finishes cancels its unfinished descendants, and its finishing may finish
    its auto_finish parents in turn (which then list, or cancel, their children): so for
    each task a request finishes, the subtree of its highest ancestor reachable through
    auto_finish parents. Returns each locked parent's child ids, and the results of
    children whose parent's kind has a finisher.
    """
    roots: set[str] = set()
    for request in requests:
        if not isinstance(request.change, Complete | Fail | Cancel):
            continue
        top = tasks.get(request.task_id)
        if top is None:
            continue
        while top.parent_id is not None and top.parent_id in tasks:
            parent = tasks[top.parent_id]
            if not parent.finish:
                break
            top = parent
        roots.add(top.id)
    child_ids: dict[str, list[str]] = {root: [] for root in roots}
    results: dict[str, str | None] = {}
    if not roots:
        return child_ids, results
    for row in await conn.fetch(_LOCK_SUBTREES, sorted(roots)):
        state = tasks.setdefault(row["id"], state_from_row(row))
        child_ids.setdefault(state.id, [])
        assert state.parent_id is not None
        child_ids.setdefault(state.parent_id, []).append(state.id)
    with_finisher = [
        child
        for parent, children in child_ids.items()
        if parent in tasks and tasks[parent].kind in FINISHERS
        for child in children
    ]
    if with_finisher:
        results = {row[0]: row[1] for row in await conn.fetch(_RESULTS, with_finisher)}
    return child_ids, results


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
                e.rate,
                e.eta_s,
                e.child,
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
        state.tree,
        state.rate,
        state.eta_s,
        state.meter,
    )
