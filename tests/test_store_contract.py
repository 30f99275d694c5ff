"""The Store and Accounts contract: one suite, run against SQLite and PostgreSQL alike.

Every test gets a `backend` opened through `open_store(url)`, for a SQLite file in
tmp_path and for a fresh PostgreSQL database (tests/pg.py); the assertions are the same,
which is what shows the PostgreSQL store behaves like the SQLite one. Where the two
differ by design (one process vs many nodes) the test says so through `backend.shared`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from server.config import PROJECT_ROOT
from server.errors import NotFound, QuotaExceeded, TaskFinished, Unauthorized
from server.idempotency import Answer, Claim
from server.lifecycle import (
    Cancel,
    Complete,
    Create,
    Fail,
    Outcome,
    Progress,
    ProgressBatch,
    Quotas,
    Request,
)
from server.models import Event, Task, TaskStatus, utc_now
from server.store import Backend, UsernameTaken, open_store
from server.store.records import iso_time

MIGRATIONS = PROJECT_ROOT / "migrations"
NO_QUOTAS = Quotas()
#: Far in the future: a lease that stays live for the whole test.
LIVE = 3600.0
#: A lease that expired before it was taken (no waiting for a clock).
EXPIRED = -1.0

Opener = Callable[[], Awaitable[Backend]]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def opener(store_url: str) -> Any:
    """Opens (more) Backends on the test's database; all are closed after the test."""
    opened: list[Backend] = []

    async def open_backend() -> Backend:
        backend = await open_store(store_url, migrations_root=MIGRATIONS, readers=2)
        opened.append(backend)
        return backend

    yield open_backend
    for backend in opened:
        await backend.close()


@pytest.fixture
async def backend(opener: Opener) -> Backend:
    return await opener()


async def query(backend: Backend, url: str, sql: str) -> list[tuple[Any, ...]]:
    """Raw SQL with no arguments (the same text on both), to look behind the interface."""
    if backend.sqlite is not None:
        return [tuple(row) for row in await backend.sqlite.fetch(sql)]  # type: ignore[attr-defined]
    conn = await asyncpg.connect(url)
    try:
        return [tuple(row) for row in await conn.fetch(sql)]
    finally:
        await conn.close()


async def stored_bytes(backend: Backend, url: str, user_id: int) -> tuple[int, int]:
    """(users.stored_bytes, what the user's rows actually count) for one user."""
    rows = await query(
        backend,
        url,
        f"SELECT u.stored_bytes,"
        f" (SELECT coalesce(sum(t.bytes), 0) FROM tasks t WHERE t.user_id = u.id)"
        f" + (SELECT coalesce(sum(e.bytes), 0) FROM task_events e JOIN tasks t"
        f"    ON t.id = e.task_id WHERE t.user_id = u.id)"
        f" FROM users u WHERE u.id = {int(user_id)}",
    )
    return int(rows[0][0]), int(rows[0][1])


_names = itertools.count()


async def user(backend: Backend, name: str | None = None) -> int:
    created = await backend.accounts.create_user(name or f"user{next(_names)}", "hash", utc_now())
    return created.id


async def apply(backend: Backend, *requests: Request, quotas: Quotas = NO_QUOTAS) -> list[Outcome]:
    plan = await backend.store.apply(list(requests), quotas, utc_now)
    return plan.outcomes


def create(user_id: int, kind: str = "job", params: str = "{}") -> Request:
    return Request("", user_id, Create(user_id, kind, params))


def change(task_id: str, owner: int | None, what: Any) -> Request:
    return Request(task_id, owner, what)


async def new_task(backend: Backend, user_id: int, kind: str = "job", params: str = "{}") -> Task:
    (outcome,) = await apply(backend, create(user_id, kind, params))
    assert outcome.error is None and outcome.created is not None
    return outcome.created


async def all_events(backend: Backend, task_id: str) -> list[Event]:
    return (await backend.store.list_events(task_id, 0, 10_000)).events


# -- the write path ---------------------------------------------------------------------


async def test_create_makes_a_pending_task_with_its_created_event(backend: Backend) -> None:
    """A created task is pending at seq 1, with one `created` event."""
    uid = await user(backend)
    task = await new_task(backend, uid, "stock", '{"symbol":"ACME"}')
    stored = await backend.store.get_task(task.id)
    assert stored is not None
    assert (stored.status, stored.seq, stored.user_id, stored.kind) == ("pending", 1, uid, "stock")
    assert stored.params == '{"symbol":"ACME"}'
    assert [(e.seq, e.event.value) for e in await all_events(backend, task.id)] == [(1, "created")]
    assert await backend.store.get_task("no-such-task") is None


