"""GET /api/v1/openapi.json: the OpenAPI 3.1 document of the HTTP API.

Generated with apispec's marshmallow plugin from the request schemas (`schemas.py`) and
the answer schemas (`answer_schemas.py`); what is declared here is only what no schema
holds: each route's method, security, parameters and which answers it gives. The
document is built once per process and served as bytes. docs/protocol.md stays the
prose reference; tests/test_openapi.py checks every route of the router is described and
real answers of every route against this document.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable
from importlib import metadata
from typing import Any

import marshmallow
from aiohttp import web
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from .. import answer_schemas as answers
from .. import schemas
from ..idempotency import KEY_MAX
from .keys import openapi_key

routes = web.RouteTableDef()

PATH = "/api/v1/openapi.json"
OPENAPI_VERSION = "3.1.0"
#: Operation extension that marks a WebSocket handshake (not an HTTP API).
WEBSOCKET = "x-websocket"
_JSON = "application/json"
_PROTOCOL = "docs/protocol.md"

# -- security ----------------------------------------------------------------------------

_SCHEMES: dict[str, dict[str, Any]] = {
    "loginToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A login token from `POST /api/v1/auth/login` (HS256, 1 h, refreshable).",
    },
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "pk_<id>_<secret>",
        "description": "An API key from `POST /api/v1/api-keys`; acts as its owner within "
        "its scopes (`tasks:read`, `tasks:write`), listed per operation.",
    },
    "shareToken": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "st_<id>_<secret>",
        "description": "A share token from `POST /api/v1/tasks/{task_id}/share`: reads that "
        "one task (another task is 404, any other route 403 `insufficient_scope`).",
    },
    "queryToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "Any of the three tokens as `?token=`, on the WebSocket handshakes "
        "and the SSE stream only (browsers cannot set headers there). Never logged.",
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator's `--metrics-token` (not a user's token); "
        "/metrics is open when the server runs without one.",
    },
}

Security = list[dict[str, list[str]]]
_NONE: Security = []
_LOGIN: Security = [{"loginToken": []}]
_ME: Security = [{"loginToken": []}, {"apiKey": []}]
_READ: Security = [{"loginToken": []}, {"apiKey": ["tasks:read"]}]
_READ_TASK: Security = [*_READ, {"shareToken": []}]
_WRITE: Security = [{"loginToken": []}, {"apiKey": ["tasks:write"]}]
_STREAM: Security = [*_READ_TASK, {"queryToken": []}]
_METRICS: Security = [{}, {"metricsToken": []}]

# -- errors ------------------------------------------------------------------------------

_STATUS_TEXT = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    409: "Conflict",
    413: "Body too large",
    422: "Invalid request",
    429: "Too many requests; retry after `Retry-After` seconds",
    500: "Internal error (a bug; never a traceback)",
    503: "Unavailable; nothing was stored; retry after `Retry-After` seconds",
}
_RETRY_AFTER = {
    "description": "Whole seconds to wait before retrying (at least 1).",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]+$"},
}

Errors = dict[int, tuple[str, ...]]
_TOKEN = ("missing_token", "invalid_token", "token_expired")
#: Wrong API keys or share tokens spend the address's --auth-rate attempts.
_GUESSES = ("rate_limited",)
_STORE = ("unavailable",)
_WRITES = ("unavailable", "overloaded")
_BODY: Errors = {400: ("invalid_json",), 413: ("payload_too_large",)}


def _error(status: int, codes: Iterable[str]) -> dict[str, Any]:
    listed = ", ".join(f"`{c}`" for c in codes)
    response: dict[str, Any] = {
        "description": f"{_STATUS_TEXT[status]}: {listed}.",
        "content": {_JSON: {"schema": answers.Error}},
    }
    if status in (429, 503):
        response["headers"] = {"Retry-After": _RETRY_AFTER}
    return response


# -- parameters and bodies ---------------------------------------------------------------

_TASK_ID = {
    "in": "path",
    "name": "task_id",
    "required": True,
    "description": "The task's id; another user's task is 404 like one that does not exist.",
    "schema": {"type": "string"},
}
_KEY_ID = {"in": "path", "name": "key_id", "required": True, "schema": {"type": "string"}}
_IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "description": "Makes retries safe: the same key from the same user within 24 h gets the "
    "first answer again (with `Idempotent-Replayed: true`) and stores nothing; the same key "
    "with another request is 422 `idempotency_key_reused`.",
    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX, "pattern": "^[ -~]+$"},
}
_LAST_EVENT_ID = {
    "in": "header",
    "name": "Last-Event-ID",
    "required": False,
    "description": "Resume after this seq (what EventSource sends when it reconnects); wins "
    "over `?last_seq`. Not a seq: 400.",
    "schema": {"type": "string", "pattern": r"^\s*([0-9]{1,18}\s*)?$"},
}
_REPLAYED = {
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an `Idempotency-Key` seen before.",
        "schema": {"type": "string", "enum": ["true"]},
    }
}


def _json_body(schema: Any, *, required: bool = True, description: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"required": required, "content": {_JSON: {"schema": schema}}}
    if description:
        body["description"] = description
    return body


def _query(schema: type[marshmallow.Schema]) -> dict[str, Any]:
    """Query parameters, one per field of `schema` (the plugin expands it)."""
    return {"in": "query", "schema": schema}


def _answer(
    description: str,
    schema: Any = None,
    *,
    media: str = _JSON,
    headers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description}
    if schema is not None:
        response["content"] = {media: {"schema": schema}}
    if headers:
        response["headers"] = headers
    return response


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    *,
    security: Security,
    success: dict[int, dict[str, Any]],
    errors: Errors,
    body: dict[str, Any] | None = None,
    parameters: Iterable[dict[str, Any]] = (),
    description: str = "",
    idempotent: bool = False,
) -> dict[str, Any]:
    """One operation; every one may also answer 500 (a bug, in the same error shape)."""
    params = list(parameters)
    responses = {str(status): dict(answer) for status, answer in success.items()}
    if idempotent:
        params.append(_IDEMPOTENCY_KEY)
        for status, answer in success.items():
            if status < 300:
                responses[str(status)]["headers"] = {**answer.get("headers", {}), **_REPLAYED}
    for status, codes in sorted({**errors, 500: ("internal",)}.items()):
        responses[str(status)] = _error(status, codes)
    operation: dict[str, Any] = {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "security": security,
        "responses": responses,
    }
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body is not None:
        operation["requestBody"] = body
    return operation


def _auth_errors() -> Errors:
    """401 for a bad token; 403 when a key or share token may not call the route; 429 when
    the address sent too many wrong keys (checked before the route's own rules)."""
    return {401: _TOKEN, 403: ("insufficient_scope",), 429: _GUESSES}


# -- the routes --------------------------------------------------------------------------


def _account_paths() -> dict[str, dict[str, Any]]:
    token = _answer("A login token.", answers.Token)
    return {
        "/api/v1/auth/register": {
            "post": _operation(
                "register",
                "auth",
                "Create an account",
                security=_NONE,
                body=_json_body(schemas.Register),
                success={201: _answer("The new user.", answers.User)},
                errors={
                    **_BODY,
                    403: ("registration_closed",),
                    409: ("username_taken",),
                    422: ("validation_error",),
                    429: ("rate_limited",),
                    503: ("overloaded", "unavailable"),
                },
                description="Open to anyone unless `--registration closed`; at most 4 KiB of "
                "body and `--auth-rate` attempts per address and minute.",
            )
        },
        "/api/v1/auth/login": {
            "post": _operation(
                "login",
                "auth",
                "Log in for a token",
                security=_NONE,
                body={
                    "required": True,
                    "content": {
                        _JSON: {"schema": schemas.Credentials},
                        "application/x-www-form-urlencoded": {"schema": schemas.LoginForm},
                    },
                    "description": "JSON, or an OAuth2 password-grant form.",
                },
                success={200: token},
                errors={
                    400: ("invalid_json", "bad_request"),
                    401: ("invalid_credentials",),
                    413: ("payload_too_large",),
                    422: ("validation_error",),
                    429: ("rate_limited", "login_throttled"),
                    503: ("overloaded", "unavailable"),
                },
                description="Starts a session (`--session-max-age`); 5 wrong passwords in a "
                "row for a username make each further attempt wait.",
            )
        },
        "/api/v1/auth/refresh": {
            "post": _operation(
                "refresh",
                "auth",
                "A fresh token for the same session",
                security=_LOGIN,
                success={200: token},
                errors={
                    401: (*_TOKEN, "session_expired"),
                    403: ("insufficient_scope",),
                    413: ("payload_too_large",),
                    503: _STORE,
                },
                description="Any body is ignored. Once the session is over: 401 "
                "`session_expired`; an expired token cannot be refreshed.",
            )
        },
        "/api/v1/auth/me": {
            "get": _operation(
                "me",
                "auth",
                "The user a token or API key acts for",
                security=_ME,
                success={200: _answer("The user.", answers.User)},
                errors={**_auth_errors(), 503: _STORE},
            )
        },
        "/api/v1/auth/logout": {
            "post": _operation(
                "logout",
                "auth",
                "End the token's session (or every session)",
                security=_LOGIN,
                parameters=[_query(schemas.LogoutQuery)],
                success={204: _answer("The session (or every session of the user) ended.")},
                errors={
                    **_auth_errors(),
                    413: ("payload_too_large",),
                    422: ("validation_error",),
                    503: _STORE,
                },
            )
        },
        "/api/v1/auth/password": {
            "post": _operation(
                "change_password",
                "auth",
                "Change the password; ends every session",
                security=_LOGIN,
                body=_json_body(schemas.ChangePassword),
                success={204: _answer("Changed; every session ended: log in again.")},
                errors={
                    **_BODY,
                    401: (*_TOKEN, "invalid_credentials"),
                    403: ("insufficient_scope",),
                    422: ("validation_error",),
                    429: ("rate_limited", "login_throttled"),
                    503: ("overloaded", "unavailable"),
                },
            )
        },
    }


_CREATE_ERRORS: Errors = {
    **_BODY,
    **_auth_errors(),
    404: ("not_found",),
    409: ("parent_finished",),
    422: ("validation_error", "idempotency_key_reused"),
    429: ("rate_limited", "quota_exceeded"),
    503: _WRITES,
}
_CHANGE_ERRORS: Errors = {
    **_BODY,
    **_auth_errors(),
    404: ("not_found",),
    409: ("task_finished",),
    422: ("validation_error", "idempotency_key_reused"),
    503: _WRITES,
}


def _task_paths() -> dict[str, dict[str, Any]]:
    task = _answer("The task.", answers.Task)
    seq = _answer("Stored: the seq of the last event.", answers.Seq)
    read_errors: Errors = {**_auth_errors(), 404: ("not_found",), 503: _STORE}
    return {
        "/api/v1/tasks": {
            "post": _operation(
                "create_task",
                "tasks",
                "Create a task",
                security=_WRITE,
                body=_json_body(schemas.CreateTask),
                success={201: _answer("The new task (status `pending`, seq 1).", answers.Task)},
                errors=_CREATE_ERRORS,
                idempotent=True,
                description="Kind `stock_analysis` runs the built-in job (`params` is "
                "`{code}`); any other kind is an external task its owner drives.",
            ),
            "get": _operation(
                "list_tasks",
                "tasks",
                "The caller's tasks, newest first",
                security=_READ,
                parameters=[_query(schemas.ListTasksQuery)],
                success={200: _answer("A page of tasks.", answers.TaskPage)},
                errors={**_auth_errors(), 422: ("validation_error",), 503: _STORE},
            ),
        },
        "/api/v1/stock/analyze": {
            "post": _operation(
                "analyze_stock",
                "tasks",
                "Start the built-in stock analysis",
                security=_WRITE,
                body=_json_body(schemas.AnalyzeStock),
                success={
                    201: _answer(
                        "The new task: kind `stock_analysis` for `{code}`; for `{codes}` a"
                        " parent of kind `stock_analysis_batch` with a child analysis per"
                        " code, which completes by itself with the codes ranked by score.",
                        answers.Task,
                    )
                },
                errors=_CREATE_ERRORS,
                idempotent=True,
            )
        },
        "/api/v1/tasks/{task_id}": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "get_task",
                "tasks",
                "One task",
                security=_READ_TASK,
                success={200: task},
                errors=read_errors,
            ),
        },
        "/api/v1/tasks/{task_id}/children": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "list_children",
                "tasks",
                "A task's children, oldest first",
                security=_READ_TASK,
                parameters=[_query(schemas.ListChildrenQuery)],
                success={200: _answer("A page of child tasks.", answers.TaskPage)},
                errors={**read_errors, 422: ("validation_error",)},
            ),
        },
        "/api/v1/tasks/{task_id}/events": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "list_events",
                "tasks",
                "A task's events after a seq, in seq order",
                security=_READ_TASK,
                parameters=[_query(schemas.ListEventsQuery)],
                success={200: _answer("A page of events.", answers.EventPage)},
                errors={**read_errors, 422: ("validation_error",)},
                description="Old history may be trimmed: the page then starts at the oldest "
                "event kept (compare its first seq with `after_seq + 1`).",
            ),
        },
        "/api/v1/tasks/{task_id}/progress": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "report_progress",
                "tasks",
                "Report progress: one update or a batch",
                security=_WRITE,
                body=_json_body(
                    {"oneOf": [schemas.ReportProgress, schemas.ReportProgressBatch]},
                    description="One update, or up to 100 stored all or none as consecutive seqs.",
                ),
                success={
                    200: _answer(
                        "Stored: `{seq}`, or `{seq, first_seq}` for a batch.",
                        {"oneOf": [answers.Seq, answers.BatchSeq]},
                    )
                },
                errors={
                    **_CHANGE_ERRORS,
                    409: ("task_finished", "progress_from_children"),
                    429: ("rate_limited", "quota_exceeded"),
                },
                idempotent=True,
            ),
        },
        "/api/v1/tasks/{task_id}/complete": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "complete_task",
                "tasks",
                "Complete a task (progress becomes 100)",
                security=_WRITE,
                body=_json_body(schemas.CompleteTask, required=False),
                success={200: seq},
                errors=_CHANGE_ERRORS,
                idempotent=True,
            ),
        },
        "/api/v1/tasks/{task_id}/fail": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "fail_task",
                "tasks",
                "Fail a task",
                security=_WRITE,
                body=_json_body(schemas.FailTask),
                success={200: seq},
                errors=_CHANGE_ERRORS,
                idempotent=True,
            ),
        },
        "/api/v1/tasks/{task_id}/cancel": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "cancel_task",
                "tasks",
                "Cancel a task",
                security=_WRITE,
                body=_json_body(schemas.Empty, required=False, description="Empty, or `{}`."),
                success={200: seq},
                errors=_CHANGE_ERRORS,
                idempotent=True,
            ),
        },
        "/api/v1/subscriptions": {
            "get": _operation(
                "list_subscriptions",
                "tasks",
                "The caller's WebSocket subscription history, newest first",
                security=_READ,
                parameters=[_query(schemas.ListSubscriptionsQuery)],
                success={200: _answer("The subscriptions.", answers.SubscriptionList)},
                errors={**_auth_errors(), 422: ("validation_error",), 503: _STORE},
            )
        },
    }


