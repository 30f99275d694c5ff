"""Property-based attacks on a real server process: arbitrary JSON, non-JSON text and bytes
against every HTTP route and every WebSocket action.

Each property holds for every input hypothesis draws: the reply is a valid reply or a
well-formed error (HTTP: a 4xx with the documented error body, never a 5xx; WebSocket: an
`error` message, and the socket still answers a ping), every reply is strict JSON (no NaN,
no lone surrogates: a browser's JSON.parse must read it), an invalid request stores no row
(counted in SQLite itself), and the server never logs a traceback or an internal error.

One server serves the whole module (started once, in a subprocess), and the tests talk to
it with blocking clients, so hypothesis drives plain functions: no event loop per example.
FUZZ_EXAMPLES=2000 in the environment runs a longer search than the default 150 per test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .helpers import PASSWORD, SECRET, TIMEOUT
from .server_process import ServerProcess

FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    database=None,  # no .hypothesis folder in the work tree; failures print their example
    suppress_health_check=[HealthCheck.too_slow],
)

#: Log lines that would mean a request reached a code path it should not.
BAD_LOG_MARKERS = ("Traceback", "internal_error", "handler_error", "batch_failed", "commit_failed")

API = "/api/v1"


# -- the server under attack --------------------------------------------------------------


@dataclass
class Live:
    """The running server and the users and tasks the attacks aim at."""

    server: ServerProcess
    token: str = ""
    #: Another user: its token on our tasks, our token on its task.
    other_token: str = ""
    #: An unfinished external task of the HTTP fuzzer (replaced when a fuzz input ends it).
    own_task: str = ""
    foreign_task: str = ""
    #: The WebSocket fuzzer owns exactly this task (with a few events), and nothing else.
    ws_token: str = ""
    ws_task: str = ""
    #: Bytes of the server log already checked by `assert_alive_and_log_clean`.
    log_offset: int = 0
    sockets: dict[str, ClientConnection] = field(default_factory=dict)
    #: Closes the sockets at the end of the module.
    stack: ExitStack = field(default_factory=ExitStack)

    @property
    def db_path(self) -> Path:
        assert self.server.db_path is not None
        return self.server.db_path

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str, bytes]:
        """One blocking HTTP request on a fresh connection: (status, content type, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read()
        finally:
            conn.close()

    def call(self, method: str, path: str, token: str | None = None, body: Any = None) -> Any:
        """A well-formed JSON call that must succeed; returns the decoded body."""
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        raw = None if body is None else json.dumps(body).encode()
        status, _, data = self.request(method, path, raw, headers)
        assert 200 <= status < 300, (method, path, status, data)
        return json.loads(data)

    def new_task(self, token: str) -> str:
        return self.call("POST", f"{API}/tasks", token, {"kind": "external", "params": {}})["id"]

    def register(self, name: str) -> str:
        creds = {"username": name, "password": PASSWORD}
        self.call("POST", f"{API}/auth/register", body=creds)
        return self.call("POST", f"{API}/auth/login", body=creds)["access_token"]

    def assert_alive_and_log_clean(self) -> None:
        proc = self.server.proc
        assert proc is not None and proc.poll() is None, self.server.output()
        with self.server.logs[-1].open("rb") as log:
            log.seek(self.log_offset)
            raw = log.read()
        self.log_offset += len(raw)
        new = raw.decode("utf-8", "replace")
        for marker in BAD_LOG_MARKERS:
            assert marker not in new, new

    def socket(self, path: str) -> ClientConnection:
        """A WebSocket kept open across examples (one per endpoint)."""
        ws = self.sockets.get(path)
        if ws is None:
            ws = self.stack.enter_context(
                connect(
                    f"{self.server.ws_url}{path}",
                    additional_headers={"Authorization": f"Bearer {self.ws_token}"},
                    proxy=None,
                    open_timeout=TIMEOUT,
                )
            )
            self.sockets[path] = ws
        return ws


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, unused_tcp_port_factory: Any) -> Iterator[Live]:
    """One server for the module; a built-in job never gets past its first step."""
    tmp = tmp_path_factory.mktemp("properties")
    server = ServerProcess(
        tmp,
        unused_tcp_port_factory(),
        tmp / "app.db",
        # No rate limits: hypothesis sends hundreds of messages a second on one socket.
        [
            "--jwt-secret",
            SECRET,
            "--job-step-delay",
            "3600",
            "--sqlite-synchronous",
            "NORMAL",
            "--ws-rate",
            "0",
            "--task-rate",
            "0",
            "--auth-rate",
            "0",
        ],
    )
    live = Live(server)
    try:
        asyncio.run(server.start())
        live.token = live.register("fuzzer")
        live.other_token = live.register("bystander")
        live.ws_token = live.register("wsfuzzer")
        live.own_task = live.new_task(live.token)
        live.foreign_task = live.new_task(live.other_token)
        live.ws_task = live.new_task(live.ws_token)
        for progress in (10, 20):
            live.call(
                "POST",
                f"{API}/tasks/{live.ws_task}/progress",
                live.ws_token,
                {"progress": progress},
            )
        yield live
    finally:
        live.stack.close()
        server.close()


