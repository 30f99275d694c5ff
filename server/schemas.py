"""Marshmallow schemas for every request body, query string and client WebSocket message."""

from __future__ import annotations

import re
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from . import budget
from .models import TaskStatus

#: \Z, not $: "$" also matches before a trailing newline ("alice\n" would pass).
USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,32}\Z")
#: A 6-digit A-share code, or a ticker of 1-10 letters and dots with at least one letter.
STOCK_CODE = re.compile(r"^(?:[0-9]{6}|(?=[A-Za-z.]*[A-Za-z])[A-Za-z.]{1,10})\Z")
STOCK_ANALYSIS = "stock_analysis"
#: A task list's continuation: "<created_at>~<rowid>".
TASK_CURSOR = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]{1,20}Z~[0-9]{1,18}\Z")


class StrictInt(fields.Integer):
    """An integer that must be a JSON integer: no "5", no 5.5, no true."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class Number(fields.Float):
    """A JSON number (not a string, not a boolean), returned as int when it is whole."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.make_error("invalid")
        number = super()._deserialize(value, attr, data, **kwargs)
        return int(number) if number == int(number) else number


class Text(fields.String):
    """A string that every store can keep: no NUL character (PostgreSQL's text refuses it)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        if "\x00" in text:
            raise ValidationError("Not valid text: a NUL character (\\u0000).")
        return text


class WireString(Text):
    """A string bounded in bytes of its wire form (JSON-escaped UTF-8), not code points."""

    def __init__(self, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> str:
        text = super()._deserialize(value, attr, data, **kwargs)
        try:
            size = budget.wire_bytes(text)
        except UnicodeEncodeError:
            raise ValidationError("Not valid text: an unpaired surrogate.") from None
        if size > self.max_bytes:
            raise ValidationError(f"At most {self.max_bytes} bytes as JSON text (UTF-8).")
        return text


class Credentials(Schema):
    username = fields.String(required=True)
    password = fields.String(required=True)


#: A new password (register, password change).
NEW_PASSWORD = validate.Length(min=8, max=1024)


class Register(Credentials):
    username = fields.String(
        required=True,
        validate=validate.Regexp(USERNAME, error="3-32 characters of A-Z, a-z, 0-9, _ . -"),
    )
    password = fields.String(required=True, validate=NEW_PASSWORD)


class ChangePassword(Schema):
    current_password = fields.String(required=True)
    new_password = fields.String(required=True, validate=NEW_PASSWORD)


class LogoutQuery(Schema):
    """`?all=true` ends every session of the user, not only the token's."""

    all = fields.Boolean(load_default=False)


class LoginForm(Credentials):
    """OAuth2 password grant form: extra fields (grant_type, scope, client_id) are ignored."""

    class Meta:
        unknown = EXCLUDE

    grant_type = fields.String(validate=validate.Equal("password"))


class StockParams(Schema):
    code = fields.String(
        required=True,
        validate=validate.Regexp(STOCK_CODE, error="a 6-digit code or a ticker of 1-10 letters"),
    )


#: Most codes in one multi-code analysis.
MAX_CODES = 20
#: A parent's kind for a multi-code analysis (its children are `stock_analysis` tasks).
STOCK_ANALYSIS_BATCH = "stock_analysis_batch"


class StrictBool(fields.Boolean):
    """A JSON boolean only: no "true", no 1."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(truthy={True}, falsy={False}, **kwargs)


class Placement(Schema):
    """Where a new task goes in a tree: under `parent_id` (same owner, unfinished), counting
    `weight` in its parent's progress."""

    parent_id = WireString(64, load_default=None, allow_none=True)
    weight = Number(
        validate=validate.Range(min=0, min_inclusive=False, max=1_000_000), load_default=1
    )


class CreateTask(Placement):
    kind = fields.String(
        required=True,
        validate=validate.Regexp(r"^[A-Za-z0-9_.:-]{1,64}\Z", error="1-64 of A-Z a-z 0-9 _ . : -"),
    )
    #: Checked against the byte and depth budget by the handler (budget.compact).
    params = fields.Dict(keys=fields.String(), load_default=dict)
    #: Finish by itself when its children have (completed if all did), and on the first
    #: failed child too with `fail_fast`.
    auto_finish = StrictBool(load_default=False)
    fail_fast = StrictBool(load_default=False)

    @validates_schema
    def _fail_fast_needs_auto_finish(self, data: dict[str, Any], **kwargs: Any) -> None:
        if data.get("fail_fast") and not data.get("auto_finish"):
            raise ValidationError("Only with auto_finish.", field_name="fail_fast")