async def test_progress_and_complete_write_events_and_the_task_row(backend: Backend) -> None:
    """Progress starts a task, keeps 50 as 50 and 12.5 as 12.5; completing sets the result."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    outcomes = await apply(
        backend,
        change(task.id, uid, Progress(50, step="fetch", message="half")),
        change(task.id, uid, Progress(12.5)),
    )
    assert [[(e.seq, e.event.value) for e in o.events] for o in outcomes] == [
        [(2, "started"), (3, "progress")],
        [(4, "progress")],
    ]
    running = await backend.store.get_task(task.id)
    assert running is not None and running.status is TaskStatus.RUNNING
    assert (running.progress, running.step, running.message) == (12.5, "fetch", None)
    (done,) = await apply(backend, change(task.id, uid, Complete('{"answer":42}')))
    assert [(e.seq, e.event.value, e.result) for e in done.events] == [
        (5, "completed", '{"answer":42}')
    ]
    final = await backend.store.get_task(task.id)
    assert final is not None
    assert (final.status, final.progress, final.seq, final.result) == (
        "completed",
        100,
        5,
        '{"answer":42}',
    )
    assert type(final.progress) is int and final.finished_at is not None
    events = await all_events(backend, task.id)
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert (events[2].progress, events[2].message, type(events[2].progress)) == (50, "half", int)
    assert events[3].progress == 12.5


async def test_fail_and_cancel_finish_a_task_and_refuse_changes_after(backend: Backend) -> None:
    """Failed and cancelled tasks keep their error; a later change is refused (409)."""
    uid = await user(backend)
    failing, cancelled = await new_task(backend, uid), await new_task(backend, uid)
    outcomes = await apply(
        backend,
        change(failing.id, uid, Fail("boom")),
        change(cancelled.id, None, Cancel("stopped by admin")),
        change(failing.id, uid, Progress(10)),
    )
    assert outcomes[0].events[-1].error == "boom"
    assert outcomes[1].events[-1].event.value == "cancelled"
    assert isinstance(outcomes[2].error, TaskFinished)
    failed = await backend.store.get_task(failing.id)
    gone = await backend.store.get_task(cancelled.id)
    assert failed is not None and (failed.status, failed.error, failed.seq) == ("failed", "boom", 2)
    assert gone is not None and (gone.status, gone.error) == ("cancelled", "stopped by admin")


async def test_unknown_task_foreign_owner_and_unknown_user_are_refused(backend: Backend) -> None:
    """No such task or another user's task: 404; a create for no such user: 401."""
    alice, bob = await user(backend), await user(backend)
    task = await new_task(backend, alice)
    outcomes = await apply(
        backend,
        change("missing", alice, Progress(1)),
        change(task.id, bob, Progress(1)),
        create(999_999),
        change(task.id, alice, Progress(1)),
    )
    assert isinstance(outcomes[0].error, NotFound)
    assert isinstance(outcomes[1].error, NotFound)
    assert isinstance(outcomes[2].error, Unauthorized)
    assert outcomes[3].error is None
    stored = await backend.store.get_task(task.id)
    assert stored is not None and stored.seq == 3


async def test_checkpoint_is_kept_until_the_task_finishes(backend: Backend) -> None:
    """A progress checkpoint is stored on the task and cleared when it finishes."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    await apply(backend, change(task.id, None, Progress(30, checkpoint='{"step":3}')))
    await apply(backend, change(task.id, None, Progress(40)))
    kept = await backend.store.get_task(task.id)
    assert kept is not None and kept.checkpoint == '{"step":3}'
    await apply(backend, change(task.id, None, Complete()))
    done = await backend.store.get_task(task.id)
    assert done is not None and done.checkpoint is None


async def test_quota_on_unfinished_tasks_counts_the_batch_too(backend: Backend) -> None:
    """At most N unfinished tasks: the (N+1)th create is refused, in the same batch too."""
    uid = await user(backend)
    quotas = Quotas(max_unfinished_tasks=2)
    first = await apply(backend, create(uid), quotas=quotas)
    assert first[0].error is None
    outcomes = await apply(backend, create(uid), create(uid), quotas=quotas)
    assert outcomes[0].error is None and isinstance(outcomes[1].error, QuotaExceeded)
    assert first[0].created is not None
    await apply(backend, change(first[0].created.id, uid, Cancel()))
    again = await apply(backend, create(uid), quotas=quotas)
    assert again[0].error is None


async def test_quota_on_stored_bytes_refuses_progress_but_never_finishing(
    backend: Backend, store_url: str
) -> None:
    """Over the byte quota progress is refused, a task can still be completed; the counter
    matches the rows."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    counted, actual = await stored_bytes(backend, store_url, uid)
    assert counted == actual > 0
    # The first progress adds a started event (120 bytes) and itself (520): 640.
    quotas = Quotas(max_stored_bytes=counted + 700)
    big = "x" * 400
    outcomes = await apply(
        backend,
        change(task.id, uid, Progress(10, message=big)),
        change(task.id, uid, Progress(20, message=big)),
        change(task.id, uid, Complete('{"r":1}')),
        quotas=quotas,
    )
    assert outcomes[0].error is None
    assert isinstance(outcomes[1].error, QuotaExceeded)
    assert outcomes[2].error is None
    counted, actual = await stored_bytes(backend, store_url, uid)
    assert counted == actual > quotas.max_stored_bytes - 700