def row_counts(db_path: Path) -> dict[str, int]:
    """Rows a request could add. Built-in jobs write on their own, so their events are not
    counted (their tasks are: only a valid request creates one)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=TIMEOUT)) as db:
        return {
            "users": db.execute("SELECT COUNT(*) FROM users").fetchone()[0],
            "tasks": db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0],
            "task_events": db.execute(
                "SELECT COUNT(*) FROM task_events WHERE task_id IN"
                " (SELECT id FROM tasks WHERE kind != 'stock_analysis')"
            ).fetchone()[0],
        }


def strict_json(data: str | bytes) -> Any:
    """Decode as standard JSON (RFC 8259): no NaN/Infinity, and text that is valid UTF-8."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"non-standard JSON constant {constant} in {data[:200]!r}")

    value = json.loads(data, parse_constant=refuse)
    json.dumps(value, ensure_ascii=False).encode("utf-8")  # lone surrogates raise here
    return value


def assert_http_reply(
    status: int, content_type: str, body: bytes, before: dict[str, int], after: dict[str, int]
) -> Any:
    """A 2xx with a JSON body, or a 4xx with the error body and nothing stored."""
    assert status < 500, (status, body[:500])
    assert content_type.startswith("application/json"), (status, content_type, body[:200])
    data = strict_json(body)
    if status >= 400:
        assert list(data) == ["error"], data
        error = data["error"]
        assert set(error) == {"code", "message", "fields"}, error
        assert isinstance(error["code"], str) and error["code"], error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["fields"], dict), error
        assert after == before, (status, error, before, after)
    else:
        assert 200 <= status < 300, status
    return data


# -- strategies ---------------------------------------------------------------------------

#: Any code point, lone surrogates included (they survive json.dumps as \udxxx escapes).
ANY_CHAR = st.characters(exclude_categories=())
TEXT = st.text(ANY_CHAR, max_size=20) | st.sampled_from(["\ud800", "a\udfffb", "\x00", ""])
#: Header values aiohttp's HTTP parser takes (control characters are refused there, before
#: the application, with a plain-text 400): printable ASCII and Latin-1 (sent as raw bytes).
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E)
    | st.characters(min_codepoint=0xA0, max_codepoint=0xFF),
    max_size=40,
)

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 100, 101, 2**63, -(2**63) - 1, 10**400])
    | st.floats()  # NaN and ±Infinity included: Python writes and reads them
    | TEXT
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(ANY_CHAR, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

#: A valid body per route; the fuzz keeps some of its fields and replaces or adds others,
#: so inputs get past the JSON checks and reach the schemas, the tracker and SQLite.
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/auth/register": {"username": "newuser", "password": PASSWORD},
    "/auth/login": {"username": "fuzzer", "password": PASSWORD},
    "/tasks": {"kind": "external", "params": {"n": 1}},
    "/stock/analyze": {"code": "AAPL"},
    "/tasks/{task}/progress": {"progress": 50, "step": "s", "message": "m"},
    "/tasks/{task}/complete": {"result": {"ok": True}},
    "/tasks/{task}/fail": {"error": "boom"},
    "/tasks/{task}/cancel": {},
}
PLAUSIBLE = st.sampled_from(
    [0, 50, 99.5, 100, 100.5, -1, "fuzzer", PASSWORD, "stock_analysis", "600519", {}, "x" * 201]
)


