"""GET /api/v1/openapi.json: a valid OpenAPI 3.1 document that describes every route, and
real answers of every route that agree with it (openapi-core checks request and answer)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.deserializing.media_types.util import plain_loads
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from werkzeug.datastructures import Headers, ImmutableMultiDict

from server.web import ws
from server.web.openapi import PATH, WEBSOCKET

from .helpers import PASSWORD, auth_headers, register

#: Methods aiohttp adds by itself: HEAD beside every GET, OPTIONS for CORS preflights.
_IMPLICIT = {"HEAD", "OPTIONS"}
_HOST = "http://127.0.0.1"
_UPGRADE = {
    "Connection": "Upgrade",
    "Upgrade": "websocket",
    "Sec-WebSocket-Version": "13",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
}


@dataclass
class _Request:
    """An HTTP request as openapi-core's Request protocol reads it."""

    method: str
    path: str
    parameters: RequestParameters
    body: bytes | None
    content_type: str
    host_url: str = _HOST


@dataclass
class _Response:
    """An answer as openapi-core's Response protocol reads it."""

    status_code: int
    content_type: str
    headers: Headers
    data: bytes


@dataclass
class Answer:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _matches(template: str, path: str) -> bool:
    """`path` is an instance of `template` (`{name}` stands for one non-empty segment)."""
    want, got = template.split("/"), path.split("/")
    return len(want) == len(got) and all(
        w == g or (w.startswith("{") and g != "") for w, g in zip(want, got, strict=True)
    )


@dataclass
class Api:
    """The app's test client; every request and answer is checked against the document."""

    client: TestClient
    document: dict[str, Any]
    #: (method, path template, status) of every answer checked.
    seen: set[tuple[str, str, int]] = field(default_factory=set)

    def __post_init__(self) -> None:
        # openapi-core reads media types it does not know as bytes; an SSE body is text.
        config = Config(extra_media_type_deserializers={"text/event-stream": plain_loads})
        self.openapi = OpenAPI.from_dict(self.document, config=config)

    def template(self, path: str) -> str:
        found = [t for t in self.document["paths"] if _matches(t, path)]
        assert len(found) == 1, f"{path} matches {found} in the document"
        return found[0]

    async def call(
        self,
        method: str,
        path: str,
        *,
        status: int | None,
        token: str | None = None,
        body: Any = None,
        raw: bytes | None = None,
        form: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        query: dict[str, str] | None = None,
        valid: bool | None = True,
    ) -> Answer:
        """Send, then check the answer's status (None: any) and the answer against the
        document.

        `valid=False`: a request the server refuses for its form, which the document must
        refuse too (openapi-core finds something wrong with it); None: not judged.
        """
        sent = dict(headers or {})
        if token is not None:
            sent.update(auth_headers(token))
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
        if form is not None:
            data = urlencode(form).encode()
            sent.setdefault("Content-Type", "application/x-www-form-urlencoded")
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        url = path + ("?" + urlencode(query) if query else "")
        resp = await self.client.request(method, url, data=data, headers=sent)
        try:
            got = b"" if resp.status == 101 else await resp.read()
            answer = Answer(resp.status, CIMultiDict(resp.headers), got)
        finally:
            resp.close()
        assert status is None or answer.status == status, (
            method,
            path,
            answer.status,
            answer.body[:500],
        )
        request = _Request(
            method=method.lower(),
            path=path,
            parameters=RequestParameters(
                query=ImmutableMultiDict(list((query or {}).items())),
                header=Headers(list(sent.items())),
            ),
            body=data,
            content_type=sent.get("Content-Type", ""),
        )
        request_errors = list(self.openapi.iter_request_errors(request))
        if valid is True:
            assert not request_errors, (
                method,
                path,
                [str(e.__cause__ or e) for e in request_errors],
            )
        elif valid is False:
            assert request_errors, f"the document accepts {method} {path} {data!r}"
        response = _Response(
            status_code=answer.status,
            content_type=answer.headers.get("Content-Type", ""),
            headers=Headers(list(answer.headers.items())),
            data=answer.body,
        )
        response_errors = list(self.openapi.iter_response_errors(request, response))
        assert not response_errors, (
            method,
            path,
            answer.status,
            [str(e.__cause__ or e) for e in response_errors],
            answer.body[:500],
        )
        self.seen.add((method.lower(), self.template(path), answer.status))
        return answer


