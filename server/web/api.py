"""HTTP handlers under /api/v1 (accounts: account.py): each parses, calls one service, and
serialises."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from aiohttp import web

from .. import budget, schemas
from ..auth import Identity
from ..credentials import READ, WRITE
from ..errors import (
    NotFound,
    TooManyRequests,
    ValidationFailed,
)
from ..idempotency import Claim, fingerprint, valid_key
from ..lifecycle import Change, Create, Outcome, answer_of
from ..models import ACTIVE_STATUSES, Task, TaskStatus, dumps
from ..tracker import Cancel, Complete, Fail, Progress, ProgressBatch, Request
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
_REPORT_PROGRESS_BATCH = schemas.ReportProgressBatch()
_STOCK_PARAMS = schemas.StockParams()
_ANALYZE_STOCK = schemas.AnalyzeStock()
_LIST_CHILDREN_QUERY = schemas.ListChildrenQuery()


async def _object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    return json_object(await read_body(request), allow_empty=allow_empty)


async def _reader(request: web.Request) -> Identity:
    """The caller of a read route: `tasks:read`; a share token may read its own task."""
    return await authenticate(request, allow_query=False, scope=READ, allow_share=True)


async def _writer(request: web.Request) -> Identity:
    """The caller of a write route: `tasks:write` (never a share token)."""
    return await authenticate(request, allow_query=False, scope=WRITE)


async def _owned_task(request: web.Request, identity: Identity) -> Task:
    task = await request.app[store_key].get_task(request.match_info["task_id"])
    if task is None or task.user_id != identity.user_id:
        raise NotFound("task not found")  # the same for another user's task
    return task


def _claim(request: web.Request, identity: Identity, body: Any) -> Claim | None:
    """The request's `Idempotency-Key`, if it has one (422 if it is not 1-255 printable
    ASCII characters)."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not valid_key(key):
        raise ValidationFailed(
            "invalid Idempotency-Key",
            fields={"Idempotency-Key": ["1 to 255 printable ASCII characters."]},
        )
    return Claim(identity.user_id, key, fingerprint(request.method, request.path, body))


async def _perform(
    request: web.Request,
    identity: Identity,
    task_id: str,
    change: Create | Change,
    claim: Claim | None,
) -> tuple[Outcome, web.Response]:
    """Commit one change (or replay the first answer to its idempotency key)."""
    outcome = await request.app[tracker_key].submit(
        Request(task_id, identity.user_id, change, claim), identity.user_id
    )
    if outcome.replayed is not None:
        answer = outcome.replayed
        response = _json(answer.body, status=answer.status)
        response.headers["Idempotent-Replayed"] = "true"
        return outcome, response
    answer = answer_of(change, outcome)
    return outcome, _json(answer.body, status=answer.status)


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
    request: web.Request, identity: Identity, create: Create, body: Any
) -> web.Response:
    jobs = request.app[jobs_key]
    claim = _claim(request, identity, body)
    outcome, response = await _perform(request, identity, "", create, claim)
    for task in (outcome.created, *outcome.children):
        if task is not None and jobs.is_builtin(task.kind):
            jobs.start(task)
    return response


def _placed(
    identity: Identity, kind: str, raw: str, data: dict[str, Any], finish: int = 0
) -> Create:
    return Create(
        identity.user_id,
        kind,
        raw,
        parent_id=data.get("parent_id"),
        weight=data.get("weight", 1),
        finish=finish,
    )


@routes.post("/api/v1/tasks")
async def create_task(request: web.Request) -> web.Response:
    identity = await _writer(request)
    _check_create_rate(request, identity)
    body = await _object(request)
    data = validate(_CREATE_TASK, body)
    params = data["params"]
    if request.app[jobs_key].is_builtin(data["kind"]):
        params = validate(_STOCK_PARAMS, params)
        params["code"] = params["code"].upper()
    finish = 0 if not data["auto_finish"] else 2 if data["fail_fast"] else 1
    raw = _raw_json(request, "params", params)
    create = _placed(identity, data["kind"], raw, data, finish)
    return await _create(request, identity, create, body)


@routes.post("/api/v1/stock/analyze")
async def analyze_stock(request: web.Request) -> web.Response:
    """`{code}`: one analysis; `{codes}`: a parent with a child analysis per code, which
    finishes by itself and ranks the codes by their signal's score."""
    identity = await _writer(request)
    _check_create_rate(request, identity)
    body = await _object(request)
    data = validate(_ANALYZE_STOCK, body)
    if "code" in data:
        raw = _raw_json(request, "params", {"code": data["code"].upper()})
        create = _placed(identity, schemas.STOCK_ANALYSIS, raw, data)
        return await _create(request, identity, create, body)
    codes = [code.upper() for code in data["codes"]]
    children = tuple(
        Create(identity.user_id, schemas.STOCK_ANALYSIS, _raw_json(request, "params", {"code": c}))
        for c in codes
    )
    raw = _raw_json(request, "params", {"codes": codes})
    parent = dataclasses.replace(
        _placed(identity, schemas.STOCK_ANALYSIS_BATCH, raw, data, finish=1), children=children
    )
    return await _create(request, identity, parent, body)


