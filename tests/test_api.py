"""The HTTP API under /api/v1: every row of the contract's table, with its errors."""

from __future__ import annotations

import asyncio
from typing import Any

import jwt
import pytest
from aiohttp.test_utils import TestClient

from server.web.keys import jobs_key

from .helpers import (
    PASSWORD,
    SECRET,
    TIMEOUT,
    auth_headers,
    create_task,
    eventually,
    post_progress,
    register,
)

API = "/api/v1"


# -- local helpers -----------------------------------------------------------------------


async def _error(
    resp: Any, status: int, code: str | None = None, case: Any = None
) -> dict[str, Any]:
    """Assert `resp` is a JSON error with `status` (and `code`); return its "error" object.

    `case` (the input being tried) is shown in assertion messages.
    """
    assert resp.status == status, (case, await resp.text())
    assert resp.content_type == "application/json", case
    body = await resp.json()
    assert set(body) == {"error"}, case
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"], case
    assert isinstance(error["fields"], dict), case
    if code is not None:
        assert error["code"] == code, (case, error)
    return error


async def _get_task(client: TestClient, token: str, task_id: str) -> dict[str, Any]:
    resp = await client.get(f"{API}/tasks/{task_id}", headers=auth_headers(token))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def _events(client: TestClient, token: str, task_id: str, **query: Any) -> list[dict]:
    resp = await client.get(
        f"{API}/tasks/{task_id}/events", params=query, headers=auth_headers(token)
    )
    assert resp.status == 200, await resp.text()
    return (await resp.json())["events"]


async def _list(client: TestClient, token: str, status: str | None = None) -> list[dict]:
    params = {} if status is None else {"status": status}
    resp = await client.get(f"{API}/tasks", params=params, headers=auth_headers(token))
    assert resp.status == 200, await resp.text()
    return (await resp.json())["tasks"]


async def _write(
    client: TestClient, token: str, task_id: str, action: str, body: Any = None, **kwargs: Any
) -> Any:
    """POST /tasks/{id}/{action} with a JSON body (none when `body` is None)."""
    if body is not None:
        kwargs["json"] = body
    headers = {**auth_headers(token), **kwargs.pop("headers", {})}
    return await client.post(f"{API}/tasks/{task_id}/{action}", headers=headers, **kwargs)


async def _analyze(client: TestClient, token: str, code: str) -> Any:
    return await client.post(
        f"{API}/stock/analyze", json={"code": code}, headers=auth_headers(token)
    )


def _assert_contiguous(events: list[dict], first: int = 1) -> None:
    assert [e["seq"] for e in events] == list(range(first, first + len(events)))


TASK_KEYS = {
    "id",
    "kind",
    "params",
    "status",
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
}


# -- POST /auth/register -----------------------------------------------------------------


async def test_register_returns_201_with_id_and_username(client):
    """Registering answers 201 with exactly {id, username}."""
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    assert resp.status == 201
    body = await resp.json()
    assert set(body) == {"id", "username"}
    assert body["username"] == "alice" and isinstance(body["id"], int)


async def test_register_accepts_every_allowed_character(client):
    """A username of 3-32 characters of [A-Za-z0-9_.-] is accepted, at both length limits."""
    for name in ("a_b", "A.b-9_Z", "x" * 32):
        resp = await client.post(
            f"{API}/auth/register", json={"username": name, "password": "12345678"}
        )
        assert resp.status == 201, (name, await resp.text())


async def test_register_duplicate_is_409(client):
    """A second account with the same username is 409 username_taken."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    error = await _error(resp, 409, "username_taken")
    assert "username" in error["fields"]


async def test_register_duplicate_in_other_case_is_409(client):
    """Usernames are unique without regard to case: "ALICE" after "alice" is 409."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/register", json={"username": "ALICE", "password": PASSWORD}
    )
    await _error(resp, 409, "username_taken")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"username": "ab", "password": PASSWORD}, "username"),
        ({"username": "a" * 33, "password": PASSWORD}, "username"),
        ({"username": "bad name", "password": PASSWORD}, "username"),
        ({"username": "bad/name", "password": PASSWORD}, "username"),
        ({"username": "héllo", "password": PASSWORD}, "username"),
        ({"username": "alice\n", "password": PASSWORD}, "username"),
        ({"username": "", "password": PASSWORD}, "username"),
        ({"username": "alice", "password": "1234567"}, "password"),
        ({"username": "alice", "password": ""}, "password"),
        ({"password": PASSWORD}, "username"),
        ({"username": "alice"}, "password"),
        ({"username": 12345, "password": PASSWORD}, "username"),
        ({"username": None, "password": PASSWORD}, "username"),
        ({"username": "alice", "password": 12345678}, "password"),
        ({"username": ["alice"], "password": PASSWORD}, "username"),
        ({"username": "alice", "password": PASSWORD, "admin": True}, "admin"),
    ],
)
async def test_register_invalid_is_422(client, body, field):
    """Invalid usernames/passwords, missing, non-string and unknown fields are 422 by field."""
    resp = await client.post(f"{API}/auth/register", json=body)
    error = await _error(resp, 422, "validation_error")
    assert field in error["fields"], error


async def test_register_race_gives_one_account(client):
    """Concurrent registrations of one name (in any case) give one 201; the rest are 409."""
    names = ["carol", "CAROL", "Carol", "carol"]
    resps = await asyncio.gather(
        *(
            client.post(f"{API}/auth/register", json={"username": n, "password": PASSWORD})
            for n in names
        )
    )
    assert sorted(r.status for r in resps) == [201, 409, 409, 409]
    for resp in resps:
        if resp.status == 409:
            await _error(resp, 409, "username_taken")


