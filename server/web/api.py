"""HTTP handlers under /api/v1 (accounts: account.py): each parses, calls one service, and
serialises."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError

from .. import schemas
from ..auth import Identity
from ..errors import (
    BadRequest,
    NotFound,
    PayloadTooLarge,
    TooManyRequests,
    Unauthorized,
    ValidationFailed,
)
from ..models import ACTIVE_STATUSES, Task, TaskStatus
from ..tracker import Progress
from .guards import authenticate
from .keys import accounts_key, config_key, jobs_key, store_key, task_rate_key, tracker_key

routes = web.RouteTableDef()

#: Schema instances are reusable; building one per request costs a deep copy of its fields.
_COMPLETE_TASK = schemas.CompleteTask()
_CREATE_TASK = schemas.CreateTask()
_EMPTY = schemas.Empty()
_FAIL_TASK = schemas.FailTask()
_LIST_EVENTS_QUERY = schemas.ListEventsQuery()
_LIST_SUBSCRIPTIONS_QUERY = schemas.ListSubscriptionsQuery()
_LIST_TASKS_QUERY = schemas.ListTasksQuery()
_REPORT_PROGRESS = schemas.ReportProgress()
_STOCK_PARAMS = schemas.StockParams()


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body larger than {request.app[config_key].max_body_bytes} bytes"
        ) from None


async def _json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object ({} for an empty body when `allow_empty`)."""
    body = await _read_body(request)
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return data


def _validate(schema: Schema, data: Any) -> dict[str, Any]:
    try:
        loaded = schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed("invalid request", fields=exc.messages_dict) from None
    # Python's json reads NaN/Infinity and "\ud800" escapes. Stored, a NaN would be sent back
    # as text no browser parses, and a lone surrogate fails to encode inside SQLite's
    # transaction (taking the other requests of its group commit down with it).
    bad = {}
    for name, value in loaded.items():
        try:
            json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except ValueError:
            bad[name] = ["Not valid JSON text: no NaN, Infinity or unpaired surrogates."]
    if bad:
        raise ValidationFailed("invalid request", fields=bad)
    return loaded


async def _body(
    request: web.Request, schema: Schema, *, allow_empty: bool = False
) -> dict[str, Any]:
    return _validate(schema, await _json_object(request, allow_empty=allow_empty))


async def _caller(request: web.Request) -> Identity:
    return await authenticate(request, allow_query=False)


async def _owned_task(request: web.Request, identity: Identity) -> Task:
    task = await request.app[store_key].get_task(request.match_info["task_id"])
    if task is None or task.user_id != identity.user_id:
        raise NotFound("task not found")  # the same for another user's task
    return task


# -- tasks -------------------------------------------------------------------------------


async def _create(
    request: web.Request, identity: Identity, kind: str, params: dict[str, Any]
) -> web.Response:
    jobs = request.app[jobs_key]
    # A well-signed token may name a user that does not exist (e.g. a fresh database with the
    # same JWT secret). Its insert would break the foreign key inside the tracker's group
    # commit and fail every other request in that batch with it: refuse it here.
    if await request.app[accounts_key].get_user(identity.user_id) is None:
        raise Unauthorized("unknown user", code="invalid_token")
    if jobs.is_builtin(kind):
        params = _validate(_STOCK_PARAMS, params)
        params["code"] = params["code"].upper()
    task = await request.app[tracker_key].create_task(identity.user_id, kind, params)
    if jobs.is_builtin(kind):
        jobs.start(task)
    return web.json_response(task.to_dict(), status=201)


@routes.post("/api/v1/tasks")
async def create_task(request: web.Request) -> web.Response:
    identity = await _caller(request)
    data = await _body(request, _CREATE_TASK)
    return await _create(request, identity, data["kind"], data["params"])


@routes.post("/api/v1/stock/analyze")
async def analyze_stock(request: web.Request) -> web.Response:
    identity = await _caller(request)
    data = await _body(request, _STOCK_PARAMS)
    return await _create(request, identity, schemas.STOCK_ANALYSIS, data)


