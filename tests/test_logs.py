"""Structured logs: one line per event, kv or JSON, with connection ids, and never a secret.

The end-to-end tests run the real `run.py` (the access logger and log set-up of
production) and read everything it printed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.config import from_args
from server.web.logs import JsonFormatter, KeyValueFormatter, log_path, parse_event, redact

from .helpers import SECRET, TIMEOUT
from .server_process import ServerProcess, api

MakeServer = Callable[..., ServerProcess]


@pytest.fixture
def make_server(tmp_path: Path, unused_tcp_port_factory: Callable[[], int]) -> Iterator[MakeServer]:
    """Build ServerProcesses (not started) on free ports; every one is killed at teardown."""
    servers: list[ServerProcess] = []

    def make(*args: str) -> ServerProcess:
        log_dir = tmp_path / f"proc{len(servers)}"
        log_dir.mkdir()
        server = ServerProcess(
            log_dir,
            unused_tcp_port_factory(),
            tmp_path / f"data{len(servers)}" / "app.db",
            ["--jwt-secret", SECRET, "--job-step-delay", "0.01", *args],
        )
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


async def recv_json(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(TIMEOUT):
        return json.loads(await ws.recv())


async def wait_for_metric(
    http: aiohttp.ClientSession, server: ServerProcess, line: str, timeout: float = TIMEOUT
) -> None:
    """Poll the server's /metrics until it holds `line` (e.g. `name{label="x"} 1.0`)."""
    async with asyncio.timeout(timeout):
        while True:
            async with http.get(f"{server.base_url}/metrics") as resp:
                if line in (await resp.text()).splitlines():
                    return
            await asyncio.sleep(0.05)


async def login(http: aiohttp.ClientSession, server: ServerProcess, name: str, pw: str) -> str:
    base = f"{server.base_url}/api/v1/auth"
    creds = {"username": name, "password": pw}
    await api(http, "POST", f"{base}/register", json=creds, expect=201)
    return (await api(http, "POST", f"{base}/login", json=creds))["access_token"]


def one(lines: list[str], pattern: str) -> re.Match[str]:
    """The single line matching `pattern` (fails listing the lines otherwise)."""
    found = [m for line in lines if (m := re.search(pattern, line))]
    assert len(found) == 1, f"{pattern!r} matched {len(found)} lines:\n" + "\n".join(lines)
    return found[0]