async def test_register_invalid_creates_no_user(client):
    """A rejected registration leaves the name free."""
    resp = await client.post(f"{API}/auth/register", json={"username": "alice", "password": "x"})
    await _error(resp, 422)
    await register(client, "alice")


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b"{'username': 'a'}", b"", b"\xff\xfe{}", b'{"a": 1,}']
)
async def test_register_invalid_json_is_400(client, raw):
    """A body that is not JSON (or empty) is 400 invalid_json."""
    resp = await client.post(
        f"{API}/auth/register", data=raw, headers={"Content-Type": "application/json"}
    )
    await _error(resp, 400, "invalid_json")


@pytest.mark.parametrize("raw", [b"[]", b'["alice", "pw"]', b'"alice"', b"42", b"null", b"true"])
async def test_register_non_object_json_is_400(client, raw):
    """JSON that is not an object is 400 invalid_json."""
    resp = await client.post(
        f"{API}/auth/register", data=raw, headers={"Content-Type": "application/json"}
    )
    await _error(resp, 400, "invalid_json")


# -- POST /auth/login --------------------------------------------------------------------


async def _assert_token_response(client: TestClient, resp: Any, username: str) -> str:
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert body["token_type"] == "bearer"
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == body["expires_in"]
    me = await client.get(f"{API}/auth/me", headers=auth_headers(body["access_token"]))
    assert (await me.json())["username"] == username
    return body["access_token"]


async def test_login_with_json(client):
    """JSON credentials give a bearer token that works, with expires_in matching its exp."""
    await register(client, "alice")
    resp = await client.post(f"{API}/auth/login", json={"username": "alice", "password": PASSWORD})
    await _assert_token_response(client, resp, "alice")


async def test_login_with_oauth2_form(client):
    """An OAuth2 password form (grant_type=password, scope) logs in like JSON does."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "password", "username": "alice", "password": PASSWORD, "scope": ""},
    )
    await _assert_token_response(client, resp, "alice")


async def test_login_with_form_without_grant_type(client):
    """A form with only username and password is accepted too."""
    await register(client, "alice")
    resp = await client.post(f"{API}/auth/login", data={"username": "alice", "password": PASSWORD})
    await _assert_token_response(client, resp, "alice")


async def test_login_with_json_sent_as_form_content_type(client):
    """JSON posted with a form Content-Type (curl -d) is still read as JSON."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/login",
        data=b'{"username": "alice", "password": "%s"}' % PASSWORD.encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    await _assert_token_response(client, resp, "alice")


async def test_login_form_with_other_grant_type_is_rejected(client):
    """grant_type other than "password" is not a password login."""
    await register(client, "alice")
    resp = await client.post(
        f"{API}/auth/login",
        data={"grant_type": "client_credentials", "username": "alice", "password": PASSWORD},
    )
    error = await _error(resp, 422)
    assert "grant_type" in error["fields"]


async def test_login_form_missing_password_is_422(client):
    """A form without a password is 422."""
    resp = await client.post(f"{API}/auth/login", data={"username": "alice"})
    error = await _error(resp, 422)
    assert "password" in error["fields"]


@pytest.mark.parametrize("form", [False, True])
async def test_login_wrong_password_is_401(client, form):
    """A wrong password is 401 invalid_credentials, as JSON and as a form."""
    await register(client, "alice")
    creds = {"username": "alice", "password": PASSWORD + "x"}
    resp = await client.post(f"{API}/auth/login", **({"data": creds} if form else {"json": creds}))
    error = await _error(resp, 401, "invalid_credentials")
    assert "access_token" not in await resp.text()
    assert error["fields"] == {}


@pytest.mark.parametrize("form", [False, True])
async def test_login_unknown_user_is_401_same_as_wrong_password(client, form):
    """An unknown user gets the same 401 body as a wrong password (no user enumeration)."""
    await register(client, "alice")
    kw = "data" if form else "json"
    unknown = await client.post(
        f"{API}/auth/login", **{kw: {"username": "nobody", "password": PASSWORD}}
    )
    wrong = await client.post(
        f"{API}/auth/login", **{kw: {"username": "alice", "password": "wrong-password"}}
    )
    assert await _error(unknown, 401, "invalid_credentials") == await _error(wrong, 401)


@pytest.mark.parametrize(
    "body",
    [{"username": "alice"}, {"password": PASSWORD}, {"username": 1, "password": PASSWORD}],
)
async def test_login_invalid_json_body_is_422(client, body):
    """Missing or non-string credentials in JSON are 422."""
    resp = await client.post(f"{API}/auth/login", json=body)
    await _error(resp, 422, "validation_error")


async def test_login_broken_json_is_400(client):
    """A login body that is not JSON is 400 invalid_json."""
    resp = await client.post(
        f"{API}/auth/login", data=b"{nope", headers={"Content-Type": "application/json"}
    )
    await _error(resp, 400, "invalid_json")


# -- GET /auth/me and POST /auth/refresh -------------------------------------------------