#: Values that have broken JSON servers: non-standard numbers, lone surrogates (the UTF-8
#: codec refuses them), numbers too big for a float or for SQLite, NUL, deep nesting.
NASTY = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        "\ud800",
        "long enough \udfff",
        "\x00",
        10**400,
        2**63,
        -(2**63) - 1,
        1e308,
        5e-324,
        "",
        True,
        None,
        [],
        [[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]],
    ]
)
#: NASTY alone, inside an object (as a value or a key) or inside a list.
NASTY_NESTED = (
    NASTY
    | st.builds(lambda v: {"k": v}, NASTY)
    | st.builds(lambda v: {"outer": [1, {"inner": v}]}, NASTY)
    | st.sampled_from([{"\ud800": 1}, {"a\udfffb": {"c": 1}}])
)


def near_valid(template: str) -> st.SearchStrategy[dict[str, Any]]:
    """The route's valid body with a field dropped and some replaced by anything."""
    base = VALID_BODIES[template]
    names = sorted(base) + ["extra"]
    fresh_name = st.from_regex(r"\Au[a-z0-9]{10}\Z")  # register: a 201 stores a user
    return st.builds(
        lambda dropped, replaced, name: {
            **{k: v for k, v in base.items() if k not in dropped},
            **({"username": name} if template == "/auth/register" else {}),
            **replaced,
        },
        st.sets(st.sampled_from(names), max_size=1),
        st.dictionaries(
            st.sampled_from(names), NASTY_NESTED | PLAUSIBLE | JSON_VALUES, min_size=1, max_size=2
        ),
        fresh_name,
    )


CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
    ]
) | HEADER_TEXT.map(lambda s: s or None)

#: Every HTTP route: method and path under /api/v1 ({task} is a task id).
ROUTES: list[tuple[str, str]] = [
    ("POST", "/auth/register"),
    ("POST", "/auth/login"),
    ("POST", "/auth/refresh"),
    ("GET", "/auth/me"),
    ("POST", "/tasks"),
    ("GET", "/tasks"),
    ("POST", "/stock/analyze"),
    ("GET", "/tasks/{task}"),
    ("GET", "/tasks/{task}/events"),
    ("POST", "/tasks/{task}/progress"),
    ("POST", "/tasks/{task}/complete"),
    ("POST", "/tasks/{task}/fail"),
    ("POST", "/tasks/{task}/cancel"),
    ("GET", "/subscriptions"),
]
ROUTE = st.sampled_from(ROUTES)
#: Sometimes another method than the route's own (405), or a CORS preflight.
METHOD = st.none() | st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
AUTH = st.sampled_from(["own", "own", "own", "other", "none"]) | HEADER_TEXT
TASK_CHOICE = st.sampled_from(["own", "own", "foreign", "missing"]) | st.text(ANY_CHAR, max_size=40)


def _headers(live: Live, auth: str, content_type: str | None) -> dict[str, str]:
    headers = {} if content_type is None else {"Content-Type": content_type}
    if auth == "own":
        headers["Authorization"] = f"Bearer {live.token}"
    elif auth == "other":
        headers["Authorization"] = f"Bearer {live.other_token}"
    elif auth != "none":
        headers["Authorization"] = auth
    return headers


def _task_id(live: Live, choice: str) -> str:
    return {
        "own": live.own_task,
        "foreign": live.foreign_task,
        "missing": uuid.uuid4().hex,
    }.get(choice, choice)


def _fuzz_http(
    live: Live,
    route: tuple[str, str],
    method: str | None,
    auth: str,
    task_choice: str,
    content_type: str | None,
    body: bytes | None,
    query: str = "",
) -> None:
    """Send one request and check the properties; replace the own task if it was ended."""
    verb, template = route
    task_id = _task_id(live, task_choice)
    path = API + template.format(task=quote(task_id, safe="", errors="surrogatepass"))
    before = row_counts(live.db_path)
    status, ctype, data = live.request(
        method or verb, path + query, body, _headers(live, auth, content_type)
    )
    after = row_counts(live.db_path)
    assert_http_reply(status, ctype, data, before, after)
    if (
        200 <= status < 300
        and task_id == live.own_task
        and template.endswith(("/complete", "/fail", "/cancel"))
    ):
        live.own_task = live.new_task(live.token)
    live.assert_alive_and_log_clean()


