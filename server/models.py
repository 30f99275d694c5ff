"""Domain records: users, tasks and task events. Plain data, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})
ACTIVE_STATUSES = (TaskStatus.PENDING, TaskStatus.RUNNING)


class EventType(enum.StrEnum):
    CREATED = "created"
    STARTED = "started"
    PROGRESS = "progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


def utc_now() -> str:
    """Current time as ISO 8601 UTC with milliseconds, e.g. 2026-11-27T21:40:00.123Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username}


@dataclass(frozen=True, slots=True)
class Task:
    """A task's current state; `seq` is the seq of its latest event."""

    id: str
    user_id: int
    kind: str
    params: dict[str, Any]
    status: TaskStatus
    progress: float
    step: str | None
    message: str | None
    result: dict[str, Any] | None
    error: str | None
    seq: int
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    #: Private resume state of a built-in job; never sent to clients.
    checkpoint: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape (docs/protocol.md, "Task")."""
        return {
            "id": self.id,
            "kind": self.kind,
            "params": self.params,
            "status": self.status.value,
            "progress": self.progress,
            "step": self.step,
            "message": self.message,
            "result": self.result,
            "error": self.error,
            "seq": self.seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a task's history; the task's state right after it happened."""

    task_id: str
    seq: int
    event: EventType
    status: TaskStatus
    progress: float
    step: str | None
    message: str | None
    ts: str
    result: dict[str, Any] | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The public JSON shape; `result` and `error` only when set."""
        data: dict[str, Any] = {
            "task_id": self.task_id,
            "seq": self.seq,
            "event": self.event.value,
            "status": self.status.value,
            "progress": self.progress,
            "step": self.step,
            "message": self.message,
            "ts": self.ts,
        }
        if self.result is not None:
            data["result"] = self.result
        if self.error is not None:
            data["error"] = self.error
        return data
