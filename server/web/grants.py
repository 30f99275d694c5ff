"""API keys (`/api/v1/api-keys`) and share tokens (`/api/v1/tasks/{id}/share`).

Managing keys needs a login token: a key cannot mint or revoke keys. A share token is
made by whoever may write the task (its owner's login or a `tasks:write` key); its link
opens the demo page's read-only view, the token in the URL fragment, which browsers
never send to the server (so it is in no access log).
"""

from __future__ import annotations

from aiohttp import web

from .. import schemas
from ..credentials import WRITE
from ..errors import NotFound
from ..models import Task
from ..store.records import iso_time
from .bodies import json_object, read_body, validate
from .guards import authenticate, public_origin
from .keys import credentials_key, store_key

routes = web.RouteTableDef()

_CREATE_API_KEY = schemas.CreateApiKey()
_SHARE_TASK = schemas.ShareTask()


@routes.post("/api/v1/api-keys")
async def create_api_key(request: web.Request) -> web.Response:
    """`{name, scopes}` -> 201 with the key, shown this once."""
    identity = await authenticate(request, allow_query=False, login_only=True)
    data = validate(_CREATE_API_KEY, json_object(await read_body(request)))
    record, key = await request.app[credentials_key].create_key(
        identity.user_id, data["name"], data["scopes"]
    )
    body = {
        "id": record.id,
        "name": record.name,
        "scopes": list(record.scopes),
        "key": key,
        "created_at": record.created_at,
    }
    return web.json_response(body, status=201)


@routes.get("/api/v1/api-keys")
async def list_api_keys(request: web.Request) -> web.Response:
    """The caller's live keys, oldest first, without their secrets."""
    identity = await authenticate(request, allow_query=False, login_only=True)
    records = await request.app[credentials_key].list_keys(identity.user_id)
    keys = [
        {
            "id": r.id,
            "name": r.name,
            "scopes": list(r.scopes),
            "created_at": r.created_at,
            "last_used_at": r.last_used_at,
        }
        for r in records
    ]
    return web.json_response({"api_keys": keys})


@routes.delete("/api/v1/api-keys/{key_id}")
async def revoke_api_key(request: web.Request) -> web.Response:
    """Revoke at once (its open sockets close with 4401); someone else's key is a 404."""
    identity = await authenticate(request, allow_query=False, login_only=True)
    key_id = request.match_info["key_id"]
    if not await request.app[credentials_key].revoke_key(identity.user_id, key_id[:64]):
        raise NotFound("API key not found")
    return web.Response(status=204)


async def _shared_task(request: web.Request) -> Task:
    identity = await authenticate(request, allow_query=False, scope=WRITE)
    task = await request.app[store_key].get_task(request.match_info["task_id"])
    if task is None or task.user_id != identity.user_id:
        raise NotFound("task not found")
    return task


@routes.post("/api/v1/tasks/{task_id}/share")
async def share_task(request: web.Request) -> web.Response:
    """`{ttl_s?}` -> 201 `{token, expires_at, url}`: read access to this one task."""
    task = await _shared_task(request)
    data = validate(_SHARE_TASK, json_object(await read_body(request), allow_empty=True))
    token, expires_at = await request.app[credentials_key].create_share(
        task.id, task.user_id, data["ttl_s"]
    )
    url = f"{public_origin(request)}/#task={task.id}&share={token}"
    return web.json_response(
        {"token": token, "expires_at": iso_time(expires_at), "url": url}, status=201
    )


@routes.delete("/api/v1/tasks/{task_id}/share")
async def revoke_shares(request: web.Request) -> web.Response:
    """End every share token of the task (their open streams close); 204."""
    task = await _shared_task(request)
    await request.app[credentials_key].revoke_shares(task.id)
    return web.Response(status=204)