class AnalyzeStock(Placement):
    """`{code}`: one analysis; `{codes: [...]}`: a parent with a child analysis per code."""

    code = fields.String(
        validate=validate.Regexp(STOCK_CODE, error="a 6-digit code or a ticker of 1-10 letters"),
    )
    codes = fields.List(
        fields.String(
            validate=validate.Regexp(STOCK_CODE, error="a 6-digit code or a ticker of 1-10 letters")
        ),
        validate=validate.Length(min=1, max=MAX_CODES),
    )

    @validates_schema
    def _code_or_codes(self, data: dict[str, Any], **kwargs: Any) -> None:
        if ("code" in data) == ("codes" in data):
            raise ValidationError("Give either code or codes.", field_name="code")
        codes = [c.upper() for c in data.get("codes", ())]
        if len(set(codes)) != len(codes):
            raise ValidationError("Each code once.", field_name="codes")


class ListChildrenQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = fields.Integer(validate=validate.Range(min=1, max=1000), load_default=100)
    #: `next_cursor` of the previous page (opaque to clients).
    cursor = fields.String(
        load_default=None,
        validate=validate.Regexp(TASK_CURSOR, error="not a cursor from a previous page"),
    )


class ReportProgress(Schema):
    progress = Number(required=True, validate=validate.Range(min=0, max=100))
    step = WireString(budget.MAX_STEP_BYTES, allow_none=True)
    #: Up to --max-json-bytes: workers may send a log excerpt (checked by the handler).
    message = Text(allow_none=True)


_PROGRESS_FIELDS = frozenset({"progress", "step", "message"})


def plain_progress(data: dict[str, Any]) -> dict[str, Any] | None:
    """What `ReportProgress().load(data)` returns, for an update with nothing unusual in it.

    A progress post is the one body workers send many times a second, and marshmallow's
    load took 13.5 us of it (0.4 us this way). This checks the common shape directly
    (a number 0-100; step and message strings or null, no NUL, no unpaired surrogate, the
    step within its byte limit) and returns None for anything else: the schema then
    decides and words the errors. tests/test_plain_bodies.py holds the two to one
    answer on every input it tries.
    """
    if not _PROGRESS_FIELDS.issuperset(data):
        return None
    progress = data.get("progress")
    kind = type(progress)
    if (kind is not int and kind is not float) or not 0 <= progress <= 100:
        return None
    if kind is float and progress.is_integer():
        progress = int(progress)
    loaded: dict[str, Any] = {"progress": progress}
    for name in ("step", "message"):
        if name not in data:
            continue
        text = data[name]
        if text is not None:
            if type(text) is not str or "\x00" in text:
                return None
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    return None
            if name == "step" and budget.wire_bytes(text) > budget.MAX_STEP_BYTES:
                return None
        loaded[name] = text
    return loaded


#: Most updates in one batch progress post.
MAX_BATCH_UPDATES = 100


class ReportProgressBatch(Schema):
    """`{"updates": [...]}`: consecutive progress updates, stored all or none."""

    updates = fields.List(
        fields.Nested(ReportProgress),
        required=True,
        validate=validate.Length(min=1, max=MAX_BATCH_UPDATES),
    )


class CreateApiKey(Schema):
    name = WireString(100, required=True, validate=validate.Length(min=1))
    scopes = fields.List(
        fields.String(validate=validate.OneOf(["tasks:read", "tasks:write"])),
        required=True,
        validate=validate.Length(min=1, max=2),
    )


class ShareTask(Schema):
    #: Seconds the token lasts: default a day, at most 30 days.
    ttl_s = Number(validate=validate.Range(min=1, max=30 * 24 * 3600), load_default=24 * 3600)


class StreamQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    last_seq = fields.Integer(validate=validate.Range(min=0), load_default=None)


