"""Durable storage: the interfaces every backend implements, and `open_store(url)`.

Two backends implement them: SQLite (`sqlite.py`, `sqlite_accounts.py`: one process, the
default) and PostgreSQL (`postgres.py`: any number of nodes). All SQL lives in this
package; nothing here knows of HTTP, WebSockets or the broker. One shared test suite
(tests/test_store_contract.py) runs against both.

The write path is `Store.apply`: a batch of task changes is planned (`lifecycle.plan_batch`)
on the committed state *inside* the write transaction, so seqs are allocated where they
are stored and two nodes writing to one task never collide.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..lifecycle import Plan, Quotas, Request
from ..models import Task, User
from .records import (
    ApiKeyRecord,
    EventPage,
    EventSpan,
    SessionRecord,
    ShareRecord,
    StoreUnavailable,
    SubscriptionRecord,
    TaskPage,
    UsernameTaken,
    UserSummary,
)

__all__ = [
    "Accounts",
    "ApiKeyRecord",
    "Grants",
    "ShareRecord",
    "Backend",
    "EventPage",
    "EventSpan",
    "SessionRecord",
    "Store",
    "StoreUnavailable",
    "SubscriptionRecord",
    "TaskPage",
    "UserSummary",
    "UsernameTaken",
    "open_store",
    "parse_store_url",
]


class Store(Protocol):
    """Tasks, their events, subscriptions, job leases and retention's reads and deletes."""

    # -- reads ---------------------------------------------------------------------------
    async def get_task(self, task_id: str) -> Task | None: ...

    async def list_tasks(
        self,
        user_id: int,
        statuses: Iterable[object] | None,
        limit: int,
        *,
        before: tuple[str, int] | None = None,
        max_bytes: int = ...,
        roots_only: bool = False,
    ) -> TaskPage: ...

    async def list_children(
        self,
        parent_id: str,
        limit: int,
        *,
        after: tuple[str, int] | None = None,
        max_bytes: int = ...,
    ) -> TaskPage:
        """A task's children, oldest first: at most `limit` and about `max_bytes`;
        `after` is the previous page's `next`."""

    async def list_events(
        self, task_id: str, after_seq: int, limit: int, *, max_bytes: int = ...
    ) -> EventPage: ...

    async def first_kept_seq(self, task_id: str) -> int | None: ...

    async def task_seqs(self, task_ids: Sequence[str]) -> dict[str, int]:
        """The latest seq of each task that exists (the gap check of a node)."""

    async def count_tasks_by_status(self) -> dict[str, int]: ...

    async def count_unfinished(self, kinds: Iterable[str]) -> int: ...

    async def tasks_to_resume(
        self, kinds: Iterable[str], after: tuple[str, str] | None = None, limit: int = 100
    ) -> list[Task]:
        """Unfinished tasks of `kinds` whose job lease is absent or expired, oldest first."""

    # -- the one write path --------------------------------------------------------------
    async def apply(
        self, requests: Sequence[Request], quotas: Quotas, clock: Callable[[], str]
    ) -> Plan:
        """Plan and commit a batch in one transaction.

        Raises:
            StoreUnavailable: the database cannot commit now; nothing was written.
            Exception: anything else (nothing was written); it may belong to one request.
        """

    # -- job leases: one node runs a built-in job at a time --------------------------------
    async def acquire_lease(self, task_id: str, node_id: str, ttl: float) -> bool:
        """Take (or renew) the task's lease for `ttl` seconds of the store's clock, unless
        another node holds one that has not expired."""

    async def renew_leases(self, node_id: str, task_ids: Sequence[str], ttl: float) -> set[str]:
        """Extend this node's leases; returns the ids still held (others were taken over)."""

    async def release_lease(self, task_id: str, node_id: str) -> None: ...

    # -- subscription history ------------------------------------------------------------
    async def record_subscriptions(
        self,
        opened: Sequence[tuple[str, int, str, str]],
        closed: Sequence[tuple[str, str, str]],
        node_id: str = "",
    ) -> None:
        """Record (connection_id, user_id, task_id, at) opened and (connection_id, task_id,
        at) closed subscriptions of this node.

        Raises:
            StoreUnavailable: the store cannot take them now (the caller may try again).
        """

    async def close_open_subscriptions(self, at: str, node_id: str) -> int:
        """At start: no connection of this node survived (SQLite: of any node, there is
        only one)."""

    async def list_subscriptions(self, user_id: int, limit: int) -> list[SubscriptionRecord]: ...

    # -- retention -----------------------------------------------------------------------
    def exclusive(self, name: str) -> AbstractAsyncContextManager[bool]:
        """Hold a named lock across nodes for a while; yields False if another node has it."""

    async def finished_task_spans(
        self,
        finished_before: str,
        after: tuple[str, str] | None,
        limit: int,
        *,
        count_subscriptions: bool = False,
    ) -> list[EventSpan]: ...

    async def task_spans(self, task_ids: Sequence[str]) -> list[EventSpan]: ...

    async def tasks_with_seq_over(
        self, seq: int, after_id: str, limit: int
    ) -> tuple[str | None, list[str]]: ...

    async def delete_event_ranges(self, ranges: Sequence[tuple[str, int, int]]) -> int: ...

    async def delete_subscriptions_of(self, task_id: str, limit: int) -> int: ...

    async def delete_finished_tasks(self, task_ids: Sequence[str]) -> tuple[int, int, int]: ...

    async def reclaim(self, pause: Callable[[], Awaitable[None]]) -> int:
        """Give free space back after deletes (SQLite: incremental vacuum and a WAL
        checkpoint); returns pages freed (0 where the database does it itself)."""

    # -- operations ----------------------------------------------------------------------
    async def size_bytes(self) -> dict[str, int]:
        """Sizes of what the store occupies, by part (`db`, `wal`), for /metrics."""

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the database answers now (/healthz)."""


class Accounts(Protocol):
    """Users, their login sessions, and the database's instance id."""

    async def instance_id(self) -> str: ...

    async def shared_secret(self) -> str:
        """A random JWT secret kept in the database, made on first use: every node of a
        shared store signs with it (SQLite keeps its secret in a file beside the database
        instead, and does not implement this)."""

    async def create_user(self, username: str, password_hash: str, created_at: str) -> User: ...

    async def username_taken(self, username: str) -> bool: ...

    async def find_credentials(self, username: str) -> tuple[User, str] | None: ...

    async def password_hash(self, user_id: int) -> str | None: ...

    async def get_user(self, user_id: int) -> User | None: ...

    async def find_user(self, username: str) -> User | None: ...

    async def replace_password_hash(self, user_id: int, old: str, new: str) -> bool: ...

    async def change_password(self, user_id: int, new_hash: str, at: float) -> list[str]: ...

    async def list_users(self) -> list[UserSummary]: ...

    async def remove_user(self, user_id: int, at: float) -> list[str]: ...

    async def create_session(
        self,
        session_id: str,
        user_id: int,
        created_at: float,
        expires_at: float,
        max_per_user: int,
    ) -> list[str]: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def live_sessions(self, session_ids: Sequence[str], now: float) -> set[str]: ...

    async def revoke_session(self, session_id: str, at: float) -> bool: ...

    async def revoke_user_sessions(self, user_id: int, at: float) -> list[str]: ...