async def test_me_returns_the_caller(client):
    """/auth/me answers {id, username} of the token's user."""
    resp = await client.post(
        f"{API}/auth/register", json={"username": "alice", "password": PASSWORD}
    )
    created = await resp.json()
    token = await register(client, "bob")
    alice = await client.post(f"{API}/auth/login", json={"username": "alice", "password": PASSWORD})
    alice_token = (await alice.json())["access_token"]
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(alice_token))
    assert resp.status == 200
    assert await resp.json() == created
    resp = await client.get(f"{API}/auth/me", headers=auth_headers(token))
    assert (await resp.json())["username"] == "bob"


async def test_me_without_token_is_401(client):
    """/auth/me without a token is 401."""
    await _error(await client.get(f"{API}/auth/me"), 401, "missing_token")


async def test_refresh_returns_a_working_token(client):
    """/auth/refresh gives a fresh bearer token for the same user that works on /auth/me."""
    token = await register(client, "alice")
    resp = await client.post(f"{API}/auth/refresh", headers=auth_headers(token))
    fresh = await _assert_token_response(client, resp, "alice")
    old, new = (jwt.decode(t, SECRET, algorithms=["HS256"]) for t in (token, fresh))
    assert new["sub"] == old["sub"]
    assert new["exp"] >= old["exp"]


async def test_refresh_without_token_is_401(client):
    """/auth/refresh needs a valid token."""
    await _error(await client.post(f"{API}/auth/refresh"), 401)
    resp = await client.post(f"{API}/auth/refresh", headers=auth_headers("x.y.z"))
    await _error(resp, 401, "invalid_token")


# -- POST /tasks -------------------------------------------------------------------------


async def test_create_external_task(client):
    """An external task is 201, pending, seq 1, with its params, and the full task shape."""
    token = await register(client, "alice")
    resp = await client.post(
        f"{API}/tasks",
        json={"kind": "render", "params": {"frames": 10, "name": "x"}},
        headers=auth_headers(token),
    )
    assert resp.status == 201, await resp.text()
    task = await resp.json()
    assert set(task) == TASK_KEYS
    assert task["kind"] == "render"
    assert task["params"] == {"frames": 10, "name": "x"}
    assert (task["status"], task["progress"], task["seq"]) == ("pending", 0, 1)
    assert task["result"] is None and task["error"] is None
    assert task["started_at"] is None and task["finished_at"] is None
    assert task["created_at"] == task["updated_at"]
    assert await _get_task(client, token, task["id"]) == task
    events = await _events(client, token, task["id"])
    assert [(e["seq"], e["event"], e["status"]) for e in events] == [(1, "created", "pending")]


async def test_create_task_params_default_to_empty(client):
    """Params may be left out: they default to {}."""
    token = await register(client, "alice")
    resp = await client.post(f"{API}/tasks", json={"kind": "x"}, headers=auth_headers(token))
    assert resp.status == 201
    assert (await resp.json())["params"] == {}


async def test_create_task_stays_pending_for_external_kind(client):
    """An external task is driven by its owner only: nothing runs it."""
    token = await register(client, "alice")
    task = await create_task(client, token, "external")
    await client.app[jobs_key].wait_idle()
    assert (await _get_task(client, token, task["id"]))["status"] == "pending"


async def test_create_stock_analysis_task(client):
    """kind stock_analysis with a valid code is 201 and its code is upper-cased."""
    token = await register(client, "alice")
    task = await create_task(client, token, "stock_analysis", {"code": "aapl"})
    assert task["kind"] == "stock_analysis"
    assert task["params"] == {"code": "AAPL"}


BAD_STOCK_PARAMS: list[Any] = [
    {"code": "12345"},
    {"code": "1234567"},
    {"code": "abcdefghijk"},
    {"code": "..."},
    {"code": "60051x"},
    {"code": "600519\n"},
    {"code": "\u0666\u0660\u0660\u0665\u0661\u0669"},  # Arabic-Indic digits
    {"code": ""},
    {"code": 600519},
    {"code": None},
    {},
    {"code": "600519", "extra": 1},
]


async def test_create_stock_analysis_with_invalid_code_is_422_and_stores_nothing(client):
    """Every bad stock code is 422 naming params' field, and no task is stored."""
    token = await register(client, "alice")
    for params in BAD_STOCK_PARAMS:
        resp = await client.post(
            f"{API}/tasks",
            json={"kind": "stock_analysis", "params": params},
            headers=auth_headers(token),
        )
        error = await _error(resp, 422, "validation_error", params)
        assert error["fields"], params
    assert await _list(client, token) == []


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


BAD_CREATE_BODIES: list[Any] = [
    {"kind": ""},
    {"kind": "has space"},
    {"kind": "x" * 65},
    {"kind": "bad\n"},
    {"kind": "ok\nbad"},
    {"kind": 5},
    {"kind": None},
    {"params": {}},
    {"kind": "x", "params": []},
    {"kind": "x", "params": "a=b"},
    {"kind": "x", "params": None},
    {"kind": "x", "params": {}, "owner": 2},
    {"kind": "x", "params": {"blob": "x" * 65536}},  # over --max-json-bytes once serialised
    {"kind": "x", "params": {"emoji": "\U0001f600" * 16384}},  # 64 KiB of UTF-8
    {"kind": "x", "params": {"deep": _nested(33)}},  # over --max-json-depth
]


async def test_create_task_invalid_is_422_and_stores_nothing(client):
    """A bad kind, bad params or an unknown field is 422 and nothing is stored."""
    token = await register(client, "alice")
    for body in BAD_CREATE_BODIES:
        resp = await client.post(f"{API}/tasks", json=body, headers=auth_headers(token))
        error = await _error(resp, 422, "validation_error", body)
        assert error["fields"], body
    assert await _list(client, token) == []