async def test_seqs_are_gapless_and_unique_under_concurrent_batches(backend: Backend) -> None:
    """Many batches at once on one task: seqs 1..N, each once, the task at N."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    await apply(backend, change(task.id, uid, Progress(0)))  # started: seq 2, progress: 3
    batches = [[change(task.id, uid, Progress(i % 100)) for _ in range(5)] for i in range(20)]
    results = await asyncio.gather(
        *(backend.store.apply(batch, NO_QUOTAS, utc_now) for batch in batches)
    )
    seqs = [e.seq for plan in results for o in plan.outcomes for e in o.events]
    assert sorted(seqs) == list(range(4, 104))
    assert [e.seq for e in await all_events(backend, task.id)] == list(range(1, 104))
    stored = await backend.store.get_task(task.id)
    assert stored is not None and stored.seq == 103


# -- reads ---------------------------------------------------------------------------------


async def test_list_tasks_pages_newest_first_by_count_and_by_bytes(backend: Backend) -> None:
    """Pages hold at most `limit` tasks and about `max_bytes` (at least one); the cursor
    walks every task once, newest first; statuses filter."""
    uid, other = await user(backend), await user(backend)
    made = [
        await new_task(backend, uid, params=f'{{"pad":"{"p" * 900}","i":{i}}}') for i in range(5)
    ]
    await new_task(backend, other)
    await apply(backend, change(made[1].id, uid, Complete()))
    newest_first = [t.id for t in reversed(made)]

    async def walk(limit: int, max_bytes: int) -> list[list[str]]:
        pages, before = [], None
        while True:
            page = await backend.store.list_tasks(
                uid, None, limit, before=before, max_bytes=max_bytes
            )
            pages.append([t.id for t in page.tasks])
            if page.next is None:
                return pages
            before = page.next

    assert await walk(2, 1 << 20) == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    assert await walk(5, 1 << 20) == [newest_first]
    # Each task counts over 1000 bytes: 2500 fits two, 10 fits only the one always given.
    assert await walk(10, 2500) == [newest_first[0:2], newest_first[2:4], newest_first[4:]]
    assert await walk(10, 10) == [[task_id] for task_id in newest_first]
    page = await backend.store.list_tasks(uid, [TaskStatus.COMPLETED], 10)
    assert [t.id for t in page.tasks] == [made[1].id] and page.next is None
    full = (await backend.store.list_tasks(uid, [TaskStatus.PENDING], 1)).tasks[0]
    assert full.params.endswith(',"i":4}')
    assert (await backend.store.list_tasks(uid, [TaskStatus.FAILED], 10)).tasks == []


async def test_list_events_pages_by_count_and_bytes(backend: Backend) -> None:
    """Event pages stop at `limit` or `max_bytes` (at least one) and say whether more exist."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    await apply(backend, *(change(task.id, uid, Progress(i, message="m" * 500)) for i in range(6)))
    # seq 1 created, 2 started, 3..8 progress with a 500-byte message each.
    page = await backend.store.list_events(task.id, 0, 8)
    assert [e.seq for e in page.events] == list(range(1, 9)) and page.more is False
    page = await backend.store.list_events(task.id, 0, 3)
    assert [e.seq for e in page.events] == [1, 2, 3] and page.more is True
    page = await backend.store.list_events(task.id, 2, 10, max_bytes=1300)
    assert [e.seq for e in page.events] == [3, 4] and page.more is True
    page = await backend.store.list_events(task.id, 2, 10, max_bytes=1)
    assert [e.seq for e in page.events] == [3] and page.more is True
    page = await backend.store.list_events(task.id, 7, 10, max_bytes=1)
    assert [e.seq for e in page.events] == [8] and page.more is False
    page = await backend.store.list_events(task.id, 8, 10)
    assert page.events == [] and page.more is False


