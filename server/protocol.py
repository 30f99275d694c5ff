"""The WebSocket wire format: parsing client messages and building server messages. Pure.

docs/protocol.md is the reference; names here follow it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from marshmallow import Schema, ValidationError

from . import schemas
from .models import Event, Task, dumps, splice

# Close codes (RFC 6455 and the 4000-4999 private range), see docs/protocol.md.
CLOSE_GOING_AWAY = 1001  # server shutdown: reconnect and resume
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008  # flooding and other abuse: do not reconnect
CLOSE_TOO_BIG = 1009  # frame over the size limit: do not reconnect
CLOSE_SLOW_CONSUMER = 4008  # fell too far behind: reconnect and resume with last_seq
CLOSE_TOKEN_EXPIRED = 4401  # get a fresh token, reconnect
CLOSE_FORBIDDEN = 4403  # do not reconnect

ACTIONS: dict[str, type[Schema]] = {
    "ping": schemas.WsPing,
    "subscribe": schemas.WsSubscribe,
    "unsubscribe": schemas.WsUnsubscribe,
    "get_status": schemas.WsGetStatus,
}
_SCHEMAS = {name: cls() for name, cls in ACTIONS.items()}
_ENVELOPE = schemas.WsEnvelope()


class ProtocolError(Exception):
    """A client message that cannot be acted on; answered with an error message."""

    def __init__(
        self, code: str, message: str, *, msg_id: Any = None, fields: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.msg_id = msg_id
        self.fields = fields


@dataclass(frozen=True, slots=True)
class ClientMessage:
    action: str
    data: dict[str, Any]
    #: The message's "id" if it is a string or a number, else None; echoed in the reply.
    msg_id: Any = None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_client_message(text: str) -> ClientMessage:
    """Decode and validate one text frame.

    Raises:
        ProtocolError: code "bad_request" for bad JSON, a non-object, an unknown action,
            or a missing or wrongly typed field.
    """
    try:
        # Standard JSON only: NaN/Infinity would be echoed back (in "id") as text that no
        # browser parses, and "\ud800" escapes decode to lone surrogates that SQLite's UTF-8
        # refuses. RecursionError: nesting deeper than the parser's stack.
        raw = json.loads(text, parse_constant=_refuse_constant)
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        raise ProtocolError("bad_request", "message is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError("bad_request", "message must be a JSON object")
    msg_id = raw.get("id")
    if not isinstance(msg_id, str | int | float | type(None)) or isinstance(msg_id, bool):
        msg_id = None  # only scalars are echoed: a client matches replies by equality
    plain = schemas.plain_client_message(raw)
    if plain is not None:
        return ClientMessage(action=plain["action"], data=plain, msg_id=msg_id)
    try:
        action = _ENVELOPE.load(raw)["action"]
    except ValidationError as exc:
        raise ProtocolError(
            "bad_request", "missing or invalid action", msg_id=msg_id, fields=exc.messages_dict
        ) from None
    schema = _SCHEMAS.get(action)
    if schema is None:
        raise ProtocolError("bad_request", f"unknown action {action!r}", msg_id=msg_id)
    try:
        data = schema.load(raw)
    except ValidationError as exc:
        raise ProtocolError(
            "bad_request", "invalid message", msg_id=msg_id, fields=exc.messages_dict
        ) from None
    return ClientMessage(action=action, data=data, msg_id=msg_id)


def peek_id(text: str) -> Any:
    """The "id" of a text frame that will not be acted on (e.g. rate-limited), or None.

    Best effort, for the error reply only: the same rules as `parse_client_message`.
    """
    try:
        raw = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        return None
    msg_id = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(msg_id, str | int | float) or isinstance(msg_id, bool):
        return None
    if isinstance(msg_id, str):
        try:
            msg_id.encode("utf-8")  # a lone surrogate would not survive the echo
        except UnicodeEncodeError:
            return None
    return msg_id


def _dump(message: dict[str, Any]) -> str:
    # Non-ASCII as UTF-8, as everywhere on the wire: the byte budget (budget.py) counts it so.
    return dumps(message)


def _with_id(message: dict[str, Any], msg_id: Any) -> dict[str, Any]:
    if msg_id is not None:
        message["id"] = msg_id
    return message


def event_message(event: Event) -> str:
    """A live or replayed event; built once per event and shared by all subscribers."""
    return event.to_json(type="event")


def snapshot_message(task: Task, msg_id: Any = None, recovered: bool | None = None) -> str:
    head: dict[str, Any] = {"type": "snapshot"}
    if recovered is not None:
        head["recovered"] = recovered
    return splice(_with_id(head, msg_id), {"task": task.to_json()})


def pong_message(msg_id: Any = None) -> str:
    return _dump(_with_id({"type": "pong"}, msg_id))


def unsubscribed_message(task_id: str, msg_id: Any = None) -> str:
    return _dump(_with_id({"type": "unsubscribed", "task_id": task_id}, msg_id))


def error_message(
    code: str, message: str, msg_id: Any = None, fields: dict[str, Any] | None = None
) -> str:
    body: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if fields:
        body["fields"] = fields
    return _dump(_with_id(body, msg_id))


def notice_message(code: str, message: str) -> str:
    return _dump({"type": "notice", "code": code, "message": message})
