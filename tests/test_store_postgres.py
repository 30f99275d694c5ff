"""What only the PostgreSQL store must do: several nodes on one database, and outages.

The contract both stores share is in test_store_contract.py. Here two Backends on one
database stand for two nodes, and the session's server (tests/pg.py) is stopped, crashed
and restarted under an open Backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from server.errors import QuotaExceeded
from server.idempotency import Claim
from server.lifecycle import Complete, Create, Progress, Quotas, Request
from server.models import Event, utc_now
from server.retention import Retention
from server.store import Backend, StoreUnavailable, UsernameTaken
from server.store.postgres import open_postgres
from server.store.postgres_db import DatabaseError, migrate, open_database
from server.store.postgres_writes import IdempotencyRace
from server.tracker import Tracker

from .pg import MIGRATIONS, PASSWORD, PostgresServer, free_port

NO_QUOTAS = Quotas()
#: Upper bound on how long an outage may take to surface (the point is: it does not hang).
OUTAGE_BOUND = 30.0


@asynccontextmanager
async def nodes(url: str, count: int = 2) -> AsyncIterator[list[Backend]]:
    """`count` Backends on one database, as `count` server nodes would open it."""
    opened = [await open_postgres(url, MIGRATIONS) for _ in range(count)]
    try:
        yield opened
    finally:
        for backend in opened:
            await backend.close()


async def new_task(backend: Backend, user_id: int) -> str:
    plan = await backend.store.apply(
        [Request("", user_id, Create(user_id, "job", "{}"))], NO_QUOTAS, utc_now
    )
    created = plan.outcomes[0].created
    assert created is not None
    return created.id


def progress(task_id: str, user_id: int, value: float = 1) -> Request:
    return Request(task_id, user_id, Progress(value))


async def events_of(backend: Backend, task_id: str) -> list[Event]:
    return (await backend.store.list_events(task_id, 0, 100_000)).events


async def test_two_nodes_writing_one_task_get_consecutive_seqs(pg_url: str) -> None:
    """Concurrent batches from two nodes to one task: every seq once, none missing."""
    async with nodes(pg_url) as (a, b):
        uid = (await a.accounts.create_user("alice", "h", utc_now())).id
        task_id = await new_task(a, uid)
        await a.store.apply([progress(task_id, uid)], NO_QUOTAS, utc_now)  # seqs 2, 3
        batches = [
            node.store.apply([progress(task_id, uid, i)] * 4, NO_QUOTAS, utc_now)
            for i in range(15)
            for node in (a, b)
        ]
        plans = await asyncio.gather(*batches)
        seqs = [e.seq for plan in plans for o in plan.outcomes for e in o.events]
        assert sorted(seqs) == list(range(4, 124))
        for node in (a, b):
            assert [e.seq for e in await events_of(node, task_id)] == list(range(1, 124))
            task = await node.store.get_task(task_id)
            assert task is not None and task.seq == 123


async def test_the_unfinished_quota_holds_across_nodes(pg_url: str) -> None:
    """Creates racing on two nodes for one user never pass the unfinished-task quota."""
    async with nodes(pg_url) as (a, b):
        uid = (await a.accounts.create_user("alice", "h", utc_now())).id
        quotas = Quotas(max_unfinished_tasks=5)
        create = [Request("", uid, Create(uid, "job", "{}"))]
        plans = await asyncio.gather(
            *(node.store.apply(create, quotas, utc_now) for _ in range(8) for node in (a, b))
        )
        outcomes = [o for plan in plans for o in plan.outcomes]
        assert sum(o.error is None for o in outcomes) == 5
        assert all(isinstance(o.error, QuotaExceeded) for o in outcomes if o.error is not None)
        assert await b.store.count_unfinished(["job"]) == 5


async def test_a_lease_follows_the_databases_clock_not_the_nodes(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose clock is a day behind still holds its lease against another node."""
    async with nodes(pg_url) as (a, b):
        uid = (await a.accounts.create_user("alice", "h", utc_now())).id
        task_id = await new_task(a, uid)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 86_400)
        assert await a.store.acquire_lease(task_id, "slow-clock", 60)
        assert await a.store.renew_leases("slow-clock", [task_id], 60) == {task_id}
        monkeypatch.setattr(time, "time", real)
        assert not await b.store.acquire_lease(task_id, "other", 60)
        assert await b.store.tasks_to_resume(["job"]) == []