async def test_counts_seqs_and_tasks_to_resume(backend: Backend) -> None:
    """Counts by status, unfinished by kind, latest seqs, and the resume scan in pages."""
    uid = await user(backend)
    jobs = [await new_task(backend, uid, kind="stock") for _ in range(3)]
    other = await new_task(backend, uid, kind="other")
    await apply(backend, change(jobs[0].id, None, Progress(5)), change(other.id, None, Fail("x")))
    assert await backend.store.count_tasks_by_status() == {
        "pending": 2,
        "running": 1,
        "failed": 1,
    }
    assert await backend.store.count_unfinished(["stock"]) == 3
    assert await backend.store.count_unfinished(["other"]) == 0
    assert await backend.store.count_unfinished([]) == 0
    assert await backend.store.task_seqs([jobs[0].id, other.id, "missing"]) == {
        jobs[0].id: 3,
        other.id: 2,
    }
    assert await backend.store.task_seqs([]) == {}
    first = await backend.store.tasks_to_resume(["stock"], None, 2)
    rest = await backend.store.tasks_to_resume(["stock"], (first[-1].created_at, first[-1].id), 2)
    oldest_first = sorted(jobs, key=lambda t: (t.created_at, t.id))
    assert [t.id for t in first + rest] == [t.id for t in oldest_first]
    assert await backend.store.tasks_to_resume([], None, 10) == []


# -- leases ----------------------------------------------------------------------------


async def test_leases_exclude_other_nodes_until_they_expire(backend: Backend) -> None:
    """One node holds a live lease; another takes it once expired; renew says what is held."""
    uid = await user(backend)
    task, spare = await new_task(backend, uid, "stock"), await new_task(backend, uid, "stock")
    store = backend.store
    assert await store.acquire_lease(task.id, "a", LIVE)
    assert await store.acquire_lease(task.id, "a", LIVE)  # its own: renewed
    assert not await store.acquire_lease(task.id, "b", LIVE)
    assert [t.id for t in await store.tasks_to_resume(["stock"])] == [spare.id]
    assert await store.renew_leases("a", [task.id, spare.id], LIVE) == {task.id}
    await store.release_lease(task.id, "b")  # not b's: nothing happens
    assert not await store.acquire_lease(task.id, "b", LIVE)
    # a's lease lapses: b takes over, and a learns it at its next renewal.
    assert await store.acquire_lease(task.id, "a", EXPIRED)
    assert task.id in {t.id for t in await store.tasks_to_resume(["stock"])}
    assert await store.acquire_lease(task.id, "b", LIVE)
    assert await store.renew_leases("a", [task.id], LIVE) == set()
    assert await store.renew_leases("b", [task.id], LIVE) == {task.id}
    await store.release_lease(task.id, "b")
    assert await store.acquire_lease(task.id, "a", LIVE)
    assert await store.renew_leases("a", [], LIVE) == set()
    assert not await store.acquire_lease("no-such-task", "a", LIVE)


async def test_exclusive_is_held_by_one_holder_at_a_time(opener: Opener) -> None:
    """A shared store grants a name to one holder (across Backends, as across nodes) at a
    time; SQLite, one process, always grants it."""
    first, second = await opener(), await opener()
    async with first.store.exclusive("retention") as held:
        assert held
        async with second.store.exclusive("retention") as also:
            assert also is (not first.shared)
        async with second.store.exclusive("another name") as other:
            assert other
    async with second.store.exclusive("retention") as again:
        assert again


# -- subscriptions ---------------------------------------------------------------------


async def test_subscriptions_are_recorded_closed_and_listed(opener: Opener) -> None:
    """Opened and closed rows, newest first; a missing task is skipped; at start a node
    closes its own open rows (on SQLite, there being one node, all of them)."""
    backend = await opener()
    store = backend.store
    uid = await user(backend)
    one, two = await new_task(backend, uid), await new_task(backend, uid)
    await store.record_subscriptions(
        [
            ("c1", uid, one.id, "2026-01-01T00:00:01.000Z"),
            ("c1", uid, two.id, "2026-01-01T00:00:02.000Z"),
            ("c1", uid, "missing", "2026-01-01T00:00:03.000Z"),
        ],
        [],
        node_id="node-a",
    )
    await store.record_subscriptions(
        [("c2", uid, one.id, "2026-01-01T00:00:04.000Z")], [], node_id="node-b"
    )
    await store.record_subscriptions([], [("c1", one.id, "2026-01-01T00:00:05.000Z")], "node-a")
    await store.record_subscriptions([], [], "node-a")
    rows = await store.list_subscriptions(uid, 10)
    assert [(r.connection_id, r.task_id, r.unsubscribed_at) for r in rows] == [
        ("c2", one.id, None),
        ("c1", two.id, None),
        ("c1", one.id, "2026-01-01T00:00:05.000Z"),
    ]
    assert [r.to_dict()["task_id"] for r in await store.list_subscriptions(uid, 1)] == [one.id]
    closed = await store.close_open_subscriptions("2026-01-01T00:00:09.000Z", "node-a")
    rows = {
        r.connection_id + r.task_id: r.unsubscribed_at
        for r in await store.list_subscriptions(uid, 10)
    }
    assert rows["c1" + two.id] == "2026-01-01T00:00:09.000Z"
    if backend.shared:
        assert closed == 1 and rows["c2" + one.id] is None
    else:
        assert closed == 2 and rows["c2" + one.id] == "2026-01-01T00:00:09.000Z"


