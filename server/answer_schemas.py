"""Marshmallow schemas of every HTTP answer and stream message (requests: schemas.py).

The server writes its answers itself (`Task.to_json` splices stored JSON text); these
schemas describe that JSON for the OpenAPI document (`web/openapi.py`), so the SDK and the
docs can name each shape. Unknown fields raise, so the document says
`additionalProperties: false` and an answer that grows a field the schema lacks fails
tests/test_openapi.py.
"""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from .models import EventType, TaskStatus
from .schemas import Number, StrictInt

#: A 32-hex-digit task id (uuid4).
TASK_ID = validate.Regexp(r"^[0-9a-f]{32}\Z", error="32 lowercase hex digits")
_SEQ = validate.Range(min=1)
_SCOPES = fields.List(
    fields.String(validate=validate.OneOf(["tasks:read", "tasks:write"])),
    required=True,
    validate=validate.Length(min=1, max=2),
)


def _time(*, allow_none: bool = False, description: str = "") -> fields.DateTime:
    """An ISO 8601 UTC time with milliseconds, e.g. 2026-11-27T21:41:46.050Z."""
    return fields.DateTime(
        required=True,
        allow_none=allow_none,
        metadata={"description": description} if description else None,
    )


class User(Schema):
    id = StrictInt(required=True)
    username = fields.String(required=True)


class Token(Schema):
    """A login token: send it as `Authorization: Bearer <access_token>`."""

    access_token = fields.String(required=True, metadata={"description": "An HS256 JWT."})
    token_type = fields.String(required=True, validate=validate.OneOf(["bearer"]))
    expires_in = StrictInt(
        required=True,
        validate=validate.Range(min=1),
        metadata={"description": "Seconds until the token expires (`exp - iat`)."},
    )


class Children(Schema):
    """How many children a task has, by status."""

    total = StrictInt(required=True)
    pending = StrictInt(required=True)
    running = StrictInt(required=True)
    completed = StrictInt(required=True)
    failed = StrictInt(required=True)
    cancelled = StrictInt(required=True)


class Task(Schema):
    """A task's current state; `seq` is the seq of its latest event."""

    id = fields.String(required=True, validate=TASK_ID)
    kind = fields.String(required=True)
    params = fields.Dict(required=True)
    status = fields.Enum(TaskStatus, by_value=fields.String, required=True)
    progress = Number(required=True, validate=validate.Range(min=0, max=100))
    step = fields.String(required=True, allow_none=True)
    message = fields.String(required=True, allow_none=True)
    result = fields.Dict(required=True, allow_none=True)
    error = fields.String(required=True, allow_none=True)
    seq = StrictInt(required=True, validate=_SEQ)
    created_at = _time()
    updated_at = _time()
    started_at = _time(allow_none=True)
    finished_at = _time(allow_none=True)
    rate = Number(
        required=True,
        allow_none=True,
        metadata={"description": "Smoothed progress rate, percent per second (null: unknown)."},
    )
    eta_s = Number(
        required=True,
        allow_none=True,
        metadata={"description": "Seconds to 100 % at that rate (null: unknown)."},
    )
    parent_id = fields.String(required=True, allow_none=True)
    weight = Number(required=True, metadata={"description": "Weight in its parent's mean."})
    auto_finish = fields.Boolean(required=True)
    fail_fast = fields.Boolean(required=True)
    children = fields.Nested(Children, required=True)


class ChildMoved(Schema):
    """On a parent's progress event: the child that moved it."""

    id = fields.String(required=True, validate=TASK_ID)
    seq = StrictInt(required=True, validate=_SEQ)
    status = fields.Enum(TaskStatus, by_value=fields.String, required=True)
    progress = Number(required=True, validate=validate.Range(min=0, max=100))


class Event(Schema):
    """One entry of a task's history: the task's state right after it."""

    task_id = fields.String(required=True, validate=TASK_ID)
    seq = StrictInt(required=True, validate=_SEQ)
    event = fields.Enum(EventType, by_value=fields.String, required=True)
    status = fields.Enum(TaskStatus, by_value=fields.String, required=True)
    progress = Number(required=True, validate=validate.Range(min=0, max=100))
    step = fields.String(required=True, allow_none=True)
    message = fields.String(required=True, allow_none=True)
    ts = _time()
    result = fields.Dict(metadata={"description": "Only on `completed`."})
    error = fields.String(metadata={"description": "Only on `failed` and `cancelled`."})
    rate = Number(
        allow_none=True, metadata={"description": "Only on `progress`: percent per second."}
    )
    eta_s = Number(allow_none=True, metadata={"description": "Only on `progress`: seconds left."})
    child = fields.Nested(ChildMoved, metadata={"description": "Only on a parent's `progress`."})