async def test_create_task_invalid_json_is_400(client):
    """POST /tasks with broken JSON is 400 and stores nothing."""
    token = await register(client, "alice")
    resp = await client.post(
        f"{API}/tasks",
        data=b'{"kind": ',
        headers={**auth_headers(token), "Content-Type": "application/json"},
    )
    await _error(resp, 400, "invalid_json")
    assert await _list(client, token) == []


async def test_create_task_needs_a_token(client):
    """POST /tasks without a token is 401."""
    resp = await client.post(f"{API}/tasks", json={"kind": "x"})
    await _error(resp, 401)


# -- POST /stock/analyze and the built-in job --------------------------------------------


async def test_analyze_six_digit_code(client):
    """POST /stock/analyze with a 6-digit code creates a stock_analysis task."""
    token = await register(client, "alice")
    resp = await _analyze(client, token, "600519")
    assert resp.status == 201, await resp.text()
    task = await resp.json()
    assert set(task) == TASK_KEYS
    assert task["kind"] == "stock_analysis"
    assert task["params"] == {"code": "600519"}


async def test_analyze_ticker_is_upper_cased(client):
    """A ticker with a dot like "brk.b" is accepted and stored upper-cased."""
    token = await register(client, "alice")
    resp = await _analyze(client, token, "brk.b")
    assert resp.status == 201, await resp.text()
    task = await resp.json()
    assert task["params"] == {"code": "BRK.B"}
    assert (await _get_task(client, token, task["id"]))["params"] == {"code": "BRK.B"}


async def test_analyze_invalid_is_422_and_stores_nothing(client):
    """An invalid code (or an unknown field) is 422 and no task is stored."""
    token = await register(client, "alice")
    bodies: list[Any] = [
        {"code": "12345"},
        {"code": "abc-d"},
        {"code": "toolongticker"},
        {"code": "600519 "},
        {"code": " AAPL"},
        {"code": "600519\n"},
        {"code": 600519},
        {"code": ["AAPL"]},
        {},
        {"code": "AAPL", "kind": "other"},
    ]
    for body in bodies:
        resp = await client.post(f"{API}/stock/analyze", json=body, headers=auth_headers(token))
        error = await _error(resp, 422, "validation_error", body)
        assert error["fields"], body
    assert await _list(client, token) == []


async def test_analyze_needs_a_token(client):
    """POST /stock/analyze without a token is 401."""
    await _error(await client.post(f"{API}/stock/analyze", json={"code": "AAPL"}), 401)


async def test_builtin_job_runs_to_completion(client):
    """The built-in job completes with indicators, a signal and data_source "synthetic"."""
    token = await register(client, "alice")
    task = await (await _analyze(client, token, "600519")).json()

    async def finished() -> bool:
        return (await _get_task(client, token, task["id"]))["status"] == "completed"

    await eventually(finished)
    done = await _get_task(client, token, task["id"])
    assert done["progress"] == 100
    assert done["error"] is None
    assert done["started_at"] and done["finished_at"]
    result = done["result"]
    assert result["code"] == "600519"
    assert result["data_source"] == "synthetic"
    assert result["signal"] in ("buy", "hold", "sell")
    indicators = result["indicators"]
    assert set(indicators["ma"]) == {"ma5", "ma10", "ma20"}
    assert all(isinstance(v, int | float) for v in indicators["ma"].values())
    assert 0 <= indicators["rsi14"] <= 100
    assert {"macd", "signal", "histogram"} <= set(indicators["macd"])

    events = await _events(client, token, task["id"])
    _assert_contiguous(events)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["created", "started"]
    assert kinds[-1] == "completed"
    assert set(kinds[2:-1]) == {"progress"}
    progresses = [e["progress"] for e in events if e["event"] == "progress"]
    assert progresses == sorted(progresses)
    assert events[-1]["result"] == result
    assert done["seq"] == events[-1]["seq"]


async def test_builtin_job_is_deterministic(client):
    """The same code gives the same (synthetic) result twice."""
    token = await register(client, "alice")
    ids = [(await (await _analyze(client, token, "AAPL")).json())["id"] for _ in range(2)]
    await client.app[jobs_key].wait_idle()
    first, second = [(await _get_task(client, token, i))["result"] for i in ids]
    assert first is not None and first == second


async def test_cancel_stops_a_running_builtin_job(aiohttp_client, make_app):
    """Cancelling a running built-in job stops it: no event follows `cancelled`."""
    step_delay = 0.2
    client = await aiohttp_client(
        make_app(job_step_delay=step_delay), server_kwargs={"shutdown_timeout": 0.5}
    )
    token = await register(client, "alice")
    task = await (await _analyze(client, token, "600519")).json()

    async def running() -> bool:
        return (await _get_task(client, token, task["id"]))["status"] == "running"

    await eventually(running)
    resp = await _write(client, token, task["id"], "cancel")
    assert resp.status == 200, await resp.text()
    seq = (await resp.json())["seq"]
    # The job's asyncio task ends (it may have been mid-step when the cancel landed).
    async with asyncio.timeout(TIMEOUT):
        await client.app[jobs_key].wait_idle()
    first = await _events(client, token, task["id"])
    await asyncio.sleep(2 * step_delay)  # longer than a step: a job still running would post
    second = await _events(client, token, task["id"])
    assert first == second
    assert first[-1]["event"] == "cancelled" and first[-1]["seq"] == seq
    assert first[-1]["status"] == "cancelled"
    _assert_contiguous(first)
    final = await _get_task(client, token, task["id"])
    assert final["status"] == "cancelled" and final["seq"] == seq
    assert final["result"] is None and final["finished_at"]