# -- retention -------------------------------------------------------------------------


async def test_retention_reads_and_deletes_keep_stored_bytes_right(
    backend: Backend, store_url: str
) -> None:
    """Spans, scans and deletes as retention uses them; stored bytes follow every delete
    and go back to 0 when everything is gone."""
    store = backend.store
    uid = await user(backend)
    done = [await new_task(backend, uid, params='{"x":"' + "y" * 100 + '"}') for _ in range(3)]
    running = await new_task(backend, uid)
    for task in done:
        await apply(backend, change(task.id, uid, Progress(50, message="hello")))
        await apply(backend, change(task.id, uid, Complete('{"ok":true}')))
    await apply(backend, change(running.id, uid, Progress(1)), change(running.id, uid, Progress(2)))
    await store.record_subscriptions([("c", uid, done[0].id, utc_now())] * 3, [], "n")
    ordered = sorted(done, key=lambda t: t.id)
    spans = await store.finished_task_spans("9999", None, 10, count_subscriptions=True)
    assert {s.task_id for s in spans} == {t.id for t in done}
    assert [(s.finished_at, s.task_id) for s in spans] == sorted(
        (s.finished_at, s.task_id) for s in spans
    )
    assert all((s.seq, s.first_kept, s.kept) == (4, 1, 4) for s in spans)
    assert {s.task_id: s.subscriptions for s in spans}[done[0].id] == 3
    page = await store.finished_task_spans("9999", (spans[0].finished_at, spans[0].task_id), 10)
    assert [s.task_id for s in page] == [s.task_id for s in spans[1:]]
    assert await store.finished_task_spans("0000", None, 10) == []
    assert [s.task_id for s in await store.task_spans([running.id, "missing"])] == [running.id]
    # The scan by id: every task looked at, only those over seq 3 reported.
    seen, over, after = [], [], ""
    while True:
        last, ids = await store.tasks_with_seq_over(3, after, 2)
        if last is None:
            break
        seen.append(last)
        over += ids
        after = last
    assert sorted(over) == sorted([t.id for t in done] + [running.id])
    assert seen[-1] == max(t.id for t in [*done, running])

    # Trim the oldest events of one task: first_kept moves, bytes follow.
    assert await store.delete_event_ranges([(ordered[0].id, 1, 2)]) == 2
    assert await store.delete_event_ranges([]) == 0
    assert await store.first_kept_seq(ordered[0].id) == 3
    assert (await store.task_spans([ordered[0].id]))[0].kept == 2
    counted, actual = await stored_bytes(backend, store_url, uid)
    assert counted == actual

    assert await store.delete_subscriptions_of(done[0].id, 2) == 2
    assert await store.delete_subscriptions_of(done[0].id, 2) == 1
    # An unfinished task is left alone; finished ones go with everything they have.
    assert await store.delete_finished_tasks([t.id for t in done] + [running.id]) == (3, 10, 0)
    assert await store.delete_finished_tasks([]) == (0, 0, 0)
    assert await store.get_task(done[0].id) is None
    assert await store.first_kept_seq(done[0].id) is None
    counted, actual = await stored_bytes(backend, store_url, uid)
    assert counted == actual > 0
    await apply(backend, change(running.id, uid, Cancel()))
    assert await store.delete_finished_tasks([running.id]) == (1, 5, 0)
    assert await stored_bytes(backend, store_url, uid) == (0, 0)
    assert await store.reclaim(asyncio.sleep) >= 0


# -- accounts --------------------------------------------------------------------------


async def test_users_are_unique_without_case_and_found_by_either(backend: Backend) -> None:
    """Usernames compare without ASCII case; lookups return the stored spelling."""
    accounts = backend.accounts
    alice = await accounts.create_user("Alice", "h1", "2026-01-01T00:00:00.000Z")
    with pytest.raises(UsernameTaken):
        await accounts.create_user("aLICE", "h2", "2026-01-01T00:00:00.000Z")
    assert await accounts.username_taken("ALICE")
    assert not await accounts.username_taken("bob")
    assert await accounts.find_user("alice") == alice
    assert await accounts.get_user(alice.id) == alice
    assert await accounts.get_user(999_999) is None
    assert await accounts.find_credentials("ALICE") == (alice, "h1")
    assert await accounts.find_credentials("nobody") is None
    assert await accounts.password_hash(alice.id) == "h1"
    assert await accounts.password_hash(999_999) is None
    assert await accounts.replace_password_hash(alice.id, "h1", "h1b")
    assert not await accounts.replace_password_hash(alice.id, "h1", "h1c")  # changed meanwhile
    assert await accounts.password_hash(alice.id) == "h1b"
    bob = await accounts.create_user("bob", "h", "2026-01-02T00:00:00.000Z")
    await new_task(backend, bob.id)
    await new_task(backend, bob.id)
    summary = await accounts.list_users()
    assert [(u.id, u.username, u.tasks) for u in summary] == [
        (alice.id, "Alice", 0),
        (bob.id, "bob", 2),
    ]
    assert summary[1].created_at == "2026-01-02T00:00:00.000Z"