async def test_reads_and_writes_are_unavailable_while_the_server_is_down(
    pg_url: str, pg_server: PostgresServer
) -> None:
    """A stopped server: reads, writes, leases and ping raise StoreUnavailable (they do not
    hang); after a restart the same Backend works again, nothing committed lost."""
    async with nodes(pg_url, 1) as (backend,):
        uid = (await backend.accounts.create_user("alice", "h", utc_now())).id
        task_id = await new_task(backend, uid)
        pg_server.stop()
        try:
            async with asyncio.timeout(OUTAGE_BOUND):
                # Functions, not coroutines made in advance: one left unawaited would warn.
                calls = [
                    lambda: backend.store.ping(),
                    lambda: backend.store.get_task(task_id),
                    lambda: backend.store.list_events(task_id, 0, 10),
                    lambda: backend.store.list_tasks(uid, None, 10),
                    lambda: backend.store.apply([progress(task_id, uid)], NO_QUOTAS, utc_now),
                    lambda: backend.store.acquire_lease(task_id, "n", 10),
                    lambda: backend.accounts.get_user(uid),
                    lambda: backend.accounts.create_session("s", uid, 0.0, 1.0, 5),
                ]
                for call in calls:
                    with pytest.raises(StoreUnavailable):
                        await call()
                with pytest.raises(StoreUnavailable):
                    async with backend.store.exclusive("retention"):
                        pass
        finally:
            pg_server.start()
        plan = await backend.store.apply([progress(task_id, uid, 7)], NO_QUOTAS, utc_now)
        assert [e.seq for o in plan.outcomes for e in o.events] == [2, 3]
        assert [e.seq for e in await events_of(backend, task_id)] == [1, 2, 3]
        await backend.store.ping()


async def test_a_crash_keeps_every_committed_batch(pg_url: str, pg_server: PostgresServer) -> None:
    """After `pg_ctl -m immediate stop` and recovery, every acknowledged batch is there and
    the Backend that saw the crash writes on from the next seq."""
    async with nodes(pg_url, 1) as (backend,):
        uid = (await backend.accounts.create_user("alice", "h", utc_now())).id
        task_id = await new_task(backend, uid)
        for i in range(20):
            await backend.store.apply([progress(task_id, uid, i)], NO_QUOTAS, utc_now)
        pg_server.crash()
        try:
            async with asyncio.timeout(OUTAGE_BOUND):
                with pytest.raises(StoreUnavailable):
                    await backend.store.apply([progress(task_id, uid)], NO_QUOTAS, utc_now)
        finally:
            pg_server.start()
        assert [e.seq for e in await events_of(backend, task_id)] == list(range(1, 23))
        plan = await backend.store.apply([progress(task_id, uid)], NO_QUOTAS, utc_now)
        assert [e.seq for o in plan.outcomes for e in o.events] == [23]


async def test_connections_the_server_killed_are_replaced_unnoticed(
    pg_url: str, pg_server: PostgresServer
) -> None:
    """Idle pooled connections killed by the server (a restart, an admin) cost no error:
    the next read and write run on new connections."""
    async with nodes(pg_url, 1) as (backend,):
        uid = (await backend.accounts.create_user("alice", "h", utc_now())).id
        task_id = await new_task(backend, uid)
        killed = pg_server.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'progress-server'"
        )
        assert int(killed) >= 2  # the read pool's and the write pool's
        task = await backend.store.get_task(task_id)
        assert task is not None and task.seq == 1
        plan = await backend.store.apply([progress(task_id, uid)], NO_QUOTAS, utc_now)
        assert plan.outcomes[0].error is None


async def test_opening_an_unreachable_server_says_where_without_the_password() -> None:
    """Nothing listening: StoreUnavailable naming host, port and database, not the password."""
    port = free_port()
    url = f"postgresql://progress:{PASSWORD}@127.0.0.1:{port}/progress"
    with pytest.raises(StoreUnavailable) as caught:
        await open_postgres(url, MIGRATIONS)
    message = str(caught.value)
    assert f"127.0.0.1:{port}/progress" in message and PASSWORD not in message


async def test_a_wrong_password_is_reported(pg_url: str) -> None:
    """The server refuses the login: StoreUnavailable with PostgreSQL's reason."""
    wrong = pg_url.replace(PASSWORD, "not-the-password")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        await open_postgres(wrong, MIGRATIONS)


async def test_nodes_starting_together_migrate_once(pg_server: PostgresServer) -> None:
    """Two migrations at once on an empty database: one applies, the other finds it done."""
    name = "fresh_migrations"
    pg_server.create_database(name)
    try:
        url = pg_server.url(name)
        applied = await asyncio.gather(migrate(url, MIGRATIONS), migrate(url, MIGRATIONS))
        assert sorted(applied) == [[], [1, 2, 3]]
        assert await migrate(url, MIGRATIONS) == []
        rows = pg_server.psql("SELECT version, name FROM schema_migrations", database=name)
        assert rows.split() == ["1|initial", "2|grants", "3|children"]
    finally:
        pg_server.drop_database(name)