# -- GET /tasks --------------------------------------------------------------------------


async def _three_tasks(client: TestClient, token: str) -> dict[str, dict]:
    """pending, running and completed external tasks, created in that order."""
    pending = await create_task(client, token, "a")
    running = await create_task(client, token, "b")
    await post_progress(client, token, running["id"], 10)
    completed = await create_task(client, token, "c")
    resp = await _write(client, token, completed["id"], "complete", {})
    assert resp.status == 200
    return {"pending": pending, "running": running, "completed": completed}


async def test_list_tasks_newest_first(client):
    """GET /tasks (default: any status) lists the caller's tasks, newest first."""
    token = await register(client, "alice")
    created = [await create_task(client, token, f"k{i}") for i in range(5)]
    tasks = await _list(client, token)
    assert [t["id"] for t in tasks] == [t["id"] for t in reversed(created)]
    assert all(set(t) == TASK_KEYS for t in tasks)
    assert [t["id"] for t in await _list(client, token, "any")] == [t["id"] for t in tasks]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("active", ["running", "pending"]),
        ("pending", ["pending"]),
        ("running", ["running"]),
        ("completed", ["completed"]),
        ("failed", []),
        ("cancelled", []),
        ("any", ["completed", "running", "pending"]),
    ],
)
async def test_list_tasks_by_status(client, status, expected):
    """status=active is pending+running; a single status filters; any lists all."""
    token = await register(client, "alice")
    by_status = await _three_tasks(client, token)
    tasks = await _list(client, token, status)
    assert [t["id"] for t in tasks] == [by_status[s]["id"] for s in expected]
    assert [t["status"] for t in tasks] == expected


async def test_list_tasks_only_the_callers(client):
    """Another user's tasks never show up in the list."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    mine = await create_task(client, alice, "x")
    await create_task(client, bob, "x")
    await _three_tasks(client, bob)
    for status in ("any", "active", "pending"):
        assert [t["id"] for t in await _list(client, alice, status)] == [mine["id"]]
    carol = await register(client, "carol")
    assert await _list(client, carol) == []


@pytest.mark.parametrize("status", ["bogus", "ACTIVE", "", "done"])
async def test_list_tasks_bad_status_is_422(client, status):
    """An unknown status filter is 422 naming the field."""
    token = await register(client, "alice")
    resp = await client.get(f"{API}/tasks", params={"status": status}, headers=auth_headers(token))
    error = await _error(resp, 422, "validation_error")
    assert "status" in error["fields"]


async def test_list_tasks_needs_a_token(client):
    """GET /tasks without a token is 401."""
    await _error(await client.get(f"{API}/tasks"), 401)


# -- GET /tasks/{id} ---------------------------------------------------------------------


async def test_get_task_missing_and_foreign_are_the_same_404(client):
    """A missing task and another user's task give the same 404 body."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    task = await create_task(client, alice)
    foreign = await client.get(f"{API}/tasks/{task['id']}", headers=auth_headers(bob))
    missing = await client.get(f"{API}/tasks/{'0' * 32}", headers=auth_headers(bob))
    assert await _error(foreign, 404, "not_found") == await _error(missing, 404, "not_found")
    assert task["id"] not in await foreign.text()
    # The owner still sees it.
    assert (await _get_task(client, alice, task["id"]))["id"] == task["id"]


async def test_get_task_needs_a_token(client):
    """GET /tasks/{id} without a token is 401, even for an existing task."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await _error(await client.get(f"{API}/tasks/{task['id']}"), 401)


# -- GET /tasks/{id}/events --------------------------------------------------------------


async def test_events_in_seq_order_without_gaps(client):
    """Events come in seq order: created=1, then +1 each, with the right fields."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    tid = task["id"]
    assert await post_progress(client, token, tid, 10, step="a", message="m1") == 3
    assert await post_progress(client, token, tid, 20.5) == 4
    resp = await _write(client, token, tid, "complete", {"result": {"ok": True}})
    assert (await resp.json()) == {"seq": 5}
    events = await _events(client, token, tid)
    _assert_contiguous(events)
    assert [(e["event"], e["status"]) for e in events] == [
        ("created", "pending"),
        ("started", "running"),
        ("progress", "running"),
        ("progress", "running"),
        ("completed", "completed"),
    ]
    assert all(e["task_id"] == tid and e["ts"] for e in events)
    assert (events[2]["progress"], events[2]["step"], events[2]["message"]) == (10, "a", "m1")
    assert events[3]["progress"] == 20.5
    assert events[4]["result"] == {"ok": True}
    assert all("result" not in e for e in events[:4])
    assert all("error" not in e for e in events)