class Grants(Protocol):
    """API keys (a user's workers) and share tokens (read access to one task)."""

    async def create_api_key(
        self, key_id: str, user_id: int, name: str, scopes: Sequence[str], secret_hash: str, at: str
    ) -> None: ...

    async def count_api_keys(self, user_id: int) -> int:
        """Keys of the user that are not revoked."""

    async def list_api_keys(self, user_id: int) -> list[ApiKeyRecord]:
        """The user's keys that are not revoked, oldest first."""

    async def get_api_key(self, key_id: str) -> ApiKeyRecord | None: ...

    async def revoke_api_key(self, key_id: str, user_id: int, at: str) -> bool:
        """False if the user has no such live key."""

    async def touch_api_key(self, key_id: str, at: str) -> None:
        """Record that the key was used (`last_used_at`)."""

    async def create_share(
        self,
        share_id: str,
        task_id: str,
        user_id: int,
        secret_hash: str,
        created_at: str,
        expires_at: float,
    ) -> None: ...

    async def count_live_shares(self, task_id: str, now: float) -> int: ...

    async def get_share(self, share_id: str) -> ShareRecord | None: ...

    async def revoke_shares(self, task_id: str, at: str) -> list[str]:
        """End every share token of the task not revoked yet; returns their ids."""

    async def purge(self, answers_before: str, now: float, limit: int) -> int:
        """Delete up to `limit` idempotency answers stored before `answers_before` and share
        tokens expired or revoked by `now`; returns how many rows went (retention)."""


@dataclass
class Backend:
    """An open store: its task and account sides, and how to close it."""

    #: "sqlite" or "postgresql".
    kind: str
    store: Store
    accounts: Accounts
    grants: Grants
    close: Callable[[], Awaitable[None]]
    #: True when several server processes may share it (a broker other than memory:// then
    #: makes sense); SQLite is one process.
    shared: bool
    #: The SQLite `Database` (tests and the SQLite-only tools); None for PostgreSQL.
    sqlite: object | None = None


@dataclass(frozen=True)
class StoreUrl:
    kind: str
    #: SQLite: the database file. PostgreSQL: None.
    path: Path | None
    #: The URL as given (PostgreSQL: passed to asyncpg).
    url: str


def parse_store_url(url: str) -> StoreUrl:
    """`sqlite:///relative.db`, `sqlite:////absolute.db` or `postgresql://user:pw@host/db`.

    Raises ValueError with a message for the operator.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc:
            raise ValueError(f"{url!r}: a SQLite URL has no host: sqlite:///path/to/file.db")
        path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
        if not path:
            raise ValueError(f"{url!r}: no file: sqlite:///data/app.db")
        return StoreUrl("sqlite", Path(path), url)
    if parts.scheme in ("postgresql", "postgres"):
        if not parts.hostname and not parts.path.strip("/"):
            raise ValueError(f"{url!r}: expected postgresql://user:password@host:port/db")
        return StoreUrl("postgresql", None, url)
    raise ValueError(f"{url!r}: the store must be sqlite:///FILE or postgresql://…")


async def open_store(
    url: str,
    *,
    migrations_root: Path,
    synchronous: str = "FULL",
    readers: int = 4,
) -> Backend:
    """Open (creating and migrating as needed) the store at `url`."""
    parsed = parse_store_url(url)
    if parsed.kind == "sqlite":
        from .sqlite import open_sqlite

        assert parsed.path is not None
        return await open_sqlite(parsed.path, migrations_root / "sqlite", synchronous, readers)
    from .postgres import open_postgres

    return await open_postgres(parsed.url, migrations_root / "postgres")