async def _document(client: TestClient) -> dict[str, Any]:
    resp = await client.get(PATH)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    return await resp.json()


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    }


async def test_document_is_valid_openapi_3_1(client: TestClient) -> None:
    """The document is served without a token and validates as OpenAPI 3.1."""
    document = await _document(client)
    assert document["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(document).validate()
    names = document["components"]["schemas"]
    for name in ("Task", "Event", "TaskPage", "EventPage", "Token", "NewApiKey", "Share"):
        assert name in names
    assert set(document["components"]["securitySchemes"]) >= {
        "loginToken",
        "apiKey",
        "shareToken",
        "queryToken",
    }


async def test_every_route_is_described(client: TestClient) -> None:
    """Every route of the router under /api/v1 (and /healthz, /metrics) is in the document,
    WebSocket handshakes marked as such, and the document has no route the router lacks."""
    document = await _document(client)
    operations = _operations(document)
    routed = set()
    for route in client.app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in _IMPLICIT:
            continue
        if not (path.startswith("/api/v1/") or path in ("/healthz", "/metrics")):
            continue
        key = (route.method.lower(), path)
        routed.add(key)
        assert key in operations, f"{route.method} {path} is not in the OpenAPI document"
        is_socket = getattr(route.handler, "__module__", "") == ws.__name__
        assert operations[key].get(WEBSOCKET, False) is is_socket, key
    assert routed == set(operations)


def _sse_messages(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each message of a Server-Sent Events body."""
    messages = []
    for block in body.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            messages.append((lines.get("event", "message"), json.loads(lines["data"])))
    return messages


def _schema_check(document: dict[str, Any], name: str, value: Any) -> None:
    """`value` is valid against the document's component `name`."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    OAS31Validator(schema).validate(value)


async def test_every_route_answers_as_documented(client: TestClient) -> None:
    """Real requests to every route, success and the main errors, checked by openapi-core
    against the document (request and answer), until every operation has been seen."""
    document = await _document(client)
    api = Api(client, document)

    # -- service -------------------------------------------------------------------------
    await api.call("GET", PATH, status=200)
    await api.call("GET", "/healthz", status=200)
    metrics = await api.call("GET", "/metrics", status=200)
    assert metrics.headers["Content-Type"].startswith("text/plain")

    # -- accounts ------------------------------------------------------------------------
    user = await api.call(
        "POST", "/api/v1/auth/register", body={"username": "ada", "password": PASSWORD}, status=201
    )
    assert user.json()["username"] == "ada"
    await api.call(
        "POST", "/api/v1/auth/register", body={"username": "ada", "password": PASSWORD}, status=409
    )
    await api.call(
        "POST",
        "/api/v1/auth/register",
        body={"username": "a", "password": PASSWORD},
        status=422,
        valid=False,
    )
    await api.call("POST", "/api/v1/auth/register", raw=b"{not json", status=400, valid=False)
    login = await api.call(
        "POST", "/api/v1/auth/login", body={"username": "ada", "password": PASSWORD}, status=200
    )
    token = login.json()["access_token"]
    await api.call(
        "POST",
        "/api/v1/auth/login",
        form={"username": "ada", "password": PASSWORD, "grant_type": "password"},
        status=200,
    )
    await api.call(
        "POST", "/api/v1/auth/login", body={"username": "ada", "password": "wrong!"}, status=401
    )
    await api.call("POST", "/api/v1/auth/refresh", token=token, status=200)
    await api.call("GET", "/api/v1/auth/me", token=token, status=200)
    await api.call("GET", "/api/v1/auth/me", token="not-a-token", status=401)

    # -- API keys ------------------------------------------------------------------------
    made = await api.call(
        "POST",
        "/api/v1/api-keys",
        token=token,
        body={"name": "readers", "scopes": ["tasks:read"]},
        status=201,
    )
    read_key = made.json()["key"]
    await api.call(
        "POST",
        "/api/v1/api-keys",
        token=token,
        body={"name": "bad", "scopes": ["tasks:admin"]},
        status=422,
        valid=False,
    )
    await api.call(
        "POST",
        "/api/v1/api-keys",
        token=read_key,
        body={"name": "k", "scopes": ["tasks:read"]},
        status=403,
    )
    listed = await api.call("GET", "/api/v1/api-keys", token=token, status=200)
    assert [k["id"] for k in listed.json()["api_keys"]] == [made.json()["id"]]

    # -- tasks ---------------------------------------------------------------------------
    created = await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "import", "params": {"file": "a.csv"}},
        headers={"Idempotency-Key": "create-1"},
        status=201,
    )
    task = created.json()
    again = await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "import", "params": {"file": "a.csv"}},
        headers={"Idempotency-Key": "create-1"},
        status=201,
    )
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == task
    await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "import", "params": {"file": "b.csv"}},
        headers={"Idempotency-Key": "create-1"},
        status=422,
    )
    await api.call("POST", "/api/v1/tasks", token=read_key, body={"kind": "x"}, status=403)
    await api.call(
        "POST", "/api/v1/tasks", token=token, body={"kind": "bad kind!"}, status=422, valid=False
    )
    stock = await api.call(
        "POST", "/api/v1/stock/analyze", token=token, body={"code": "600519"}, status=201
    )
    await api.call(
        "POST", "/api/v1/stock/analyze", token=token, body={"code": "12"}, status=422, valid=False
    )
    tid = task["id"]
    await api.call(
        "GET", "/api/v1/tasks", token=token, query={"status": "active", "limit": "10"}, status=200
    )
    await api.call("GET", "/api/v1/tasks", token=read_key, status=200)
    await api.call(
        "GET", "/api/v1/tasks", token=token, query={"limit": "0"}, status=422, valid=False
    )
    await api.call("GET", f"/api/v1/tasks/{tid}", token=read_key, status=200)
    await api.call("GET", f"/api/v1/tasks/{'0' * 32}", token=token, status=404)
    one = await api.call(
        "POST",
        f"/api/v1/tasks/{tid}/progress",
        token=token,
        body={"progress": 40, "step": "parse"},
        status=200,
    )
    assert set(one.json()) == {"seq"}
    batch = await api.call(
        "POST",
        f"/api/v1/tasks/{tid}/progress",
        token=token,
        body={"updates": [{"progress": 50}, {"progress": 60, "message": "rows"}]},
        headers={"Idempotency-Key": "batch-1"},
        status=200,
    )
    assert set(batch.json()) == {"seq", "first_seq"}
    await api.call(
        "POST",
        f"/api/v1/tasks/{tid}/progress",
        token=token,
        body={"progress": 101},
        status=422,
        valid=False,
    )
    await api.call(
        "POST", f"/api/v1/tasks/{tid}/progress", token=read_key, body={"progress": 70}, status=403
    )
    await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/events",
        token=token,
        query={"after_seq": "1", "limit": "2"},
        status=200,
    )
    await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/events",
        token=token,
        query={"after_seq": "-1"},
        status=422,
        valid=False,
    )

    # -- parents and children ------------------------------------------------------------
    parent = await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "batch", "auto_finish": True},
        status=201,
    )
    pid = parent.json()["id"]
    child = await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "file", "parent_id": pid, "weight": 2},
        status=201,
    )
    await api.call(
        "POST",
        f"/api/v1/tasks/{child.json()['id']}/progress",
        token=token,
        body={"progress": 50},
        status=200,
    )
    await api.call("GET", f"/api/v1/tasks/{pid}/events", token=token, status=200)
    await api.call(
        "POST", f"/api/v1/tasks/{pid}/progress", token=token, body={"progress": 5}, status=409
    )
    await api.call(
        "POST",
        "/api/v1/tasks",
        token=token,
        body={"kind": "x", "parent_id": "0" * 32},
        status=404,
    )
    await api.call(
        "GET", f"/api/v1/tasks/{pid}/children", token=token, query={"limit": "10"}, status=200
    )
    await api.call(
        "GET",
        f"/api/v1/tasks/{pid}/children",
        token=token,
        query={"limit": "0"},
        status=422,
        valid=False,
    )
    multi = await api.call(
        "POST", "/api/v1/stock/analyze", token=token, body={"codes": ["AAPL", "MSFT"]}, status=201
    )
    assert multi.json()["children"]["total"] == 2

    # -- sharing and the stream (the task still running) ---------------------------------
    shared = await api.call(
        "POST", f"/api/v1/tasks/{tid}/share", token=token, body={"ttl_s": 3600}, status=201
    )
    share = shared.json()["token"]
    await api.call("POST", f"/api/v1/tasks/{tid}/share", token=token, status=201)
    await api.call("GET", f"/api/v1/tasks/{tid}", token=share, status=200)
    await api.call("GET", f"/api/v1/tasks/{tid}/events", token=share, status=200)
    await api.call("GET", f"/api/v1/tasks/{stock.json()['id']}", token=share, status=404)
    await api.call("GET", "/api/v1/tasks", token=share, status=403)
    await api.call(
        "POST", f"/api/v1/tasks/{tid}/progress", token=share, body={"progress": 70}, status=403
    )

    done = await api.call(
        "POST",
        f"/api/v1/tasks/{tid}/complete",
        token=token,
        body={"result": {"rows": 5000}},
        status=200,
    )
    last = done.json()["seq"]
    await api.call(
        "POST", f"/api/v1/tasks/{tid}/progress", token=token, body={"progress": 99}, status=409
    )
    stream = await api.call(
        "GET", f"/api/v1/tasks/{tid}/stream", query={"token": share}, status=200
    )
    assert stream.headers["Content-Type"].startswith("text/event-stream")
    messages = _sse_messages(stream.body)
    assert [kind for kind, _ in messages] == ["snapshot"]
    _schema_check(document, "SnapshotMessage", messages[0][1])
    replay = await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/stream",
        token=token,
        headers={"Last-Event-ID": "1"},
        status=200,
    )
    kinds = [kind for kind, _ in _sse_messages(replay.body)]
    assert kinds[-1] == "completed" and len(kinds) == last - 1
    for _, message in _sse_messages(replay.body):
        _schema_check(document, "EventMessage", message)
    await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/stream",
        token=token,
        headers={"Last-Event-ID": str(last)},
        status=204,
    )
    await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/stream",
        token=token,
        headers={"Last-Event-ID": "x"},
        status=400,
        valid=False,
    )
    await api.call(
        "GET",
        f"/api/v1/tasks/{tid}/stream",
        token=token,
        query={"last_seq": "-1"},
        status=422,
        valid=False,
    )
    await api.call("DELETE", f"/api/v1/tasks/{tid}/share", token=token, status=204)
    await api.call("GET", f"/api/v1/tasks/{tid}", token=share, status=401)

    # -- the other endings ---------------------------------------------------------------
    second = (
        await api.call("POST", "/api/v1/tasks", token=token, body={"kind": "x"}, status=201)
    ).json()
    await api.call(
        "POST",
        f"/api/v1/tasks/{second['id']}/fail",
        token=token,
        body={"error": "disk full"},
        status=200,
    )
    await api.call(
        "POST",
        f"/api/v1/tasks/{second['id']}/fail",
        token=token,
        body={"error": ""},
        status=422,
        valid=False,
    )
    third = (
        await api.call("POST", "/api/v1/tasks", token=token, body={"kind": "x"}, status=201)
    ).json()
    await api.call("POST", f"/api/v1/tasks/{third['id']}/cancel", token=token, status=200)
    await api.call("POST", f"/api/v1/tasks/{third['id']}/complete", token=token, status=409)
    await api.call("GET", "/api/v1/subscriptions", token=token, query={"limit": "5"}, status=200)

    # -- WebSocket handshakes ------------------------------------------------------------
    await api.call("GET", "/api/v1/ws", token=token, headers=_UPGRADE, status=101)
    await api.call("GET", "/api/v1/ws", token="not-a-token", headers=_UPGRADE, status=401)
    await api.call(
        "GET",
        f"/api/v1/stock/ws/analyze/{tid}",
        query={"token": read_key},
        headers=_UPGRADE,
        status=101,
    )
    await api.call(
        "GET", f"/api/v1/stock/ws/analyze/{'0' * 32}", token=token, headers=_UPGRADE, status=404
    )

    # -- what ends the caller's access ---------------------------------------------------
    await api.call("DELETE", f"/api/v1/api-keys/{made.json()['id']}", token=token, status=204)
    await api.call("DELETE", f"/api/v1/api-keys/{made.json()['id']}", token=token, status=404)
    await api.call("POST", "/api/v1/auth/logout", token=token, query={"all": "true"}, status=204)
    other = await register(client, "bob")
    await api.call(
        "POST",
        "/api/v1/auth/password",
        token=other,
        body={"current_password": "wrong", "new_password": "another pass"},
        status=401,
    )
    await api.call(
        "POST",
        "/api/v1/auth/password",
        token=other,
        body={"current_password": PASSWORD, "new_password": "another pass"},
        status=204,
    )

    answered = {(method, path) for method, path, status in api.seen if status < 400}
    missing = set(_operations(document)) - answered
    assert not missing, f"no success answer checked for {sorted(missing)}"
    statuses = {status for _, _, status in api.seen}
    assert statuses >= {101, 200, 201, 204, 400, 401, 403, 404, 409, 422}