async def test_events_after_seq_and_limit(client):
    """after_seq skips up to N; limit caps the count; both keep seq order."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    for p in range(1, 9):
        await post_progress(client, token, task["id"], p)
    # 1 created + 1 started + 8 progress = 10 events.
    assert [e["seq"] for e in await _events(client, token, task["id"])] == list(range(1, 11))
    assert [e["seq"] for e in await _events(client, token, task["id"], after_seq=4)] == list(
        range(5, 11)
    )
    got = await _events(client, token, task["id"], after_seq=2, limit=3)
    assert [e["seq"] for e in got] == [3, 4, 5]
    assert await _events(client, token, task["id"], after_seq=10) == []
    assert await _events(client, token, task["id"], after_seq=99) == []
    assert await _events(client, token, task["id"], after_seq=2**63 - 1) == []
    # Paging with after_seq = last seen seq reads everything exactly once.
    seen: list[int] = []
    while page := await _events(
        client, token, task["id"], after_seq=seen[-1] if seen else 0, limit=4
    ):
        seen += [e["seq"] for e in page]
    assert seen == list(range(1, 11))


async def test_events_bad_query_is_422(client):
    """A negative, huge or non-integer after_seq/limit is 422 (never a 500)."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    queries = [
        {"after_seq": "-1"},
        {"after_seq": "x"},
        {"after_seq": "1.5"},
        {"after_seq": "9" * 30},
        {"after_seq": str(2**63)},
        {"limit": "0"},
        {"limit": "abc"},
        {"limit": "-5"},
        {"limit": "9" * 30},
    ]
    for query in queries:
        resp = await client.get(
            f"{API}/tasks/{task['id']}/events", params=query, headers=auth_headers(token)
        )
        error = await _error(resp, 422, "validation_error", query)
        assert set(error["fields"]) == set(query), query


async def test_events_of_missing_or_foreign_task_are_404(client):
    """Events of another user's task are 404, the same as a missing task."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    task = await create_task(client, alice)
    foreign = await client.get(f"{API}/tasks/{task['id']}/events", headers=auth_headers(bob))
    missing = await client.get(f"{API}/tasks/nope/events", headers=auth_headers(bob))
    assert await _error(foreign, 404, "not_found") == await _error(missing, 404, "not_found")


# -- POST /tasks/{id}/progress -----------------------------------------------------------


async def test_first_progress_starts_the_task(client):
    """The first progress moves pending → running: a started event, then the progress event."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "progress", {"progress": 0})
    assert resp.status == 200
    assert await resp.json() == {"seq": 3}
    events = await _events(client, token, task["id"])
    assert [(e["seq"], e["event"]) for e in events] == [
        (1, "created"),
        (2, "started"),
        (3, "progress"),
    ]
    now = await _get_task(client, token, task["id"])
    assert (now["status"], now["seq"], now["progress"]) == ("running", 3, 0)
    assert now["started_at"] == events[1]["ts"]
    assert now["finished_at"] is None
    # The second progress adds exactly one event.
    assert await post_progress(client, token, task["id"], 100) == 4


async def test_progress_updates_step_and_message(client):
    """progress, step and message land on the task; step is kept when left out."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 12.5, step="download", message="1/8")
    now = await _get_task(client, token, task["id"])
    assert (now["progress"], now["step"], now["message"]) == (12.5, "download", "1/8")
    await post_progress(client, token, task["id"], 50)
    now = await _get_task(client, token, task["id"])
    assert (now["progress"], now["step"]) == (50, "download")


BAD_PROGRESS: list[Any] = [
    {"progress": -1},
    {"progress": -0.001},
    {"progress": 100.5},
    {"progress": 101},
    {"progress": 1e309},
    {"progress": "50"},
    {"progress": "NaN"},
    {"progress": "Infinity"},
    {"progress": True},
    {"progress": False},
    {"progress": None},
    {"progress": [50]},
    {"progress": {"value": 50}},
    {},
    {"step": "x"},
    {"progress": 5, "step": 7},
    {"progress": 5, "message": ["m"]},
    {"progress": 5, "step": "s" * 201},
    {"progress": 5, "status": "completed"},
]


async def test_progress_invalid_is_422_and_stores_nothing(client):
    """Out-of-range, non-number, bool, missing or unknown fields are 422; no event is stored."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    for body in BAD_PROGRESS:
        resp = await _write(client, token, task["id"], "progress", body)
        error = await _error(resp, 422, "validation_error", body)
        assert error["fields"], body
    assert len(await _events(client, token, task["id"])) == 1
    now = await _get_task(client, token, task["id"])
    assert (now["status"], now["seq"], now["progress"]) == ("pending", 1, 0)


async def test_progress_nan_literals_are_422(client):
    """Non-standard NaN/Infinity JSON literals (Python's json reads them) are 422, never stored."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    for raw in (b'{"progress": NaN}', b'{"progress": Infinity}', b'{"progress": -Infinity}'):
        resp = await _write(
            client,
            token,
            task["id"],
            "progress",
            data=raw,
            headers={"Content-Type": "application/json"},
        )
        error = await _error(resp, 422, "validation_error", raw)
        assert "progress" in error["fields"], raw
    assert len(await _events(client, token, task["id"])) == 1


async def test_progress_bounds_are_inclusive(client):
    """0 and 100 are valid progress values."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    assert await post_progress(client, token, task["id"], 0) == 3
    assert await post_progress(client, token, task["id"], 100) == 4
    assert (await _get_task(client, token, task["id"]))["status"] == "running"


