"""Domain records: users, tasks and task events, and their wire form. Plain data, no I/O.

A task's `params` and `result` (and a built-in job's `checkpoint`) are JSON values that the
server never looks inside on its hot paths. They are kept as their compact JSON text from
the moment they are accepted (see `budget.compact`): that is what is stored, and it is
spliced as is into the JSON of answers and messages (`Task.to_json`), so a large value is
never parsed and serialised again, and its memory is its size in bytes.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Compact JSON text of a value (an object for params and result).
RawJson = str


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


def dumps(value: Any) -> str:
    """Wire JSON: compact, non-ASCII as UTF-8 (sizes are counted in UTF-8 bytes)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def splice(head: dict[str, Any], raw: dict[str, RawJson | None]) -> str:
    """`head` as JSON with the members of `raw` (already JSON text, or None) appended."""
    text = dumps(head)
    tail = "".join(f',"{key}":{"null" if value is None else value}' for key, value in raw.items())
    if not tail:
        return text
    return text[:-1] + tail + "}" if len(head) else "{" + tail[1:] + "}"


@dataclass(frozen=True, slots=True)
class User:
    id: int
    username: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "username": self.username}


@dataclass(frozen=True, slots=True)
class TaskState:
    """What the write path needs to know of a task: no params, result or message.

    The tracker keeps these for recently written tasks, so their memory is small and
    bounded whatever the tasks carry.
    """

    id: str
    user_id: int
    kind: str
    status: TaskStatus
    progress: float
    step: str | None
    seq: int
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    #: Its parent task (None: a root), its weight in the parent's mean, levels below a root.
    parent_id: str | None = None
    weight: float = 1
    depth: int = 0
    #: How it finishes: 0 by its owner, 1 auto_finish, 2 auto_finish with fail_fast.
    finish: int = 0
    #: Its children's counts and sums (`tree.Tree` as JSON; None: it has none yet).
    tree: RawJson | None = None
    #: Rate (percent per second) and ETA of its latest progress, and the smoothing state
    #: behind them (`meter.Meter` as JSON).
    rate: float | None = None
    eta_s: float | None = None
    meter: RawJson | None = None


#: Child counts of a task without children.
NO_CHILDREN = {
    "total": 0,
    "pending": 0,
    "running": 0,
    "completed": 0,
    "failed": 0,
    "cancelled": 0,
}


@dataclass(frozen=True, slots=True)
class Task:
    """A task's current state; `seq` is the seq of its latest event."""

    id: str
    user_id: int
    kind: str
    params: RawJson
    status: TaskStatus
    progress: float
    step: str | None
    message: str | None
    result: RawJson | None
    error: str | None
    seq: int
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None
    #: Private resume state of a built-in job; never sent to clients.
    checkpoint: RawJson | None = field(default=None, compare=False)
    parent_id: str | None = None
    weight: float = 1
    depth: int = 0
    finish: int = 0
    #: Its children's counts and sums (`tree.Tree` as JSON), None without children.
    tree: RawJson | None = None
    rate: float | None = None
    eta_s: float | None = None

    def _head(self) -> dict[str, Any]:
        children = NO_CHILDREN
        if self.tree is not None:
            counts = json.loads(self.tree)
            children = {key: counts[key] for key in NO_CHILDREN}
        return {
            "id": self.id,
            "kind": self.kind,
            "status": self.status.value,
            "progress": self.progress,
            "step": self.step,
            "message": self.message,
            "error": self.error,
            "seq": self.seq,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "rate": self.rate,
            "eta_s": self.eta_s,
            "parent_id": self.parent_id,
            "weight": self.weight,
            "auto_finish": self.finish > 0,
            "fail_fast": self.finish > 1,
            "children": children,
        }

    def to_json(self) -> str:
        """The public JSON shape (docs/protocol.md, "Task"), params and result spliced in."""
        return splice(self._head(), {"params": self.params, "result": self.result})

    def to_dict(self) -> dict[str, Any]:
        """The same shape as a dict (tests and tools; the server sends `to_json`)."""
        return json.loads(self.to_json())

    def params_value(self) -> Any:
        return json.loads(self.params)

    def checkpoint_value(self) -> Any:
        return None if self.checkpoint is None else json.loads(self.checkpoint)


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
    result: RawJson | None = None
    error: str | None = None
    #: Progress events: the task's smoothed rate (percent per second) and ETA (seconds).
    rate: float | None = None
    eta_s: float | None = None
    #: A parent's progress event: the child that moved, `{id, seq, status, progress}`.
    child: RawJson | None = None

    def _head(self) -> dict[str, Any]:
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
        if self.event is EventType.PROGRESS:
            data["rate"] = self.rate
            data["eta_s"] = self.eta_s
        if self.error is not None:
            data["error"] = self.error
        return data

    def to_json(self, **extra: Any) -> str:
        """The public JSON shape; `result`, `error` and `child` only when set; `extra` first."""
        head = {**extra, **self._head()}
        raw: dict[str, RawJson | None] = {}
        if self.child is not None:
            raw["child"] = self.child
        if self.result is not None:
            raw["result"] = self.result
        return splice(head, raw)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.to_json())

    @property
    def stored_bytes(self) -> int:
        """Roughly what this event costs on disk, for the per-user storage quota."""
        return (
            96
            + len(self.ts)
            + len((self.step or "").encode())
            + len((self.message or "").encode())
            + len((self.result or "").encode())
            + len((self.error or "").encode())
            + len((self.child or "").encode())
        )