def _grant_paths() -> dict[str, dict[str, Any]]:
    return {
        "/api/v1/api-keys": {
            "post": _operation(
                "create_api_key",
                "api-keys",
                "Make an API key (shown once)",
                security=_LOGIN,
                body=_json_body(schemas.CreateApiKey),
                success={201: _answer("The key, with its secret this once.", answers.NewApiKey)},
                errors={
                    **_BODY,
                    **_auth_errors(),
                    422: ("validation_error",),
                    429: ("rate_limited", "quota_exceeded"),
                    503: _STORE,
                },
            ),
            "get": _operation(
                "list_api_keys",
                "api-keys",
                "The caller's live API keys, oldest first",
                security=_LOGIN,
                success={200: _answer("The keys, without secrets.", answers.ApiKeyList)},
                errors={**_auth_errors(), 503: _STORE},
            ),
        },
        "/api/v1/api-keys/{key_id}": {
            "parameters": [_KEY_ID],
            "delete": _operation(
                "revoke_api_key",
                "api-keys",
                "Revoke an API key at once",
                security=_LOGIN,
                success={204: _answer("Revoked; its sockets and streams close with 4401.")},
                errors={**_auth_errors(), 404: ("not_found",), 503: _STORE},
            ),
        },
        "/api/v1/tasks/{task_id}/share": {
            "parameters": [_TASK_ID],
            "post": _operation(
                "share_task",
                "shares",
                "Make a read-only share token for the task",
                security=_WRITE,
                body=_json_body(schemas.ShareTask, required=False),
                success={201: _answer("The token and the demo page's link.", answers.Share)},
                errors={
                    **_BODY,
                    **_auth_errors(),
                    404: ("not_found",),
                    422: ("validation_error",),
                    429: ("rate_limited", "quota_exceeded"),
                    503: _STORE,
                },
            ),
            "delete": _operation(
                "revoke_shares",
                "shares",
                "End every share token of the task",
                security=_WRITE,
                success={204: _answer("Ended; their sockets and streams close with 4401.")},
                errors={**_auth_errors(), 404: ("not_found",), 503: _STORE},
            ),
        },
    }