async def test_sessions_are_capped_revoked_and_expire(backend: Backend) -> None:
    """Beyond the cap the oldest live sessions are revoked; revoked or expired ones are
    not live; a password change revokes all."""
    accounts = backend.accounts
    uid = await user(backend)
    now = 1_800_000_000.0
    assert await accounts.create_session("s1", uid, now, now + 100, 2) == []
    assert await accounts.create_session("s2", uid, now + 1, now + 100, 2) == []
    assert await accounts.create_session("s3", uid, now + 2, now + 100, 2) == ["s1"]
    record = await accounts.get_session("s2")
    assert record is not None
    assert (record.user_id, record.created_at, record.expires_at, record.revoked) == (
        uid,
        now + 1,
        now + 100,
        False,
    )
    assert await accounts.get_session("nope") is None
    assert await accounts.live_sessions(["s1", "s2", "s3", "nope"], now + 5) == {"s2", "s3"}
    assert await accounts.live_sessions(["s2", "s3"], now + 100) == set()  # expired
    assert await accounts.live_sessions([], now) == set()
    assert await accounts.revoke_session("s2", now + 6)
    assert not await accounts.revoke_session("s2", now + 7)
    assert not await accounts.revoke_session("nope", now + 7)
    assert await accounts.live_sessions(["s2", "s3"], now + 8) == {"s3"}
    # A new login deletes the dead ones on the way.
    assert await accounts.create_session("s4", uid, now + 9, now + 100, 2) == []
    assert await accounts.get_session("s1") is None
    assert sorted(await accounts.revoke_user_sessions(uid, now + 10)) == ["s3", "s4"]
    assert await accounts.live_sessions(["s3", "s4"], now + 11) == set()
    await accounts.create_session("s5", uid, now + 12, now + 100, 2)
    assert await accounts.change_password(uid, "new", now + 13) == ["s5"]
    assert await accounts.password_hash(uid) == "new"
    assert await accounts.revoke_user_sessions(uid, now + 14) == []


async def test_remove_user_deletes_everything_of_theirs_only(
    backend: Backend, store_url: str
) -> None:
    """A removed user's sessions, tasks, events, leases and subscriptions go; others stay."""
    accounts, store = backend.accounts, backend.store
    gone, kept = await user(backend), await user(backend)
    now = 1_800_000_000.0
    await accounts.create_session("g1", gone, now, now + 100, 5)
    await accounts.create_session("k1", kept, now, now + 100, 5)
    theirs = [await new_task(backend, gone) for _ in range(3)]
    mine = await new_task(backend, kept)
    await apply(backend, *(change(t.id, gone, Progress(1)) for t in theirs))
    await store.acquire_lease(theirs[0].id, "node", LIVE)
    await store.record_subscriptions(
        [("c", gone, theirs[0].id, utc_now()), ("d", kept, mine.id, utc_now())], [], "n"
    )
    before = await stored_bytes(backend, store_url, kept)
    assert await accounts.remove_user(gone, now + 1) == ["g1"]
    assert await accounts.get_user(gone) is None
    assert await accounts.get_session("g1") is None
    assert all([await store.get_task(t.id) is None for t in theirs])
    assert await store.list_subscriptions(gone, 10) == []
    assert await store.tasks_to_resume(["job"]) == [await store.get_task(mine.id)]
    assert await store.get_task(mine.id) is not None
    assert await accounts.live_sessions(["k1"], now + 2) == {"k1"}
    assert len(await store.list_subscriptions(kept, 10)) == 1
    assert await stored_bytes(backend, store_url, kept) == before
    assert await accounts.remove_user(999_999, now) == []  # nothing to do, no error


async def test_instance_id_and_shared_secret_survive_reopening(opener: Opener) -> None:
    """The database's instance id (and a shared store's JWT secret) stay the same when the
    store is opened again."""
    first = await opener()
    instance = await first.accounts.instance_id()
    assert len(instance) == 32
    secret = await first.accounts.shared_secret() if first.shared else None
    await first.close()
    again = await opener()
    assert await again.accounts.instance_id() == instance
    if not again.shared:
        return  # SQLite keeps its secret in a file beside the database, not in it.
    assert secret is not None and len(secret.encode()) >= 32
    assert await again.accounts.shared_secret() == secret
    together = await asyncio.gather(*(again.accounts.shared_secret() for _ in range(5)))
    assert set(together) == {secret}