async def test_kv_logs_show_each_event_with_its_connection_and_no_secret(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """A workload with tokens in headers and ?token=, wrong passwords and forged tokens: every
    event is one line with its connection id, and no token, signature or password appears."""
    server = make_server()
    await server.start()
    password = f"pw-{uuid.uuid4().hex}"
    wrong_password = f"wrong-{uuid.uuid4().hex}"
    token = await login(http, server, "logged", password)
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    base = server.base_url
    await api(
        http,
        "POST",
        f"{base}/api/v1/auth/login",
        json={"username": "logged", "password": wrong_password},
        expect=401,
    )
    await api(http, "GET", f"{base}/api/v1/auth/me", forged, expect=401)
    await api(http, "GET", f"{base}/api/v1/tasks", expect=401)
    body = {"kind": "external", "params": {}}
    task = await api(http, "POST", f"{base}/api/v1/tasks", token, json=body, expect=201)
    task_id = task["id"]

    # A well-behaved socket, token in the query: subscribe, one event, unsubscribe, close.
    async with connect(f"{server.ws_url}/api/v1/ws?token={token}", proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task_id}))
        assert (await recv_json(ws))["type"] == "snapshot"
        url = f"{base}/api/v1/tasks/{task_id}/progress"
        await api(http, "POST", url, token, json={"progress": 10})
        assert (await recv_json(ws))["event"] == "started"
        assert (await recv_json(ws))["event"] == "progress"
        await ws.send(json.dumps({"action": "unsubscribe", "task_id": task_id}))
        assert (await recv_json(ws))["type"] == "unsubscribed"

    # Refused handshakes: a forged token (401) and a foreign origin (403).
    with pytest.raises(InvalidStatus) as refused:
        async with connect(f"{server.ws_url}/api/v1/ws?token={forged}", proxy=None):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            f"{server.ws_url}/api/v1/ws?token={token}", origin="https://evil.example", proxy=None
        ):
            pass
    assert refused.value.response.status_code == 403

    # A second client, token in the header: subscribes, gets an event, closes.
    # (Slow consumers' log lines are checked with real stalled sockets in test_slow_consumer.)
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(f"{server.ws_url}/api/v1/ws", additional_headers=headers, proxy=None) as ws:
        await ws.send(json.dumps({"action": "subscribe", "task_id": task_id}))
        assert (await recv_json(ws))["type"] == "snapshot"
        await api(http, "POST", url, token, json={"progress": 20, "message": "x" * 5000})
        assert (await recv_json(ws))["progress"] == 20
    await wait_for_metric(http, server, "progress_ws_connections 0.0")
    # Malformed requests carrying the token: aiohttp logs their raw line and headers.
    for raw in (
        f"GET /api/v1/ws?token={token} HTTP/9.1\r\nHost: x\r\n\r\n",
        f"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(raw.encode())
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.read()).startswith(b"HTTP/1.0 400")
        writer.close()
        await writer.wait_closed()
    assert await server.stop() == 0

    output = server.output()
    assert "level=ERROR logger=aiohttp.server" in output  # the malformed requests were logged
    for secret in (
        token,
        token.rsplit(".", 1)[1],
        forged.rsplit(".", 1)[1],
        password,
        wrong_password,
        SECRET,
    ):
        assert secret not in output
    assert output.count("token=") == output.count("token=[redacted]") == 1
    assert "Bearer [redacted]" in output
    lines = output.splitlines()
    assert lines and all(line.startswith("ts=") for line in lines), output

    first, second = (m.group(1) for m in re.finditer(r"ws\.connect conn=(\w+) user=1\b", output))
    one(lines, rf"ws\.subscribe conn={first} task={task_id} ")
    one(lines, rf"ws\.unsubscribe conn={first} task={task_id}$")
    one(lines, rf"ws\.disconnect conn={first} user=1 code=1000 reason=client subscriptions=0 ")
    one(lines, rf"ws\.subscribe conn={second} task={task_id} ")
    one(lines, rf"ws\.disconnect conn={second} user=1 code=1000 reason=client subscriptions=1 ")
    for path, status, code in (
        ("/api/v1/auth/login", 401, "invalid_credentials"),
        ("/api/v1/auth/me", 401, "invalid_token"),
        ("/api/v1/tasks", 401, "missing_token"),
        ("/api/v1/ws", 401, "invalid_token"),
        ("/api/v1/ws", 403, "origin_not_allowed"),
    ):
        one(lines, rf"auth\.failed method=\w+ path={path} status={status} code={code} peer=")
    # The access log: path only.
    assert re.search(r"http\.request method=GET path=/api/v1/ws status=101 ", output)