class CompleteTask(Schema):
    result = fields.Dict(keys=fields.String(), allow_none=True, load_default=None)


class FailTask(Schema):
    error = WireString(budget.MAX_ERROR_BYTES, required=True, validate=validate.Length(min=1))


class Empty(Schema):
    """A body that must be empty or {}."""


class ListTasksQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    status = fields.String(
        validate=validate.OneOf(["active", "any"] + [s.value for s in TaskStatus]),
        load_default="any",
    )
    limit = fields.Integer(validate=validate.Range(min=1, max=500), load_default=100)
    #: `next_cursor` of the previous page (opaque to clients).
    cursor = fields.String(
        load_default=None,
        validate=validate.Regexp(TASK_CURSOR, error="not a cursor this server gave out"),
    )
    #: Only tasks with no parent (a multi-code analysis is then listed once, not per code).
    root = fields.Boolean(load_default=False)


class ListEventsQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    # Capped at SQLite's INTEGER range: a bigger value would fail to bind (a 500, not a 422).
    after_seq = fields.Integer(validate=validate.Range(min=0, max=2**63 - 1), load_default=0)
    limit = fields.Integer(validate=validate.Range(min=1, max=1000), load_default=1000)


class ListSubscriptionsQuery(Schema):
    class Meta:
        unknown = EXCLUDE

    limit = fields.Integer(validate=validate.Range(min=1, max=500), load_default=50)


#: The client actions whose messages `plain_client_message` reads, and their task_id rule:
#: required, optional (None when absent or null), or not a field of the action.
_PLAIN_TASK_ID = {
    "ping": None,
    "subscribe": "required",
    "unsubscribe": "required",
    "get_status": "optional",
}


def plain_client_message(raw: dict[str, Any]) -> dict[str, Any] | None:
    """What the action's schema (WsPing, WsSubscribe, ...) loads from `raw`, for a message
    with nothing unusual in it; None for anything else (the schemas then decide and word
    the errors).

    Every WebSocket client sends these, subscribes above all: without the two marshmallow
    loads per message a handshake costs the event loop 7 % less CPU (benchmarks B4).
    tests/test_plain_bodies.py holds this to the schemas' answer on every input it tries.
    """
    action = raw.get("action")
    if type(action) is not str or action not in _PLAIN_TASK_ID:
        return None
    rule = _PLAIN_TASK_ID[action]
    loaded: dict[str, Any] = {"action": action}
    if "id" in raw:
        loaded["id"] = raw["id"]
    if rule is None:
        return loaded
    task_id = raw.get("task_id")
    if task_id is None and rule == "optional":
        loaded["task_id"] = None
    elif type(task_id) is str and 1 <= len(task_id) <= 64:
        loaded["task_id"] = task_id
    else:
        return None
    if action == "subscribe":
        last_seq = raw.get("last_seq")
        if last_seq is not None and (type(last_seq) is not int or last_seq < 0):
            return None
        loaded["last_seq"] = last_seq
    return loaded


class WsQuery(Schema):
    """Query of the per-task WebSocket endpoint (token is read separately)."""

    class Meta:
        unknown = EXCLUDE

    last_seq = fields.Integer(validate=validate.Range(min=0), load_default=None)


# -- WebSocket client messages -----------------------------------------------------------

MessageId = fields.Raw(allow_none=True)


class WsEnvelope(Schema):
    """Only checks that there is an action; the action's own schema checks the rest."""

    class Meta:
        unknown = EXCLUDE

    action = fields.String(required=True)


class WsPing(Schema):
    """Fields a message does not use are ignored, so newer clients work with this server."""

    class Meta:
        unknown = EXCLUDE

    action = fields.String(required=True)
    id = fields.Raw(allow_none=True)


class WsSubscribe(WsPing):
    task_id = fields.String(required=True, validate=validate.Length(min=1, max=64))
    last_seq = StrictInt(allow_none=True, load_default=None, validate=validate.Range(min=0))


class WsUnsubscribe(WsPing):
    task_id = fields.String(required=True, validate=validate.Length(min=1, max=64))


class WsGetStatus(WsPing):
    task_id = fields.String(load_default=None, validate=validate.Length(min=1, max=64))
