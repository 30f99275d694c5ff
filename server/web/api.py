"""HTTP handlers under /api/v1 (accounts: account.py): each parses, calls one service, and
serialises."""

from __future__ import annotations

import math
import time
from typing import Any

from aiohttp import web
from marshmallow import Schema

from .. import budget, schemas
from ..auth import Identity
from ..errors import (
    NotFound,
    TooManyRequests,
    ValidationFailed,
)
from ..models import ACTIVE_STATUSES, Task, TaskStatus, dumps
from ..tracker import Progress
from .bodies import json_object, read_body, validate
from .guards import authenticate
from .keys import (
    config_key,
    create_rate_key,
    jobs_key,
    metrics_key,
    store_key,
    task_rate_key,
    tracker_key,
)

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


async def _body(
    request: web.Request, schema: Schema, *, allow_empty: bool = False
) -> dict[str, Any]:
    return validate(schema, json_object(await read_body(request), allow_empty=allow_empty))


async def _caller(request: web.Request) -> Identity:
    return await authenticate(request, allow_query=False)


async def _owned_task(request: web.Request, identity: Identity) -> Task:
    task = await request.app[store_key].get_task(request.match_info["task_id"])
    if task is None or task.user_id != identity.user_id:
        raise NotFound("task not found")  # the same for another user's task
    return task


# -- tasks -------------------------------------------------------------------------------


def _raw_json(request: web.Request, name: str, value: Any) -> str:
    """`value` as compact JSON text within --max-json-bytes and --max-json-depth, else 422."""
    config = request.app[config_key]
    try:
        return budget.compact(
            value, max_bytes=config.max_json_bytes, max_depth=config.max_json_depth
        )
    except budget.BudgetError as exc:
        raise ValidationFailed("invalid request", fields={name: [str(exc).capitalize() + "."]})


def _check_message(request: web.Request, message: str | None) -> None:
    """A progress message may take up to --max-json-bytes on the wire."""
    limit = request.app[config_key].max_json_bytes
    if message is not None and budget.wire_bytes(message) > limit:
        raise ValidationFailed(
            "invalid request",
            fields={"message": [f"At most {limit} bytes as JSON text (UTF-8)."]},
        )


def _json(text: str, status: int = 200) -> web.Response:
    """An answer whose JSON text is already built (tasks splice their raw params/result)."""
    return web.Response(text=text, status=status, content_type="application/json")


def _check_create_rate(request: web.Request, identity: Identity) -> None:
    """--task-create-rate: task creations per user per minute (token bucket)."""
    buckets = request.app[create_rate_key]
    wait = buckets.take(identity.user_id, time.monotonic())
    if wait > 0.0:
        request.app[metrics_key].refusals.note("task_create_rate", f"user={identity.user_id}")
        raise TooManyRequests(
            f"more than {buckets.rate * 60:g} tasks created per minute; nothing stored",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


async def _create(
    request: web.Request, identity: Identity, kind: str, params: dict[str, Any]
) -> web.Response:
    jobs = request.app[jobs_key]
    if jobs.is_builtin(kind):
        params = validate(_STOCK_PARAMS, params)
        params["code"] = params["code"].upper()
    raw = _raw_json(request, "params", params)
    task = await request.app[tracker_key].create_task(identity.user_id, kind, raw)
    if jobs.is_builtin(kind):
        jobs.start(task)
    return _json(task.to_json(), status=201)


@routes.post("/api/v1/tasks")
async def create_task(request: web.Request) -> web.Response:
    identity = await _caller(request)
    _check_create_rate(request, identity)
    data = await _body(request, _CREATE_TASK)
    return await _create(request, identity, data["kind"], data["params"])


@routes.post("/api/v1/stock/analyze")
async def analyze_stock(request: web.Request) -> web.Response:
    identity = await _caller(request)
    _check_create_rate(request, identity)
    data = await _body(request, _STOCK_PARAMS)
    return await _create(request, identity, schemas.STOCK_ANALYSIS, data)


@routes.get("/api/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    identity = await _caller(request)
    query = validate(_LIST_TASKS_QUERY, dict(request.query))
    status = query["status"]
    statuses = (
        None
        if status == "any"
        else ACTIVE_STATUSES
        if status == "active"
        else (TaskStatus(status),)
    )
    before = None
    if query["cursor"] is not None:
        created_at, _, rowid = query["cursor"].partition("~")
        before = (created_at, int(rowid))
    page = await request.app[store_key].list_tasks(
        identity.user_id, statuses, query["limit"], before=before
    )
    cursor = None if page.next is None else f"{page.next[0]}~{page.next[1]}"
    items = ",".join(t.to_json() for t in page.tasks)
    return _json(f'{{"tasks":[{items}],"next_cursor":{dumps(cursor)}}}')


@routes.get("/api/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    task = await _owned_task(request, await _caller(request))
    return _json(task.to_json())


@routes.get("/api/v1/tasks/{task_id}/events")
async def list_events(request: web.Request) -> web.Response:
    identity = await _caller(request)
    query = validate(_LIST_EVENTS_QUERY, dict(request.query))
    task = await _owned_task(request, identity)
    page = await request.app[store_key].list_events(task.id, query["after_seq"], query["limit"])
    following = page.events[-1].seq if page.more else None
    items = ",".join(e.to_json() for e in page.events)
    return _json(f'{{"events":[{items}],"next_after_seq":{dumps(following)}}}')


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
        request.app[metrics_key].refusals.note("task_rate", f"user={identity.user_id}")
        raise TooManyRequests(
            f"more than {buckets.rate:g} progress posts per second for this task; nothing stored",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


@routes.post("/api/v1/tasks/{task_id}/progress")
async def report_progress(request: web.Request) -> web.Response:
    identity = await _caller(request)
    _check_task_rate(request, identity)
    data = await _body(request, _REPORT_PROGRESS)
    _check_message(request, data.get("message"))
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
    result = data.get("result")
    raw = None if result is None else _raw_json(request, "result", result)
    events = await request.app[tracker_key].complete(
        request.match_info["task_id"], raw, owner_id=identity.user_id
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
    query = validate(_LIST_SUBSCRIPTIONS_QUERY, dict(request.query))
    records = await request.app[store_key].list_subscriptions(identity.user_id, query["limit"])
    return web.json_response({"subscriptions": [r.to_dict() for r in records]})