async def test_ping_and_sizes(backend: Backend) -> None:
    """An open store answers ping and reports a non-zero size."""
    await backend.store.ping()
    sizes = await backend.store.size_bytes()
    assert sizes["db"] > 0


# -- idempotency and grants --------------------------------------------------------------


async def test_an_idempotent_request_is_acted_on_once_and_then_replayed(backend: Backend) -> None:
    """The first use stores its answer with the event; the same claim replays it (nothing
    written); the same key for another request is refused; other users are separate."""
    uid, other = await user(backend), await user(backend)
    task = await new_task(backend, uid)
    claim = Claim(uid, "k1", "fp-a")
    request = Request(task.id, uid, Progress(10), claim)
    (first,) = await apply(backend, request)
    assert first.error is None and first.replayed is None and first.events[-1].seq == 3
    (again,) = await apply(backend, request)
    assert again.events == [] and again.replayed == Answer("fp-a", 200, '{"seq":3}')
    (reused,) = await apply(backend, Request(task.id, uid, Progress(20), Claim(uid, "k1", "fp-b")))
    assert reused.error is not None and reused.error.code == "idempotency_key_reused"
    (theirs,) = await apply(
        backend, Request("", other, Create(other, "job", "{}"), Claim(other, "k1", "x"))
    )
    assert theirs.error is None and theirs.created is not None
    assert [e.seq for e in await all_events(backend, task.id)] == [1, 2, 3]


async def test_a_claim_twice_in_one_batch_acts_once(backend: Backend) -> None:
    """Two copies of one request in one transaction: the second gets the first's answer."""
    uid = await user(backend)
    task = await new_task(backend, uid)
    request = Request(task.id, uid, ProgressBatch((Progress(1), Progress(2))), Claim(uid, "b", "f"))
    first, second = await apply(backend, request, request)
    assert [e.seq for e in first.events] == [2, 3, 4]
    assert second.replayed == Answer("f", 200, '{"seq":4,"first_seq":3}')


async def test_api_keys_and_shares_are_stored_listed_and_revoked(backend: Backend) -> None:
    """Keys: listed while live, revoked once, by their owner only. Shares: counted while
    live, revoked per task, purged with old idempotency answers once ended."""
    grants = backend.grants
    uid, other = await user(backend), await user(backend)
    task = await new_task(backend, uid)
    now = utc_now()
    await grants.create_api_key("a" * 16, uid, "w", ("tasks:write",), "h1", now)
    await grants.create_api_key("b" * 16, uid, "r", ("tasks:read",), "h2", now)
    assert await grants.count_api_keys(uid) == 2
    assert [k.name for k in await grants.list_api_keys(uid)] == ["w", "r"]
    assert not await grants.revoke_api_key("a" * 16, other, now)
    assert await grants.revoke_api_key("a" * 16, uid, now)
    assert not await grants.revoke_api_key("a" * 16, uid, now)
    revoked = await grants.get_api_key("a" * 16)
    assert revoked is not None and revoked.revoked and revoked.scopes == ("tasks:write",)
    await grants.touch_api_key("b" * 16, now)
    (live,) = await grants.list_api_keys(uid)
    assert live.last_used_at == now
    soon = time.time() + 3600
    await grants.create_share("c" * 16, task.id, uid, "h3", now, soon)
    await grants.create_share("d" * 16, task.id, uid, "h4", now, time.time() - 1)
    assert await grants.count_live_shares(task.id, time.time()) == 1
    share = await grants.get_share("c" * 16)
    assert share is not None and share.task_id == task.id and abs(share.expires_at - soon) < 0.01
    assert sorted(await grants.revoke_shares(task.id, now)) == ["c" * 16, "d" * 16]
    await apply(backend, Request(task.id, uid, Progress(5), Claim(uid, "old", "f")))
    purged = await grants.purge(iso_time(time.time() + 1), time.time(), 100)
    assert purged == 3  # two shares (revoked, expired) and the answer
    assert await grants.get_share("c" * 16) is None


# -- parents and children ----------------------------------------------------------------


def child_of(user_id: int, parent_id: str, weight: float = 1, finish: int = 0) -> Request:
    return Request(
        "", user_id, Create(user_id, "job", "{}", parent_id=parent_id, weight=weight, finish=finish)
    )


