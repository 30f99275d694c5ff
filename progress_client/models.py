"""Plain data the server sends: tasks, events, API keys, share links (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Self

#: Statuses after which a task never changes again.
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
#: Event names of the terminal events.
TERMINAL_EVENTS = TERMINAL_STATUSES


@dataclass
class Task:
    """A task as `GET /api/v1/tasks/{id}` returns it.

    `progress` is 0..100; `step` is sticky; `message` belongs to the latest update; `seq`
    is the seq of the task's latest event. Times are ISO 8601 UTC strings.
    """

    id: str
    kind: str
    status: str
    params: dict[str, Any] = field(default_factory=dict)
    progress: float = 0
    step: str | None = None
    message: str | None = None
    result: Any = None
    error: str | None = None
    seq: int = 0
    created_at: str | None = None
    updated_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    #: Smoothed rate (percent per second) and seconds left at that rate; None while unknown.
    rate: float | None = None
    eta_s: float | None = None
    #: Its parent (None: a root task), its weight in the parent's progress, and how many
    #: children it has by status (`total`, `pending`, `running`, `completed`, ...).
    parent_id: str | None = None
    weight: float = 1
    auto_finish: bool = False
    fail_fast: bool = False
    children: dict[str, int] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """True once the task is completed, failed or cancelled."""
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """Build from the server's JSON (unknown fields are ignored: newer servers add some)."""
        return cls(**_task_fields(data))

    def _update_from(self, other: Task) -> None:
        """Copy every server field of `other` into this object (used by `refresh`)."""
        for name in _TASK_FIELDS:
            setattr(self, name, getattr(other, name))


_TASK_FIELDS = (
    "id",
    "kind",
    "status",
    "params",
    "progress",
    "step",
    "message",
    "result",
    "error",
    "seq",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "rate",
    "eta_s",
    "parent_id",
    "weight",
    "auto_finish",
    "fail_fast",
    "children",
)


def _task_fields(data: dict[str, Any]) -> dict[str, Any]:
    fields = {name: data[name] for name in _TASK_FIELDS if name in data}
    if fields.get("params") is None:
        fields["params"] = {}
    if fields.get("progress") is None:
        fields["progress"] = 0
    if fields.get("children") is None:
        fields["children"] = {}
    return fields


@dataclass
class Event:
    """One thing `watch` yields: an event, or a snapshot of the task.

    For an event, `event` is `created`, `started`, `progress`, `completed`, `failed` or
    `cancelled` and the other fields are the task's state right after it. For a snapshot
    (the first thing a watch without `last_seq` yields, and what replaces a history that
    is no longer kept) `event` is `"snapshot"`, `task` holds the whole task, and
    `recovered` is False when the snapshot replaces events that were lost to retention:
    replace your state with it.
    """

    task_id: str
    seq: int
    event: str
    status: str
    progress: float = 0
    step: str | None = None
    message: str | None = None
    ts: str | None = None
    result: Any = None
    error: str | None = None
    #: On progress events: the task's smoothed rate (percent/s) and ETA (s), or None.
    rate: float | None = None
    eta_s: float | None = None
    #: On a parent's progress events: the child that moved it, {id, seq, status, progress}.
    child: dict[str, Any] | None = None
    #: The whole task, on snapshots only.
    task: Task | None = None
    #: False on a `"recovered": false` snapshot; True otherwise.
    recovered: bool = True
    #: The message as it came off the wire (for `progress watch --json`).
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def terminal(self) -> bool:
        """True when the task is finished after this event (the watch ends here)."""
        return self.status in TERMINAL_STATUSES

    @property
    def snapshot(self) -> bool:
        return self.event == "snapshot"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Event:
        """From an event (`{"type": "event", ...}`, or an item of `GET .../events`)."""
        return cls(
            task_id=data["task_id"],
            seq=data["seq"],
            event=data["event"],
            status=data["status"],
            progress=data.get("progress") or 0,
            step=data.get("step"),
            message=data.get("message"),
            ts=data.get("ts"),
            result=data.get("result"),
            error=data.get("error"),
            rate=data.get("rate"),
            eta_s=data.get("eta_s"),
            child=data.get("child"),
            raw=data,
        )

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> Event:
        """From a `{"type": "snapshot", "task": {...}}` message."""
        task = Task.from_json(data["task"])
        return cls(
            task_id=task.id,
            seq=task.seq,
            event="snapshot",
            status=task.status,
            progress=task.progress,
            step=task.step,
            message=task.message,
            ts=task.updated_at,
            result=task.result,
            error=task.error,
            rate=task.rate,
            eta_s=task.eta_s,
            task=task,
            recovered=data.get("recovered") is not False,
            raw=data,
        )


@dataclass
class ApiKey:
    """An API key; `key` (the secret) is only set in the answer that created it."""

    id: str
    name: str
    scopes: list[str]
    created_at: str | None = None
    last_used_at: str | None = None
    key: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ApiKey:
        return cls(
            id=str(data["id"]),
            name=data.get("name", ""),
            scopes=list(data.get("scopes") or []),
            created_at=data.get("created_at"),
            last_used_at=data.get("last_used_at"),
            key=data.get("key"),
        )


@dataclass
class ShareLink:
    """A read-only share token for one task, and the demo page's link that uses it."""

    token: str = field(repr=False)
    expires_at: str
    url: str = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShareLink:
        return cls(token=data["token"], expires_at=data["expires_at"], url=data["url"])


@dataclass(frozen=True)
class Update:
    """One progress report: what `POST /tasks/{id}/progress` takes."""

    progress: float
    step: str | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"progress": self.progress}
        if self.step is not None:
            body["step"] = self.step
        if self.message is not None:
            body["message"] = self.message
        return body