async def test_progress_empty_body_is_400(client):
    """A progress post without a body is 400 invalid_json and stores nothing."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "progress")
    await _error(resp, 400, "invalid_json")
    assert len(await _events(client, token, task["id"])) == 1


# -- POST /tasks/{id}/complete, /fail, /cancel -------------------------------------------


async def test_complete_with_result(client):
    """complete with a result stores it, sets progress 100 and finished_at."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 30)
    result = {"rows": 3, "nested": {"a": [1, 2]}, "text": "ok"}
    resp = await _write(client, token, task["id"], "complete", {"result": result})
    assert resp.status == 200
    assert await resp.json() == {"seq": 4}
    done = await _get_task(client, token, task["id"])
    assert (done["status"], done["progress"], done["result"]) == ("completed", 100, result)
    assert done["finished_at"] and done["error"] is None
    last = (await _events(client, token, task["id"]))[-1]
    assert (last["event"], last["status"], last["result"]) == ("completed", "completed", result)


@pytest.mark.parametrize("body", [None, {}, {"result": None}])
async def test_complete_without_result(client, body):
    """complete with no body, {} or a null result completes the task."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 30)
    resp = await _write(client, token, task["id"], "complete", body)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"seq": 4}
    done = await _get_task(client, token, task["id"])
    assert done["status"] == "completed" and done["progress"] == 100


async def test_complete_pending_task_starts_it_first(client):
    """Completing a pending task records started, then completed."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "complete", {})
    assert await resp.json() == {"seq": 3}
    events = await _events(client, token, task["id"])
    assert [e["event"] for e in events] == ["created", "started", "completed"]


async def test_complete_invalid_is_422_and_stores_nothing(client):
    """A non-object result or an unknown field is 422 and the task is unchanged."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    for body in ({"result": [1, 2]}, {"result": "done"}, {"result": 1}, {"other": 1}):
        resp = await _write(client, token, task["id"], "complete", body)
        await _error(resp, 422, "validation_error", body)
    assert len(await _events(client, token, task["id"])) == 1
    assert (await _get_task(client, token, task["id"]))["status"] == "pending"


async def test_fail_records_the_error(client):
    """fail stores the error on the task and its failed event."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 40)
    resp = await _write(client, token, task["id"], "fail", {"error": "disk full"})
    assert resp.status == 200
    assert await resp.json() == {"seq": 4}
    failed = await _get_task(client, token, task["id"])
    assert (failed["status"], failed["error"], failed["progress"]) == ("failed", "disk full", 40)
    assert failed["finished_at"] and failed["result"] is None
    last = (await _events(client, token, task["id"]))[-1]
    assert (last["event"], last["status"], last["error"]) == ("failed", "failed", "disk full")
    assert "result" not in last


async def test_fail_needs_an_error(client):
    """fail without a non-empty string error is rejected and stores nothing."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "fail")
    await _error(resp, 400, "invalid_json")
    for body in ({}, {"error": ""}, {"error": 5}, {"error": None}, {"error": ["x"]}):
        resp = await _write(client, token, task["id"], "fail", body)
        error = await _error(resp, 422, "validation_error", body)
        assert "error" in error["fields"], body
    assert len(await _events(client, token, task["id"])) == 1
    assert (await _get_task(client, token, task["id"]))["status"] == "pending"


@pytest.mark.parametrize("body", [None, {}])
async def test_cancel(client, body):
    """cancel (empty body or {}) ends the task as cancelled with one event."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 5)
    resp = await _write(client, token, task["id"], "cancel", body)
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"seq": 4}
    now = await _get_task(client, token, task["id"])
    assert (now["status"], now["seq"]) == ("cancelled", 4)
    assert now["finished_at"]
    events = await _events(client, token, task["id"])
    assert (events[-1]["event"], events[-1]["status"]) == ("cancelled", "cancelled")


async def test_cancel_pending_task(client):
    """A pending task can be cancelled directly: created then cancelled."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "cancel")
    assert await resp.json() == {"seq": 2}
    events = await _events(client, token, task["id"])
    assert [e["event"] for e in events] == ["created", "cancelled"]


async def test_cancel_with_unknown_field_is_422(client):
    """cancel takes no fields: an unknown one is 422 and the task keeps running."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    resp = await _write(client, token, task["id"], "cancel", {"reason": "x"})
    await _error(resp, 422)
    assert (await _get_task(client, token, task["id"]))["status"] == "pending"


WRITES: list[tuple[str, dict[str, Any] | None]] = [
    ("progress", {"progress": 50}),
    ("complete", {"result": {"x": 1}}),
    ("complete", None),
    ("fail", {"error": "boom"}),
    ("cancel", None),
]


@pytest.mark.parametrize("finish", ["complete", "fail", "cancel"])
async def test_updates_after_a_terminal_state_are_409_and_store_nothing(client, finish):
    """After completed/failed/cancelled every update is 409 and the event count stays."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    await post_progress(client, token, task["id"], 10)
    body = {"error": "boom"} if finish == "fail" else None
    assert (await _write(client, token, task["id"], finish, body)).status == 200
    before = await _events(client, token, task["id"])
    snapshot = await _get_task(client, token, task["id"])
    for action, update in WRITES:
        resp = await _write(client, token, task["id"], action, update)
        error = await _error(resp, 409, "task_finished")
        assert snapshot["status"] in error["message"]
    assert await _events(client, token, task["id"]) == before
    assert await _get_task(client, token, task["id"]) == snapshot


@pytest.mark.parametrize(("action", "body"), WRITES)
async def test_writes_to_another_users_task_are_404(client, action, body):
    """Every write route answers 404 for another user's task and changes nothing."""
    alice = await register(client, "alice")
    bob = await register(client, "bob")
    task = await create_task(client, alice)
    foreign = await _write(client, bob, task["id"], action, body)
    missing = await _write(client, bob, "0" * 32, action, body)
    assert await _error(foreign, 404, "not_found") == await _error(missing, 404, "not_found")
    assert len(await _events(client, alice, task["id"])) == 1
    assert (await _get_task(client, alice, task["id"]))["status"] == "pending"