_HANDSHAKE_ERRORS: Errors = {
    400: ("bad_request",),
    401: _TOKEN,
    403: ("origin_not_allowed", "insufficient_scope"),
    429: ("too_many_connections", "rate_limited"),
    503: ("overloaded", "server_full", "unavailable"),
}


def _stream_paths() -> dict[str, dict[str, Any]]:
    sse = f"{_PROTOCOL}#server-sent-events"
    websocket = f"{_PROTOCOL}#websocket"
    return {
        "/api/v1/tasks/{task_id}/stream": {
            "parameters": [_TASK_ID],
            "get": _operation(
                "stream_task",
                "streams",
                "One task's events as Server-Sent Events",
                security=_STREAM,
                parameters=[_LAST_EVENT_ID, _query(schemas.StreamQuery)],
                success={
                    200: _answer(
                        "`text/event-stream`: `retry:`, then `id: <seq>`, `event: <snapshot|"
                        "created|started|progress|completed|failed|cancelled|notice>`, `data:` "
                        "a SnapshotMessage, EventMessage or NoticeMessage as JSON; a "
                        "`: keepalive` comment every 15 s; ends after the task's terminal "
                        f"event. See {sse}.",
                        {"type": "string"},
                        media="text/event-stream",
                    ),
                    204: _answer(
                        "The task is finished and the position is at or after its last "
                        "event: nothing will follow (EventSource stops)."
                    ),
                },
                errors={
                    **_HANDSHAKE_ERRORS,
                    403: ("insufficient_scope",),
                    404: ("not_found",),
                    422: ("validation_error",),
                },
                description="Without a position: a snapshot first. With `Last-Event-ID` or "
                "`?last_seq`: every event after it (or a `recovered: false` snapshot), "
                "then live events, each seq once and in order.",
            ),
        },
        "/api/v1/ws": {
            "get": _websocket(
                "multi_task_socket",
                "WebSocket: one socket, many subscriptions",
                errors=_HANDSHAKE_ERRORS,
                protocol=websocket,
            )
        },
        "/api/v1/stock/ws/analyze/{task_id}": {
            "parameters": [_TASK_ID],
            "get": _websocket(
                "task_socket",
                "WebSocket: subscribed to one task on open",
                errors={**_HANDSHAKE_ERRORS, 404: ("not_found",)},
                protocol=websocket,
                parameters=[_query(schemas.WsQuery)],
            ),
        },
    }