async def test_list_tasks_can_keep_only_root_tasks(backend: Backend) -> None:
    """`roots_only`: tasks with no parent, newest first, paged and filtered as usual; the
    children are still listed without it."""
    uid = await user(backend)
    first = await new_task(backend, uid)
    (parent,) = await apply(backend, create(uid))
    assert parent.created is not None
    kids = [await apply(backend, child_of(uid, parent.created.id)) for _ in range(3)]
    (grandchild,) = await apply(backend, child_of(uid, kids[0][0].created.id))  # type: ignore[union-attr]
    last = await new_task(backend, uid)
    roots = [last.id, parent.created.id, first.id]
    page = await backend.store.list_tasks(uid, None, 10, roots_only=True)
    assert [t.id for t in page.tasks] == roots and page.next is None
    page = await backend.store.list_tasks(uid, None, 2, roots_only=True)
    assert [t.id for t in page.tasks] == roots[:2] and page.next is not None
    page = await backend.store.list_tasks(uid, None, 2, before=page.next, roots_only=True)
    assert [t.id for t in page.tasks] == roots[2:]
    await apply(backend, change(first.id, uid, Complete()))
    page = await backend.store.list_tasks(uid, [TaskStatus.COMPLETED], 10, roots_only=True)
    assert [t.id for t in page.tasks] == [first.id]
    everything = await backend.store.list_tasks(uid, None, 10)
    assert len(everything.tasks) == 3 + 3 + 1 and grandchild.created is not None


async def test_a_tree_moves_together_in_one_transaction(backend: Backend) -> None:
    """Children's changes update their parents (and grandparents) in the same commit:
    weighted progress, counts, `child` on the parent's events, listing, and auto-finish
    cascading up two levels."""
    uid = await user(backend)
    (root,) = await apply(backend, Request("", uid, Create(uid, "job", "{}", finish=1)))
    assert root.created is not None
    root_id = root.created.id
    (mid,) = await apply(backend, child_of(uid, root_id, weight=3, finish=1))
    (other,) = await apply(backend, child_of(uid, root_id))
    assert mid.created is not None and other.created is not None
    (leaf,) = await apply(backend, child_of(uid, mid.created.id))
    assert leaf.created is not None
    (moved,) = await apply(backend, change(leaf.created.id, uid, Progress(50)))
    assert {e.task_id for e in moved.related} == {mid.created.id, root_id}
    task = await backend.store.get_task(root_id)
    assert task is not None and task.progress == 3 * 50 / 4
    await apply(backend, change(other.created.id, uid, Complete()))
    (last,) = await apply(backend, change(leaf.created.id, uid, Complete()))
    finished = {(e.task_id, e.event.value) for e in last.related}
    assert (mid.created.id, "completed") in finished and (root_id, "completed") in finished
    task = await backend.store.get_task(root_id)
    assert task is not None and task.status is TaskStatus.COMPLETED and task.result is not None
    assert '"status":"completed"' in task.result
    page = await backend.store.list_children(root_id, 10)
    assert [t.id for t in page.tasks] == [mid.created.id, other.created.id]
    events = await all_events(backend, root_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(e.child is not None for e in events if e.event.value == "progress")


async def test_cancelling_a_parent_cancels_its_subtree(backend: Backend) -> None:
    """One cancel reaches every unfinished descendant, each with its own event."""
    uid = await user(backend)
    parent = await new_task(backend, uid)
    (a,) = await apply(backend, child_of(uid, parent.id))
    assert a.created is not None
    (b,) = await apply(backend, child_of(uid, a.created.id))
    assert b.created is not None
    (cancel,) = await apply(backend, change(parent.id, uid, Cancel()))
    assert cancel.error is None
    cancelled = {e.task_id for e in cancel.related if e.event.value == "cancelled"}
    assert cancelled == {a.created.id, b.created.id}
    for task_id in (a.created.id, b.created.id):
        task = await backend.store.get_task(task_id)
        assert task is not None and task.status is TaskStatus.CANCELLED


async def test_a_key_revoked_on_one_node_ends_its_sockets_on_another(backend: Backend) -> None:
    """Credentials.sweep on node B finds a key node A revoked (and skips login sessions),
    telling B's listeners, which close those sockets."""
    from server.credentials import Credentials

    uid = await user(backend)
    node_a, node_b = Credentials(backend.grants), Credentials(backend.grants)
    record, key = await node_a.create_key(uid, "w", ["tasks:read"])
    assert (await node_b.identify(key)).user_id == uid  # now cached on B
    ended: list[set[str]] = []
    node_b.add_listener(ended.append)
    assert await node_b.sweep({f"pk:{record.id}", "login-session-id"}) == set()
    assert await node_a.revoke_key(uid, record.id)
    assert await node_b.sweep({f"pk:{record.id}", "login-session-id"}) == {f"pk:{record.id}"}
    assert ended == [{f"pk:{record.id}"}]