async def test_json_logs_are_one_object_per_line(
    make_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    """--log-format json: every line is a JSON object with ts/level/logger/msg and the event's
    fields; a heartbeat drop names its connection; no secret appears."""
    server = make_server(
        "--log-format", "json", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "0.2"
    )  # fmt: skip
    await server.start()
    password = f"pw-{uuid.uuid4().hex}"
    token = await login(http, server, "jsonuser", password)
    await api(
        http,
        "POST",
        f"{server.base_url}/api/v1/auth/login",
        json={"username": "jsonuser", "password": password + "x"},
        expect=401,
    )
    # A client that never answers pings (and never reads) is dropped by the heartbeat.
    async with http.ws_connect(
        f"{server.ws_url}/api/v1/ws?token={token}", autoping=False
    ) as silent:
        await wait_for_metric(http, server, "progress_ws_heartbeat_drops_total 1.0")
        await wait_for_metric(http, server, "progress_ws_connections 0.0")
        assert silent is not None
    assert await server.stop() == 0

    output = server.output()
    for secret in (token, token.rsplit(".", 1)[1], password, SECRET):
        assert secret not in output
    entries = [json.loads(line) for line in output.splitlines()]
    assert entries
    for entry in entries:
        assert isinstance(entry, dict)
        assert {"ts", "level", "logger", "msg"} <= entry.keys(), entry
    by_event: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_event.setdefault(entry.get("event", ""), []).append(entry)
    (connected,) = by_event["ws.connect"]
    conn = connected["conn"]
    (aborted,) = by_event["ws.abort"]
    assert (aborted["conn"], aborted["reason"], aborted["level"]) == (
        conn,
        "heartbeat_timeout",
        "INFO",
    )
    (gone,) = by_event["ws.disconnect"]
    assert (gone["conn"], gone["code"], gone["reason"]) == (conn, "1006", "heartbeat_timeout")
    (failed,) = by_event["auth.failed"]
    assert (failed["path"], failed["status"], failed["code"]) == (
        "/api/v1/auth/login",
        "401",
        "invalid_credentials",
    )
    assert any(e["msg"].startswith("server.ready ") for e in entries)


# -- formatters, without a server ----------------------------------------------------------


def _record(msg: str, *args: Any, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("server.test", logging.INFO, __file__, 1, msg, args, exc_info)


def test_parse_event_reads_key_values_and_leaves_prose_alone() -> None:
    """`event k=v ...` becomes fields (values may hold spaces); prose gives no fields."""
    assert parse_event("ws.connect conn=ab12 user=3") == {
        "event": "ws.connect",
        "conn": "ab12",
        "user": "3",
    }
    assert parse_event("tracker.commit_failed tasks=2 error=OperationalError('db is locked')") == {
        "event": "tracker.commit_failed",
        "tasks": "2",
        "error": "OperationalError('db is locked')",
    }
    assert parse_event("server.stopped") == {"event": "server.stopped"}
    assert parse_event("Error handling request") == {}
    # A message field never overwrites the envelope.
    assert parse_event("x.y level=ERROR msg=hi a=1") == {"event": "x.y", "a": "1"}


def test_kv_lines_cannot_be_split_by_a_crafted_value() -> None:
    """Newlines in a logged value or a traceback are escaped: one record, one line."""
    line = KeyValueFormatter().format(_record("http.request path=%s", "/a\nts=x level=ERROR"))
    assert "\n" not in line and "path=/a\\nts=x level=ERROR" in line
    assert re.match(
        r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=INFO logger=server.test ", line
    )
    rare = _record("x.y v=%s", "a\u2028b\x85c\x0bd\re")
    assert len(KeyValueFormatter().format(rare).splitlines()) == 1
    assert len(JsonFormatter().format(rare).splitlines()) == 1
    with_exc = KeyValueFormatter().format(_record("x.failed", exc=True))
    assert "\n" not in with_exc and "ValueError: boom\\nsecond line" in with_exc


def test_timestamps_follow_each_records_own_time() -> None:
    """Each second is formatted once and reused; a record of another second, even an
    earlier one, gets its own, in UTC with milliseconds, in both formats."""
    stamps = []
    for created in (1764547200.25, 1764547200.999, 1764547201.5, 1764547199.0):
        record = _record("x.y")
        record.created, record.msecs = created, (created % 1) * 1000
        stamps.append(KeyValueFormatter().format(record).split()[0])
        assert json.loads(JsonFormatter().format(record))["ts"] == stamps[-1][3:]
    assert stamps == [
        "ts=2025-12-01T00:00:00.250Z",
        "ts=2025-12-01T00:00:00.999Z",
        "ts=2025-12-01T00:00:01.500Z",
        "ts=2025-11-30T23:59:59.000Z",
    ]


def test_json_lines_hold_fields_and_traceback() -> None:
    """JSON: one line, envelope + event fields + msg, and the traceback under "exc"."""
    line = JsonFormatter().format(_record("ws.disconnect conn=%s code=%d", "c1\n", 1000, exc=True))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["event"] == "ws.disconnect" and entry["code"] == "1000"
    assert entry["conn"] == "c1\n" and entry["level"] == "INFO" and entry["logger"] == "server.test"
    assert "ValueError: boom" in entry["exc"]


def test_redact_hides_credentials_in_text_we_do_not_write() -> None:
    """Bearer tokens, token=/password values and JWT-shaped strings become [redacted]."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
    assert redact(f"b'GET /ws?last_seq=1&token={jwt} HTTP/9.1'") == (
        "b'GET /ws?last_seq=1&token=[redacted] HTTP/9.1'"
    )
    assert redact("b'Authorization: Bearer abc.def\\x01'") == "b'Authorization: Bearer [redacted]'"
    assert redact('{"username": "u", "password": "hunter2"}') == (
        '{"username": "u", "password": "[redacted]"}'
    )
    assert redact("username=u&password=hunter2&x=1") == "username=u&password=[redacted]&x=1"
    assert redact(f"saw {jwt} here") == "saw [redacted] here"
    # Our own fields stay as they are.
    line = "auth.failed path=/api/v1/ws status=401 code=invalid_token peer=127.0.0.1"
    assert redact(line) == line


def test_logged_paths_keep_no_query_and_stay_encoded() -> None:
    """log_path: the encoded path without the query (no ?token=, no raw newline)."""
    request = make_mocked_request("GET", "/api/v1/ws%0Ats=forged?token=secret-value")
    assert log_path(request) == "/api/v1/ws%0Ats=forged"


def test_log_format_flag_and_environment_variable() -> None:
    """--log-format and PROGRESS_LOG_FORMAT choose kv or json (kv by default); others fail."""
    assert from_args([], env={}).log_format == "kv"
    assert from_args(["--log-format", "json"], env={}).log_format == "json"
    assert from_args([], env={"PROGRESS_LOG_FORMAT": "JSON"}).log_format == "json"
    assert from_args(["--log-format", "kv"], env={"PROGRESS_LOG_FORMAT": "json"}).log_format == "kv"
    with pytest.raises(SystemExit):
        from_args(["--log-format", "xml"], env={})


def test_metrics_token_is_configurable_and_never_in_repr() -> None:
    """--metrics-token / PROGRESS_METRICS_TOKEN; the config's repr hides it and the JWT secret."""
    config = from_args([], env={"PROGRESS_METRICS_TOKEN": "m" * 20, "JWT_SECRET": SECRET})
    assert config.metrics_token == "m" * 20
    assert "m" * 20 not in repr(config) and SECRET not in repr(config)
    with pytest.raises(SystemExit):
        from_args(["--metrics-token", "short"], env={})


async def test_a_flood_of_refused_credentials_is_counted_not_logged_each_time(client, caplog):
    """100 requests with a bad token: 100 in the metric, one auth.failed line."""
    caplog.set_level(logging.INFO, logger="server.web.app")
    for _ in range(100):
        resp = await client.get("/api/v1/tasks", headers={"Authorization": "Bearer nope"})
        assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth.failed")]
    assert len(lines) == 1
    metrics = await (await client.get("/metrics")).text()
    assert 'progress_auth_failures_total{reason="invalid_token"} 100.0' in metrics


async def test_refused_requests_are_logged_once_a_minute_per_route_and_peer(caplog):
    """A flood of 429s leaves one access-log line saying how many were held back; successes
    are each logged."""
    from server.web import logs

    logs._REFUSED_LINES = logs.LogLimiter()
    logger = logs.AccessLogger(logging.getLogger("test.access"), "")

    class Route:
        resource = type("R", (), {"canonical": "/api/v1/tasks/{task_id}/progress"})()

    class Request:
        method, remote = "POST", "10.0.0.1"
        rel_url = type("U", (), {"raw_path": "/api/v1/tasks/abc/progress"})()
        match_info = type("M", (), {"route": Route()})()

    caplog.set_level(logging.INFO, logger="test.access")
    for status in [429] * 50 + [200] * 3:
        logger.log(Request(), type("Resp", (), {"status": status})(), 0.001)  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert sum("status=429" in line for line in lines) == 1
    assert sum("status=200" in line for line in lines) == 3