@pytest.mark.parametrize(("action", "body"), WRITES)
async def test_writes_need_a_token(client, action, body):
    """Every write route answers 401 without a token and changes nothing."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    kwargs = {} if body is None else {"json": body}
    resp = await client.post(f"{API}/tasks/{task['id']}/{action}", **kwargs)
    await _error(resp, 401)
    assert len(await _events(client, token, task["id"])) == 1


async def test_writes_to_a_missing_task_are_404(client):
    """progress on a task id that never existed is 404."""
    token = await register(client, "alice")
    resp = await _write(client, token, "does-not-exist", "progress", {"progress": 1})
    await _error(resp, 404, "not_found")


async def test_concurrent_progress_posts_get_distinct_contiguous_seqs(client):
    """Concurrent progress posts to one task get distinct seqs with no gap."""
    token = await register(client, "alice")
    task = await create_task(client, token)
    seqs = await asyncio.gather(*(post_progress(client, token, task["id"], p) for p in range(20)))
    assert sorted(seqs) == list(range(3, 23))
    events = await _events(client, token, task["id"])
    _assert_contiguous(events)
    assert [e["event"] for e in events].count("started") == 1


async def test_cancel_interrupts_a_builtin_job_mid_step(aiohttp_client, make_app):
    """A cancelled job stops inside its step wait instead of running the step to its end."""
    # With a 60 s step the job could only end within TIMEOUT if the cancel interrupted it.
    client = await aiohttp_client(
        make_app(job_step_delay=60.0), server_kwargs={"shutdown_timeout": 0.5}
    )
    token = await register(client, "alice")
    task = await (await _analyze(client, token, "AAPL")).json()

    async def running() -> bool:
        return (await _get_task(client, token, task["id"]))["status"] == "running"

    await eventually(running)
    resp = await _write(client, token, task["id"], "cancel")
    assert resp.status == 200, await resp.text()
    async with asyncio.timeout(TIMEOUT):
        await client.app[jobs_key].wait_idle()
    events = await _events(client, token, task["id"])
    assert [e["event"] for e in events] == ["created", "started", "progress", "cancelled"]


# -- CORS --------------------------------------------------------------------------------

FRONT = "http://front.example:3000"


def _preflight_headers(origin: str, method: str = "POST") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "Authorization, Content-Type",
    }


@pytest.fixture
async def cors_client(aiohttp_client, make_app):
    """A client of an app that allows FRONT as a cross-origin front end."""
    return await aiohttp_client(
        make_app(allowed_origins=(FRONT,)), server_kwargs={"shutdown_timeout": 0.5}
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/tasks"), ("GET", "/tasks"), ("POST", "/auth/login"), ("GET", "/tasks/x/events")],
)
async def test_cors_preflight_from_allowed_origin(cors_client, method, path):
    """A preflight from a configured origin is allowed, with Authorization and Content-Type."""
    resp = await cors_client.options(f"{API}{path}", headers=_preflight_headers(FRONT, method))
    assert resp.status == 200, await resp.text()
    assert resp.headers["Access-Control-Allow-Origin"] == FRONT
    assert method in resp.headers["Access-Control-Allow-Methods"]
    allowed = resp.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


async def test_cors_actual_request_from_allowed_origin(cors_client):
    """Responses to a configured origin carry Access-Control-Allow-Origin, errors too."""
    token = await register(cors_client, "alice")
    resp = await cors_client.get(f"{API}/tasks", headers={**auth_headers(token), "Origin": FRONT})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == FRONT
    # A browser front end must be able to read a 401 body to know it should log in again.
    resp = await cors_client.get(f"{API}/tasks", headers={"Origin": FRONT})
    assert resp.status == 401
    assert resp.headers["Access-Control-Allow-Origin"] == FRONT
    assert "*" not in resp.headers.getall("Access-Control-Allow-Origin")


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "http://front.example",
        "http://front.example:3001",
        "https://front.example:3000",
        "http://front.example:3000.evil.example",
        "http://evil.example/http://front.example:3000",
        "null",
    ],
)
async def test_cors_other_origin_is_not_allowed(cors_client, origin):
    """A preflight or request from any other origin gets no Access-Control-Allow-Origin."""
    resp = await cors_client.options(f"{API}/tasks", headers=_preflight_headers(origin))
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.status >= 400
    assert resp.content_type == "application/json"
    token = await register(cors_client, "alice")
    resp = await cors_client.get(f"{API}/tasks", headers={**auth_headers(token), "Origin": origin})
    assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize("origin", ["http://evil.example", FRONT, "null"])
async def test_cors_default_config_allows_no_foreign_origin(client, origin):
    """With the default config no foreign origin gets a CORS allow header."""
    resp = await client.options(f"{API}/tasks", headers=_preflight_headers(origin))
    assert "Access-Control-Allow-Origin" not in resp.headers
    token = await register(client, "alice")
    resp = await client.get(f"{API}/tasks", headers={**auth_headers(token), "Origin": origin})
    assert resp.status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.post(
        f"{API}/auth/login",
        json={"username": "alice", "password": PASSWORD},
        headers={"Origin": origin},
    )
    assert "Access-Control-Allow-Origin" not in resp.headers