def _encode(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False with lone surrogates gives bytes that are not UTF-8 (CESU-8).
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# -- HTTP ---------------------------------------------------------------------------------


@FUZZ
@given(
    route=ROUTE,
    method=METHOD,
    auth=AUTH,
    task_choice=TASK_CHOICE,
    content_type=CONTENT_TYPES,
    value=JSON_VALUES,
    ascii_only=st.booleans(),
)
def test_http_json_bodies(
    live: Live,
    route: tuple[str, str],
    method: str | None,
    auth: str,
    task_choice: str,
    content_type: str | None,
    value: Any,
    ascii_only: bool,
) -> None:
    """Any JSON value as the body of any route: a valid reply or a well-formed 4xx."""
    _fuzz_http(live, route, method, auth, task_choice, content_type, _encode(value, ascii_only))


@pytest.mark.parametrize("template", sorted(VALID_BODIES))
@settings(FUZZ, max_examples=max(10, FUZZ.max_examples // 3))
@given(data=st.data(), ascii_only=st.booleans())
def test_http_near_valid_bodies(
    live: Live, template: str, data: st.DataObject, ascii_only: bool
) -> None:
    """Valid bodies with a field dropped or replaced by any JSON (NaN, lone surrogates, huge
    numbers, nesting): stored only when valid, and every reply is strict JSON."""
    route = ("POST", template)
    body = data.draw(near_valid(template), label="body")
    auth = data.draw(st.sampled_from(["own", "own", "own", "other"]), label="auth")
    task_choice = data.draw(st.sampled_from(["own", "own", "foreign", "missing"]), label="task")
    _fuzz_http(live, route, None, auth, task_choice, "application/json", _encode(body, ascii_only))


@FUZZ
@given(
    route=ROUTE,
    auth=AUTH,
    task_choice=TASK_CHOICE,
    content_type=CONTENT_TYPES,
    body=st.none()
    | st.binary(max_size=300)
    | st.text(ANY_CHAR, max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass"))
    | st.sampled_from([b"{", b"[]", b"null", b'{"progress": 5', b"\xff\xfe{}", b"\x00" * 8]),
)
def test_http_raw_bodies(
    live: Live,
    route: tuple[str, str],
    auth: str,
    task_choice: str,
    content_type: str | None,
    body: bytes | None,
) -> None:
    """Any bytes (or none) on any route: a valid reply or a well-formed 4xx, no stored row."""
    _fuzz_http(live, route, None, auth, task_choice, content_type, body)


QUERY_VALUE = (
    st.integers().map(str)
    | st.sampled_from(["0", "1", "-1", "500", "501", "1000", "1001", str(2**63), "1e3", "NaN"])
    | st.sampled_from(["any", "active", "pending", "running", "completed", "failed", "cancelled"])
    | st.text(ANY_CHAR, max_size=12)
)
QUERY_KEY = st.sampled_from(["after_seq", "limit", "status", "token", "last_seq"]) | st.text(
    max_size=6
)


@FUZZ
@given(
    route=st.sampled_from(
        [("GET", "/tasks"), ("GET", "/tasks/{task}/events"), ("GET", "/subscriptions")]
    ),
    task_choice=TASK_CHOICE,
    pairs=st.lists(st.tuples(QUERY_KEY, QUERY_VALUE), max_size=4),
)
def test_http_query_strings(
    live: Live, route: tuple[str, str], task_choice: str, pairs: list[tuple[str, str]]
) -> None:
    """Any query string (repeated keys, huge or non-numeric after_seq/limit, any status)."""
    query = "?" + urlencode(pairs, encoding="utf-8", errors="surrogatepass") if pairs else ""
    _fuzz_http(live, route, None, "own", task_choice, None, None, query)


@pytest.mark.parametrize(
    ("template", "raw", "field_name"),
    [
        ("/tasks", b'{"kind": "x", "params": {"a": NaN}}', "params"),
        ("/tasks", b'{"kind": "x", "params": {"\\ud800": 1}}', "params"),
        ("/tasks/{task}/progress", b'{"progress": 5, "step": "\\udfff"}', "step"),
        ("/tasks/{task}/progress", b'{"progress": 5, "message": "a\\ud800b"}', "message"),
        ("/tasks/{task}/complete", b'{"result": {"x": [Infinity]}}', "result"),
        ("/tasks/{task}/fail", b'{"error": "\\ud800"}', "error"),
        ("/auth/register", b'{"username": "surrogate", "password": "12345678\\ud800"}', "password"),
        ("/auth/login", b'{"username": "\\ud800", "password": "x"}', "username"),
    ],
)
def test_http_values_that_are_not_json_text_are_422(
    live: Live, template: str, raw: bytes, field_name: str
) -> None:
    """NaN/Infinity inside objects and lone surrogates anywhere: 422 naming the field, not a
    stored NaN (unreadable by browsers) or a 500/503 from SQLite's UTF-8 encoder."""
    path = API + template.format(task=live.own_task)
    before = row_counts(live.db_path)
    status, ctype, data = live.request("POST", path, raw, _headers(live, "own", "application/json"))
    error = assert_http_reply(status, ctype, data, before, row_counts(live.db_path))["error"]
    assert (status, error["code"]) == (422, "validation_error"), error
    assert field_name in error["fields"], error
    live.assert_alive_and_log_clean()


def test_http_deeply_nested_json_is_a_client_error(live: Live) -> None:
    """JSON nested deeper than the parser's recursion limit is a 400, not a 500."""
    for route in ROUTES:
        for body in (b"[" * 100_000, b'{"params":' * 50_000 + b"1" + b"}" * 50_000):
            _fuzz_http(live, route, None, "own", "own", "application/json", body)


# -- WebSocket ----------------------------------------------------------------------------

ACTIONS = ["ping", "subscribe", "unsubscribe", "get_status"]


def assert_ws_reply(message: Any, own_task: str) -> None:
    """A message the protocol defines, about the caller's own task only."""
    assert isinstance(message, dict), message
    kind = message.get("type")
    if kind == "error":
        assert isinstance(message["code"], str) and message["code"], message
        assert message["code"] != "internal", message
        assert isinstance(message["message"], str), message
        assert isinstance(message.get("fields", {}), dict), message
    elif kind == "pong":
        pass
    elif kind == "snapshot":
        assert message["task"]["id"] == own_task, message
        assert isinstance(message.get("recovered", False), bool), message
    elif kind == "event":
        assert message["task_id"] == own_task, message
        assert isinstance(message["seq"], int), message
    elif kind == "unsubscribed":
        assert isinstance(message["task_id"], str), message
    else:
        raise AssertionError(f"unexpected message {message!r}")
    if "id" in message:
        assert message["id"] is None or isinstance(message["id"], str | int | float), message


def exchange(live: Live, path: str, frame: str | bytes) -> list[dict[str, Any]]:
    """Send `frame`, then a ping; return what came before the pong (the socket must answer)."""
    ws = live.socket(path)
    before = row_counts(live.db_path)
    fence = f"fence-{uuid.uuid4().hex}"
    try:
        ws.send(frame)
        ws.send(json.dumps({"action": "ping", "id": fence}))
        replies = []
        while True:
            message = strict_json(ws.recv(timeout=TIMEOUT))
            if message == {"type": "pong", "id": fence}:
                break
            assert_ws_reply(message, live.ws_task)
            replies.append(message)
    except ConnectionClosed as exc:
        raise AssertionError(f"socket closed after {frame[:200]!r}: {exc}") from None
    assert row_counts(live.db_path) == before
    live.assert_alive_and_log_clean()
    return replies


WS_PATHS = st.sampled_from(["/api/v1/ws", "/api/v1/stock/ws/analyze/{task}"])


def _ws_path(live: Live, template: str) -> str:
    return template.format(task=live.ws_task)


@FUZZ
@given(
    path=WS_PATHS,
    frame=JSON_VALUES.map(json.dumps)
    | st.text(ANY_CHAR.filter(lambda c: not "\ud800" <= c <= "\udfff"), max_size=100)
    | st.binary(max_size=100),
)
def test_ws_arbitrary_frames(live: Live, path: str, frame: str | bytes) -> None:
    """Any JSON value, non-JSON text or binary frame: an error reply, the socket stays usable."""
    replies = exchange(live, _ws_path(live, path), frame)
    if isinstance(frame, bytes):
        assert [m["code"] for m in replies] == ["bad_request"], replies


WS_TASK_ID = (
    st.sampled_from(["own", "own", "foreign", "missing"])
    | JSON_VALUES
    | st.text(ANY_CHAR, min_size=60, max_size=70)
)
WS_LAST_SEQ = (
    st.integers(min_value=-3, max_value=5)
    | st.sampled_from([2**63, 2**64, 10**400, 1.5, 2.0, True, "2"])
    | JSON_VALUES
)


@FUZZ
@given(
    path=WS_PATHS,
    action=st.sampled_from(ACTIONS) | JSON_VALUES,
    fields=st.fixed_dictionaries(
        {},
        optional={
            "task_id": WS_TASK_ID,
            "last_seq": WS_LAST_SEQ,
            "id": JSON_VALUES,
            "extra": JSON_VALUES,
        },
    ),
    ascii_only=st.booleans(),
)
def test_ws_fuzzed_envelopes(
    live: Live, path: str, action: Any, fields: dict[str, Any], ascii_only: bool
) -> None:
    """Well-formed envelopes with fuzzed fields: valid replies or errors, never another's task."""
    task_id = fields.get("task_id")
    if task_id == "own":
        fields["task_id"] = live.ws_task
    elif task_id in ("foreign", "missing"):
        fields["task_id"] = _task_id(live, task_id)
    message = {"action": action, **fields}
    text = json.dumps(message, ensure_ascii=ascii_only)
    if not ascii_only:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate cannot be sent raw in a text frame
            text = json.dumps(message)
    exchange(live, _ws_path(live, path), text)  # checks no reply is about another's task


@FUZZ
@given(
    task_choice=TASK_CHOICE,
    query=st.lists(st.tuples(QUERY_KEY, QUERY_VALUE), max_size=3),
)
def test_ws_task_endpoint_handshake(
    live: Live, task_choice: str, query: list[tuple[str, str]]
) -> None:
    """Per-task endpoint with any task id and query: a well-formed HTTP error or a subscription."""
    task_id = live.ws_task if task_choice == "own" else _task_id(live, task_choice)
    qs = "?" + urlencode(query, encoding="utf-8", errors="surrogatepass") if query else ""
    path = f"/api/v1/stock/ws/analyze/{quote(task_id, safe='', errors='surrogatepass')}{qs}"
    before = row_counts(live.db_path)
    try:
        with connect(
            f"{live.server.ws_url}{path}",
            additional_headers={"Authorization": f"Bearer {live.ws_token}"},
            proxy=None,
            open_timeout=TIMEOUT,
        ) as ws:
            first = strict_json(ws.recv(timeout=TIMEOUT))
            assert_ws_reply(first, live.ws_task)
            assert first["type"] in ("snapshot", "event"), first
    except InvalidStatus as exc:
        response = exc.response
        content_type = response.headers.get("Content-Type", "")
        assert_http_reply(
            response.status_code,
            content_type,
            response.body or b"",
            before,
            row_counts(live.db_path),
        )
    live.assert_alive_and_log_clean()


def test_ws_deeply_nested_json_is_a_bad_request(live: Live) -> None:
    """A frame nested deeper than the parser's recursion limit gets bad_request, not internal."""
    for frame in ("[" * 30_000, '{"action":' * 5_000 + "1" + "}" * 5_000):
        replies = exchange(live, "/api/v1/ws", frame)
        assert [m["code"] for m in replies] == ["bad_request"], replies


def test_ws_invalid_utf8_text_frame_closes_only_that_socket(live: Live) -> None:
    """A text frame that is not UTF-8 closes that socket (1007); the server keeps serving."""
    path = f"/api/v1/ws?probe={uuid.uuid4().hex}"
    ws = live.socket(path)
    ws.send(b"\xff\xfe not utf-8", text=True)
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=TIMEOUT)
    assert ws.close_code == 1007, (ws.close_code, ws.close_reason)
    del live.sockets[path]
    exchange(live, "/api/v1/ws", json.dumps({"action": "get_status", "task_id": live.ws_task}))