async def test_a_database_from_a_newer_version_is_refused(pg_url: str) -> None:
    """A migration we do not know means a newer server migrated it: refuse to start."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'later')")
    finally:
        await conn.close()
    with pytest.raises(DatabaseError, match="9999"):
        await open_postgres(pg_url, MIGRATIONS)


async def test_only_a_taken_name_is_reported_as_taken(pg_url: str) -> None:
    """A unique violation that is not the username's (here, an id sequence set back, as a
    careless restore leaves it) is an error, not "username_taken"."""
    async with nodes(pg_url, 1) as (backend,):
        await backend.accounts.create_user("carol", "h", utc_now())
        with pytest.raises(UsernameTaken):
            await backend.accounts.create_user("CAROL", "h", utc_now())
        conn = await asyncpg.connect(pg_url)
        try:
            await conn.execute("SELECT setval('users_id_seq', 1, false)")
        finally:
            await conn.close()
        with pytest.raises(asyncpg.UniqueViolationError) as raised:
            await backend.accounts.create_user("dave", "h", utc_now())
        assert not isinstance(raised.value, UsernameTaken)
        assert raised.value.constraint_name == "users_pkey"


async def test_the_tracker_runs_on_postgresql(pg_url: str) -> None:
    """The tracker's group commit works the same over the PostgreSQL store."""
    async with nodes(pg_url, 1) as (backend,):
        uid = (await backend.accounts.create_user("alice", "h", utc_now())).id
        tracker = Tracker(backend.store)
        seen: list[int] = []
        tracker.add_listener(lambda event: seen.append(event.seq))
        tracker.start()
        try:
            task = await tracker.create_task(uid, "job", "{}")
            updates = await asyncio.gather(
                *(tracker.report_progress(task.id, Progress(i)) for i in range(10))
            )
            await tracker.complete(task.id, '{"ok":1}')
        finally:
            await tracker.stop()
        assert sorted(e.seq for events in updates for e in events) == list(range(2, 13))
        assert seen == list(range(1, 14))
        stored = await backend.store.get_task(task.id)
        assert stored is not None and (stored.status, stored.seq) == ("completed", 13)


async def test_retention_runs_on_postgresql(pg_url: str) -> None:
    """One retention run over the PostgreSQL store: old finished tasks go, others are
    trimmed to their last event or capped, and the owner's stored bytes follow."""
    async with nodes(pg_url, 1) as (backend,):
        store = backend.store
        uid = (await backend.accounts.create_user("alice", "h", utc_now())).id
        old, trimmed, capped = [await new_task(backend, uid) for _ in range(3)]
        for task_id in (old, trimmed, capped):
            await store.apply([progress(task_id, uid, i) for i in range(10)], NO_QUOTAS, utc_now)
        for task_id in (old, trimmed):
            await store.apply([Request(task_id, uid, Complete())], NO_QUOTAS, utc_now)
        # `old` finished two days ago; the job's clock is two hours ahead.
        conn = await asyncpg.connect(pg_url)
        try:
            long_ago = (datetime.now(UTC) - timedelta(days=2)).isoformat().replace("+00:00", "Z")
            await conn.execute("UPDATE tasks SET finished_at = $1 WHERE id = $2", long_ago, old)
        finally:
            await conn.close()
        retention = Retention(
            store,
            event_retention=3600,
            task_retention=86_400 + 3600,
            max_events_per_task=5,
            interval=3600,
            batch_rows=4,
            clock=lambda: datetime.now(UTC) + timedelta(hours=2),
        )
        report = await retention.run_once()
        assert await store.get_task(old) is None
        assert [e.seq for e in await events_of(backend, trimmed)] == [13]
        assert [e.seq for e in await events_of(backend, capped)] == list(range(8, 13))
        assert report.tasks_deleted == 1 and report.transactions > 3
        spans = await store.task_spans([trimmed, capped])
        assert sorted((s.first_kept, s.seq) for s in spans) == [(8, 12), (13, 13)]
        conn = await asyncpg.connect(pg_url)
        try:
            counted = await conn.fetchval("SELECT stored_bytes FROM users WHERE id = $1", uid)
            actual = await conn.fetchval(
                "SELECT (SELECT sum(bytes) FROM tasks) + (SELECT sum(bytes) FROM task_events)"
            )
        finally:
            await conn.close()
        assert counted == actual > 0