def _websocket(
    operation_id: str,
    summary: str,
    *,
    errors: Errors,
    protocol: str,
    parameters: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """A WebSocket handshake: not an HTTP API; its messages are in docs/protocol.md."""
    operation = _operation(
        operation_id,
        "streams",
        summary,
        security=_STREAM,
        parameters=parameters,
        success={101: _answer(f"Switching Protocols: the socket is open. Messages: {protocol}.")},
        errors=errors,
        description=f"A WebSocket upgrade (`Upgrade: websocket`), not an HTTP API: {protocol} "
        "describes its messages, replay and close codes. Refusals are plain HTTP answers.",
    )
    operation[WEBSOCKET] = True
    return operation


def _service_paths() -> dict[str, dict[str, Any]]:
    return {
        PATH: {
            "get": _operation(
                "openapi",
                "service",
                "This document",
                security=_NONE,
                success={200: _answer("The OpenAPI 3.1 document.", {"type": "object"})},
                errors={},
            )
        },
        "/healthz": {
            "get": _operation(
                "healthz",
                "service",
                "The node's health (for load balancers)",
                security=_NONE,
                success={
                    200: _answer("The node can serve (its store answers).", answers.Health),
                    503: _answer("The store is down: send traffic elsewhere.", answers.Health),
                },
                errors={},
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "service",
                "Prometheus metrics",
                security=_METRICS,
                success={
                    200: _answer(
                        "Prometheus text format 0.0.4.", {"type": "string"}, media="text/plain"
                    )
                },
                errors={401: ("invalid_token",)},
            )
        },
    }


# -- the document ------------------------------------------------------------------------


def _patterns(
    converter: Any, field: marshmallow.fields.Field, ret: dict[str, Any], **kwargs: Any
) -> dict[str, Any]:
    """A field converter step (apispec binds it as a method).

    Python regexes in ECMA-262 form, JSON Schema's dialect (`\\Z` is `$` there); no
    `default: null` (a query's "not given" is no value of the parameter's type); and the
    byte budget of a WireString.
    """
    if "pattern" in ret:
        ret["pattern"] = ret["pattern"].replace(r"\Z", "$")
    if "default" in ret and ret["default"] is None:
        del ret["default"]
    max_bytes = getattr(field, "max_bytes", None)
    if isinstance(field, schemas.WireString) and max_bytes is not None:
        # JSON Schema counts code points; the server counts UTF-8 bytes of the JSON text.
        ret["x-maxBytes"] = max_bytes
        ret.setdefault("description", f"At most {max_bytes} bytes as JSON text (UTF-8).")
    return {}


def _answer_schemas() -> list[tuple[str, type[marshmallow.Schema]]]:
    return [
        (name, value)
        for name, value in vars(answers).items()
        if isinstance(value, type)
        and issubclass(value, marshmallow.Schema)
        and value.__module__ == answers.__name__
    ]


def _version() -> str:
    try:
        return metadata.version("progress-server")
    except metadata.PackageNotFoundError:  # run from a checkout that was not installed
        return "0.0.0"


def build_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of every HTTP route (and the WebSocket handshakes)."""
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Task-progress server",
        version=_version(),
        openapi_version=OPENAPI_VERSION,
        plugins=[plugin],
        info={
            "description": "Workers report task progress over HTTP; browsers and scripts "
            "watch over WebSocket or Server-Sent Events with exact replay by per-task `seq`. "
            f"{_PROTOCOL} is the reference for every answer, status and error code; every "
            'error is `{"error": {"code", "message", "fields"}}`. Besides the answers listed, '
            "any request may get 404 `not_found` (no such route), 405 `method_not_allowed`, "
            "408 `request_timeout` (a body slower than `--header-timeout`) and, before it is "
            "read, 503 `server_full` (`--max-http-connections`).",
        },
    )
    assert plugin.converter is not None
    plugin.converter.add_attribute_function(_patterns)
    for name, scheme in _SCHEMES.items():
        spec.components.security_scheme(name, scheme)
    # Answers first, by name, so the SDK and docs can name them; requests join as the
    # operations reference them.
    for name, schema in _answer_schemas():
        if name not in spec.components.schemas:
            spec.components.schema(name, schema=schema)
    paths = {**_account_paths(), **_task_paths(), **_grant_paths(), **_stream_paths()}
    for path, item in {**paths, **_service_paths()}.items():
        # apispec rewrites what it is given in place: hand it copies of the shared parts.
        operations = copy.deepcopy(item)
        parameters = operations.pop("parameters", None)
        spec.path(path=path, operations=operations, parameters=parameters)
    document = spec.to_dict()
    _untyped_absence(document)
    return document


def _untyped_absence(document: dict[str, Any]) -> None:
    """A query parameter that loads as None when absent has no null value on the wire:
    drop the "null" the plugin adds to its type."""
    for item in document["paths"].values():
        operations = [o for o in item.values() if isinstance(o, dict)]
        for operation in operations:
            for parameter in operation.get("parameters", ()):
                schema = parameter.get("schema", {})
                if isinstance(schema.get("type"), list) and "null" in schema["type"]:
                    kept = [t for t in schema["type"] if t != "null"]
                    schema["type"] = kept[0] if len(kept) == 1 else kept


@functools.cache
def encoded_document() -> bytes:
    """The document as JSON bytes, built once per process."""
    return json.dumps(build_document(), ensure_ascii=False, separators=(",", ":")).encode()


@routes.get(PATH)
async def openapi_document(request: web.Request) -> web.Response:
    """The OpenAPI document (no authentication)."""
    return web.Response(body=request.app[openapi_key], content_type=_JSON)
