"""What the stores return and raise, whatever the backend: plain data, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..models import Event, Task

#: Bytes of one page of a list or a replay, about (a page always has at least one row).
MAX_PAGE_BYTES = 1024 * 1024


class UsernameTaken(Exception):
    """Another account already has this username (compared without case)."""


def iso_time(epoch: float) -> str:
    """Epoch seconds as the ISO 8601 UTC text every table stores (milliseconds, `Z`)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_time(iso: str) -> float:
    """The inverse of `iso_time`."""
    return datetime.fromisoformat(iso).timestamp()


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """One login. Times are epoch seconds."""

    id: str
    user_id: int
    created_at: float
    expires_at: float
    revoked: bool


@dataclass(frozen=True, slots=True)
class UserSummary:
    """A row of `users list`."""

    id: int
    username: str
    created_at: str
    tasks: int


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


def fit(rows: Sequence[Any], max_bytes: int, size_index: int) -> tuple[list[Any], bool]:
    """The leading rows whose sizes add up to at most `max_bytes` (at least one row), and
    whether rows were left out for it."""
    total = 0
    for i, row in enumerate(rows):
        total += row[size_index] or 0
        if total > max_bytes and i > 0:
            return list(rows[:i]), True
    return list(rows), False


class StoreUnavailable(Exception):
    """The database cannot commit now (busy, full, read-only, I/O): the whole batch failed,
    through no fault of any request in it. Callers answer 503 and may retry later."""


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as stored: never its secret, only the secret's hash."""

    id: str
    user_id: int
    name: str
    scopes: tuple[str, ...]
    secret_hash: str
    created_at: str
    last_used_at: str | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class ShareRecord:
    """A read-only share token of one task. `expires_at` is epoch seconds."""

    id: str
    task_id: str
    user_id: int
    secret_hash: str
    expires_at: float
    revoked: bool


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The first answer to an idempotent request, given again to its retries."""

    fingerprint: str
    status: int
    body: str