async def test_a_transaction_aborted_as_a_deadlock_runs_again(pg_url: str) -> None:
    """Two transactions locking two rows in opposite orders deadlock; PostgreSQL aborts
    one, and `write` runs it again: both commit, nothing is lost."""
    db = await open_database(pg_url, MIGRATIONS)
    try:
        await db.execute("INSERT INTO meta (key, value) VALUES ('a', '0'), ('b', '0')")
        holding = {"a": asyncio.Event(), "b": asyncio.Event()}
        attempts = {"a": 0, "b": 0}

        def locker(first: str, second: str) -> Any:
            async def transaction(conn: asyncpg.Connection) -> None:
                attempts[first] += 1
                await conn.execute(
                    "UPDATE meta SET value = (value::int + 1)::text WHERE key = $1", first
                )
                if attempts[first] == 1:  # only the first time: both hold one row now
                    holding[first].set()
                    await holding[second].wait()
                await conn.execute(
                    "UPDATE meta SET value = (value::int + 1)::text WHERE key = $1", second
                )

            return transaction

        async with asyncio.timeout(OUTAGE_BOUND):
            await asyncio.gather(db.write(locker("a", "b")), db.write(locker("b", "a")))
        assert sorted(attempts.values()) == [1, 2]
        rows = await db.fetch("SELECT key, value FROM meta WHERE key IN ('a', 'b') ORDER BY key")
        assert [tuple(row) for row in rows] == [("a", "2"), ("b", "2")]
    finally:
        await db.close()


async def test_one_idempotency_key_on_two_nodes_at_once_acts_once(pg_url: str) -> None:
    """The same claimed create committed by two nodes concurrently (no row lock orders
    them): one task; a loser is replayed, or rolled back (IdempotencyRace) and its retry
    replayed."""
    async with nodes(pg_url) as (a, b):
        uid = (await a.accounts.create_user("alice", "h", utc_now())).id
        request = Request("", uid, Create(uid, "job", "{}"), Claim(uid, "once", "fp"))
        results = await asyncio.gather(
            *(node.store.apply([request], NO_QUOTAS, utc_now) for node in (a, b) for _ in range(4)),
            return_exceptions=True,
        )
        outcomes = [r.outcomes[0] for r in results if not isinstance(r, BaseException)]
        created = [o.created for o in outcomes if o.created is not None]
        assert len(created) == 1
        assert all(o.replayed is not None for o in outcomes if o.created is None)
        assert all(isinstance(r, IdempotencyRace) for r in results if isinstance(r, BaseException))
        (retry,) = (await b.store.apply([request], NO_QUOTAS, utc_now)).outcomes
        assert retry.replayed is not None and created[0].id in retry.replayed.body
        assert await a.store.count_unfinished(["job"]) == 1


async def test_a_query_cut_by_a_crash_reports_the_lost_connection(
    pg_url: str, pg_server: PostgresServer
) -> None:
    """A write in flight when the server crashes fails as StoreUnavailable saying the
    connection was lost, not that asyncpg had already given it back to its pool (a read
    is tried once more, and says the server refused it)."""
    db = await open_database(pg_url, MIGRATIONS)
    try:
        read = asyncio.create_task(db.fetchval("SELECT pg_sleep(60)"))
        write = asyncio.create_task(db.write(lambda c: c.execute("SELECT pg_sleep(60)")))
        async with asyncio.timeout(OUTAGE_BOUND):
            while (
                int(
                    pg_server.psql(
                        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                    )
                )
                < 2
            ):
                await asyncio.sleep(0.01)
        pg_server.crash()
        try:
            async with asyncio.timeout(OUTAGE_BOUND):
                with pytest.raises(StoreUnavailable, match="closed in the middle of operation"):
                    await write
                with pytest.raises(StoreUnavailable, match="Connect call failed"):
                    await read
        finally:
            pg_server.start()
        assert await db.fetchval("SELECT 1") == 1  # and the pools recover
    finally:
        await db.close()


async def test_the_pools_log_an_outage_in_one_line(
    pg_url: str, pg_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While the server is down, asyncpg's retries to refill a pool are logged without a
    traceback, with the error that stopped them."""
    db = await open_database(pg_url, MIGRATIONS)
    try:
        pg_server.stop()
        try:
            # Losing the pools' connections makes asyncpg try to restore their floor.
            with pytest.raises(StoreUnavailable):
                await db.fetchval("SELECT 1")
            async with asyncio.timeout(OUTAGE_BOUND):
                while not [r for r in caplog.records if r.name == "asyncpg.pool"]:
                    await asyncio.sleep(0.01)
        finally:
            pg_server.start()
        retries = [r for r in caplog.records if r.name == "asyncpg.pool"]
        for record in retries:
            assert record.exc_info is None and record.exc_text is None
            assert "Failed to restore the pool connection floor" in record.getMessage()
            assert " error=" in record.getMessage()
    finally:
        await db.close()