@routes.get("/api/v1/tasks")
async def list_tasks(request: web.Request) -> web.Response:
    identity = await authenticate(request, allow_query=False, scope=READ)
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
        identity.user_id, statuses, query["limit"], before=before, roots_only=query["root"]
    )
    cursor = None if page.next is None else f"{page.next[0]}~{page.next[1]}"
    items = ",".join(t.to_json() for t in page.tasks)
    return _json(f'{{"tasks":[{items}],"next_cursor":{dumps(cursor)}}}')


@routes.get("/api/v1/tasks/{task_id}")
async def get_task(request: web.Request) -> web.Response:
    task = await _owned_task(request, await _reader(request))
    return _json(task.to_json())


@routes.get("/api/v1/tasks/{task_id}/events")
async def list_events(request: web.Request) -> web.Response:
    identity = await _reader(request)
    query = validate(_LIST_EVENTS_QUERY, dict(request.query))
    task = await _owned_task(request, identity)
    page = await request.app[store_key].list_events(task.id, query["after_seq"], query["limit"])
    following = page.events[-1].seq if page.more else None
    items = ",".join(e.to_json() for e in page.events)
    return _json(f'{{"events":[{items}],"next_after_seq":{dumps(following)}}}')


@routes.get("/api/v1/tasks/{task_id}/children")
async def list_children(request: web.Request) -> web.Response:
    """A task's children, oldest first, paged like the task list."""
    identity = await _reader(request)
    query = validate(_LIST_CHILDREN_QUERY, dict(request.query))
    task = await _owned_task(request, identity)
    after = None
    if query["cursor"] is not None:
        created_at, _, rowid = query["cursor"].partition("~")
        after = (created_at, int(rowid))
    page = await request.app[store_key].list_children(task.id, query["limit"], after=after)
    cursor = None if page.next is None else f"{page.next[0]}~{page.next[1]}"
    items = ",".join(t.to_json() for t in page.tasks)
    return _json(f'{{"tasks":[{items}],"next_cursor":{dumps(cursor)}}}')


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
    """One update `{progress, step?, message?}`, or a batch `{"updates": [...]}`."""
    identity = await _writer(request)
    _check_task_rate(request, identity)
    body = await _object(request)
    change: Change
    if "updates" in body:
        data = validate(_REPORT_PROGRESS_BATCH, body)
        items = []
        for item in data["updates"]:
            _check_message(request, item.get("message"))
            items.append(_progress(item))
        change = ProgressBatch(tuple(items))
    else:
        data = schemas.plain_progress(body) or validate(_REPORT_PROGRESS, body)
        _check_message(request, data.get("message"))
        change = _progress(data)
    return await _change(request, identity, change, body)


def _progress(data: dict[str, Any]) -> Progress:
    return Progress(progress=data["progress"], step=data.get("step"), message=data.get("message"))


async def _change(
    request: web.Request, identity: Identity, change: Change, body: Any
) -> web.Response:
    claim = _claim(request, identity, body)
    _, response = await _perform(request, identity, request.match_info["task_id"], change, claim)
    return response


@routes.post("/api/v1/tasks/{task_id}/complete")
async def complete_task(request: web.Request) -> web.Response:
    identity = await _writer(request)
    body = await _object(request, allow_empty=True)
    result = validate(_COMPLETE_TASK, body).get("result")
    raw = None if result is None else _raw_json(request, "result", result)
    return await _change(request, identity, Complete(raw), body)


@routes.post("/api/v1/tasks/{task_id}/fail")
async def fail_task(request: web.Request) -> web.Response:
    identity = await _writer(request)
    body = await _object(request)
    data = validate(_FAIL_TASK, body)
    return await _change(request, identity, Fail(data["error"]), body)


@routes.post("/api/v1/tasks/{task_id}/cancel")
async def cancel_task(request: web.Request) -> web.Response:
    identity = await _writer(request)
    body = await _object(request, allow_empty=True)
    validate(_EMPTY, body)
    return await _change(request, identity, Cancel(), body)


@routes.get("/api/v1/subscriptions")
async def list_subscriptions(request: web.Request) -> web.Response:
    """The caller's subscription history, newest first (the demo page's "resume" hint)."""
    identity = await authenticate(request, allow_query=False, scope=READ)
    query = validate(_LIST_SUBSCRIPTIONS_QUERY, dict(request.query))
    records = await request.app[store_key].list_subscriptions(identity.user_id, query["limit"])
    return web.json_response({"subscriptions": [r.to_dict() for r in records]})