class TaskPage(Schema):
    tasks = fields.List(fields.Nested(Task), required=True)
    next_cursor = fields.String(
        required=True,
        allow_none=True,
        metadata={"description": "Pass as `?cursor=` for the next page; null at the end."},
    )


class EventPage(Schema):
    events = fields.List(fields.Nested(Event), required=True)
    next_after_seq = StrictInt(
        required=True,
        allow_none=True,
        metadata={"description": "Pass as `?after_seq=` for the next page; null at the end."},
    )


class Seq(Schema):
    """An accepted update: the seq of the last event it stored."""

    seq = StrictInt(required=True, validate=_SEQ)


class BatchSeq(Seq):
    """An accepted batch: its last event's seq and its first update's."""

    first_seq = StrictInt(required=True, validate=_SEQ)


class ApiKey(Schema):
    """An API key as listed: never its secret."""

    id = fields.String(required=True)
    name = fields.String(required=True)
    scopes = _SCOPES
    created_at = _time()
    last_used_at = _time(
        allow_none=True, description="Updated at most once a minute per node; null if unused."
    )


class NewApiKey(Schema):
    """A key just made: `key` is shown only in this answer."""

    id = fields.String(required=True)
    name = fields.String(required=True)
    scopes = _SCOPES
    key = fields.String(
        required=True,
        validate=validate.Regexp(r"^pk_[0-9a-f]+_[A-Za-z0-9_-]+\Z"),
        metadata={"description": "`pk_<id>_<secret>`: send as `Authorization: Bearer <key>`."},
    )
    created_at = _time()


class ApiKeyList(Schema):
    api_keys = fields.List(fields.Nested(ApiKey), required=True)


class Share(Schema):
    """A read-only token for one task."""

    token = fields.String(
        required=True,
        validate=validate.Regexp(r"^st_[0-9a-f]+_[A-Za-z0-9_-]+\Z"),
        metadata={"description": "`st_<id>_<secret>`: a bearer token that reads one task."},
    )
    expires_at = _time()
    url = fields.String(
        required=True,
        metadata={"description": "The demo page's read-only view; the token in the fragment."},
    )


class Subscription(Schema):
    """One WebSocket subscription of the caller's history."""

    task_id = fields.String(required=True)
    connection_id = fields.String(required=True)
    subscribed_at = _time()
    unsubscribed_at = _time(allow_none=True)


class SubscriptionList(Schema):
    subscriptions = fields.List(fields.Nested(Subscription), required=True)


class Health(Schema):
    """The node's dependencies; 200 while it can serve, else 503."""

    status = fields.String(required=True, validate=validate.OneOf(["ok", "unavailable"]))
    store = fields.String(required=True, validate=validate.OneOf(["ok", "down"]))
    broker = fields.String(required=True, validate=validate.OneOf(["ok", "down"]))
    node = fields.String(required=True)


class ErrorDetail(Schema):
    code = fields.String(
        required=True,
        metadata={"description": "Stable and machine-readable; each answer lists its codes."},
    )
    message = fields.String(required=True, metadata={"description": "For people."})
    fields_ = fields.Dict(
        data_key="fields",
        required=True,
        metadata={"description": "Per-field messages (422), or details such as `quota`."},
    )


class Error(Schema):
    """Every HTTP error: `{"error": {"code", "message", "fields"}}`."""

    error = fields.Nested(ErrorDetail, required=True)


# -- Server-Sent Events (and WebSocket) messages -----------------------------------------


class EventMessage(Event):
    """An event on a stream: the event's fields and `"type": "event"`."""

    type = fields.String(required=True, validate=validate.OneOf(["event"]))


class SnapshotMessage(Schema):
    """The task as it is now; `recovered: false` when the asked-for history is gone."""

    type = fields.String(required=True, validate=validate.OneOf(["snapshot"]))
    task = fields.Nested(Task, required=True)
    recovered = fields.Boolean()
    id = fields.Raw(metadata={"description": "The request's id (WebSocket only)."})


class NoticeMessage(Schema):
    """A notice before the stream ends, e.g. `server_shutdown`."""

    type = fields.String(required=True, validate=validate.OneOf(["notice"]))
    code = fields.String(required=True)
    message = fields.String(required=True)