async def test_rate_limits_answer_as_documented(aiohttp_client: Any, make_app: Any) -> None:
    """429 with Retry-After (progress over --task-rate; wrong API keys past --auth-rate, on
    a login-only route too) is an answer the document lists."""
    # --auth-rate 3 per minute: register and login spend two, the first wrong key the last.
    client = await aiohttp_client(make_app(task_rate=0.001, task_burst=1, auth_rate=3))
    api = Api(client, await _document(client))
    token = await register(client, "ada")
    task = (
        await api.call("POST", "/api/v1/tasks", token=token, body={"kind": "x"}, status=201)
    ).json()
    path = f"/api/v1/tasks/{task['id']}/progress"
    await api.call("POST", path, token=token, body={"progress": 1}, status=200)
    refused = await api.call("POST", path, token=token, body={"progress": 2}, status=429)
    assert refused.json()["error"]["code"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    wrong = "pk_0123456789abcdef_" + "x" * 43
    await api.call("GET", "/api/v1/api-keys", token=wrong, status=401)
    guessed = await api.call("GET", "/api/v1/api-keys", token=wrong, status=429)
    assert guessed.json()["error"]["code"] == "rate_limited"


async def test_metrics_token_answers_as_documented(aiohttp_client: Any, make_app: Any) -> None:
    """With --metrics-token, /metrics answers 401 without it and 200 with it, as documented."""
    secret = "metrics-secret-0123456789abcdef"
    client = await aiohttp_client(make_app(metrics_token=secret))
    api = Api(client, await _document(client))
    await api.call("GET", "/metrics", status=401)
    await api.call("GET", "/metrics", token=secret, status=200)


@pytest.mark.parametrize("kind", ["login", "read_key", "write_key", "share", "query"])
async def test_security_of_each_operation_is_what_the_server_enforces(
    client: TestClient, kind: str
) -> None:
    """Each credential is let through exactly by the operations whose `security` lists it
    (refused ones get 401 or 403), on every operation of the document."""
    document = await _document(client)
    api = Api(client, document)
    owner = await register(client, "ada")
    for (method, path), operation in sorted(_operations(document).items()):
        # A fresh task and credential each time, as some routes end them; the task is
        # finished, so its stream ends after the snapshot.
        task = (
            await api.call("POST", "/api/v1/tasks", token=owner, body={"kind": "x"}, status=201)
        ).json()
        await api.call("POST", f"/api/v1/tasks/{task['id']}/complete", token=owner, status=200)
        credential, schemes = await _credential(api, kind, task["id"])
        concrete = path.replace("{task_id}", task["id"]).replace("{key_id}", "0" * 16)
        allowed = not operation["security"] or any(
            all(name in schemes and set(scopes) <= schemes[name] for name, scopes in need.items())
            for need in operation["security"]
        )
        # No body, no parameters: only who may call is judged here, not the request.
        answer = await api.call(
            method.upper(),
            concrete,
            status=None,
            token=None if kind == "query" else credential,
            query={"token": credential} if kind == "query" else None,
            valid=None,
        )
        refused = answer.status == 401 or (
            answer.status == 403 and answer.json()["error"]["code"] == "insufficient_scope"
        )
        assert refused is not allowed, (kind, method, path, answer.status, answer.body[:300])


async def _credential(api: Api, kind: str, task_id: str) -> tuple[str, dict[str, set[str]]]:
    """A new credential of `kind` for the owner "ada", and the schemes (with scopes) it is."""
    login = await api.call(
        "POST", "/api/v1/auth/login", body={"username": "ada", "password": PASSWORD}, status=200
    )
    token = login.json()["access_token"]
    if kind == "login":
        return token, {"loginToken": set()}
    if kind == "query":
        return token, {"queryToken": set()}
    if kind == "share":
        shared = await api.call("POST", f"/api/v1/tasks/{task_id}/share", token=token, status=201)
        return shared.json()["token"], {"shareToken": set()}
    scope = "tasks:read" if kind == "read_key" else "tasks:write"
    made = await api.call(
        "POST", "/api/v1/api-keys", token=token, body={"name": kind, "scopes": [scope]}, status=201
    )
    return made.json()["key"], {"apiKey": {scope}}