@routes.get("/api/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    identity = await _caller(request)
    query = _validate(_LIST_TASKS_QUERY, dict(request.query))
    status = query["status"]
    statuses = (
        None
        if status == "any"
        else ACTIVE_STATUSES
        if status == "active"
        else (TaskStatus(status),)
    )
    tasks = await request.app[store_key].list_tasks(identity.user_id, statuses, query["limit"])
    return web.json_response({"tasks": [t.to_dict() for t in tasks]})


@routes.get("/api/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    task = await _owned_task(request, await _caller(request))
    return web.json_response(task.to_dict())


@routes.get("/api/v1/tasks/{task_id}/events")
async def list_events(request: web.Request) -> web.Response:
    identity = await _caller(request)
    query = _validate(_LIST_EVENTS_QUERY, dict(request.query))
    task = await _owned_task(request, identity)
    events = await request.app[store_key].list_events(task.id, query["after_seq"], query["limit"])
    return web.json_response({"events": [e.to_dict() for e in events]})


def _seq_response(events: list[Any]) -> web.Response:
    return web.json_response({"seq": events[-1].seq})


def _check_task_rate(request: web.Request, identity: Identity) -> None:
    """--task-rate: refuse a progress post over the task's rate, before reading its body.

    Keyed by (caller, task): someone who is not the owner only spends their own bucket,
    never the owner's (their post is a 404 anyway once under the rate).
    """
    buckets = request.app[task_rate_key]
    # Task ids are 32 hex digits: a longer one is a 404 anyway, and must not make its bucket
    # key kilobytes long (a caller could post to many such ids between two sweeps).
    key = (identity.user_id, request.match_info["task_id"][:64])
    wait = buckets.take(key, time.monotonic())
    if wait > 0.0:
        raise TooManyRequests(
            f"more than {buckets.rate:g} progress posts per second for this task; nothing stored",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


@routes.post("/api/v1/tasks/{task_id}/progress")
async def report_progress(request: web.Request) -> web.Response:
    identity = await _caller(request)
    _check_task_rate(request, identity)
    data = await _body(request, _REPORT_PROGRESS)
    events = await request.app[tracker_key].report_progress(
        request.match_info["task_id"],
        Progress(progress=data["progress"], step=data.get("step"), message=data.get("message")),
        owner_id=identity.user_id,
    )
    return _seq_response(events)


@routes.post("/api/v1/tasks/{task_id}/complete")
async def complete_task(request: web.Request) -> web.Response:
    identity = await _caller(request)
    data = await _body(request, _COMPLETE_TASK, allow_empty=True)
    events = await request.app[tracker_key].complete(
        request.match_info["task_id"], data.get("result"), owner_id=identity.user_id
    )
    return _seq_response(events)


@routes.post("/api/v1/tasks/{task_id}/fail")
async def fail_task(request: web.Request) -> web.Response:
    identity = await _caller(request)
    data = await _body(request, _FAIL_TASK)
    events = await request.app[tracker_key].fail(
        request.match_info["task_id"], data["error"], owner_id=identity.user_id
    )
    return _seq_response(events)


@routes.post("/api/v1/tasks/{task_id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    identity = await _caller(request)
    await _body(request, _EMPTY, allow_empty=True)
    events = await request.app[tracker_key].cancel(
        request.match_info["task_id"], owner_id=identity.user_id
    )
    return _seq_response(events)


@routes.get("/api/v1/subscriptions")
async def list_subscriptions(request: web.Request) -> web.Response:
    """The caller's subscription history, newest first (the demo page's "resume" hint)."""
    identity = await _caller(request)
    query = _validate(_LIST_SUBSCRIPTIONS_QUERY, dict(request.query))
    records = await request.app[store_key].list_subscriptions(identity.user_id, query["limit"])
    return web.json_response({"subscriptions": [r.to_dict() for r in records]})
