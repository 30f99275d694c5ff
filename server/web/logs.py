"""Logging set-up: one line per event, key=value or JSON, and an access log without queries.

Messages are written as `event key=value ...` (`ws.connect conn=ab12 user=3`). The kv
format prints them after a timestamp, level and logger; the json format turns the same
message into `{"ts", "level", "logger", "event", <key>: <value>..., "msg"}`. Either way a
record is exactly one line: newlines inside a message or a traceback are escaped, so a
client cannot forge log lines with a crafted path or name.

Query strings are left out of every logged path because WebSocket clients may pass their
token as `?token=`; URIs end up in logs. Tokens, passwords and secrets are never logged
by this server; as a second line of defence both formatters redact anything that looks
like one (aiohttp logs a malformed request with its raw request line and headers).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from ..refusals import LogLimiter

LOG_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"

#: An event name: dotted lower-case words (`ws.connect`, `http.request`).
_EVENT = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
#: Where the next ` key=` starts; values may contain spaces (e.g. `error=database is locked`).
_NEXT_FIELD = re.compile(r" (?=[A-Za-z_][A-Za-z0-9_.]*=)")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
#: Keys of the JSON envelope; message fields never overwrite them.
_RESERVED = frozenset({"ts", "level", "logger", "event", "msg", "exc", "stack"})


#: Credentials as they may appear in text we do not write ourselves: aiohttp logs a
#: malformed request with its raw request line or header (`?token=...`, `Bearer ...`).
_SECRET = re.compile(
    r"(?i)(bearer\s+)[^\s'\"]+"
    r"|((?<![a-z0-9_])(?:access_)?token=)[^&\s'\"]+"
    r"|(password[\"']?\s*[:=]\s*[\"']?)[^&\s'\"]+"
    r"|eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
)


#: Every match of _SECRET contains one of these (lower-cased): a cheap test first, since
#: almost no line has any, and the regex costs more than the rest of formatting a line.
_SECRET_HINTS = ("bearer", "token=", "password", "eyj")


def redact(text: str) -> str:
    """`text` with bearer tokens, `token=`/`password` values and anything JWT-shaped hidden."""
    lowered = text.lower()
    if not any(hint in lowered for hint in _SECRET_HINTS):
        return text
    return _SECRET.sub(
        lambda m: (m.group(1) or m.group(2) or m.group(3) or "") + "[redacted]", text
    )


#: Every character str.splitlines() breaks on, written as an escape instead.
_LINE_BREAKS = str.maketrans(
    {
        "\n": "\\n",
        "\r": "\\r",
        **{c: f"\\x{ord(c):02x}" for c in "\x0b\x0c\x1c\x1d\x1e\x85"},
        **{c: f"\\u{ord(c):04x}" for c in "\u2028\u2029"},
    }
)


def one_line(text: str) -> str:
    """`text` with line breaks (LF, CR, and the rarer ones) escaped: one record, one line."""
    return text.translate(_LINE_BREAKS)


def parse_event(message: str) -> dict[str, str]:
    """{"event": name, key: value, ...} for an `event key=value ...` message, else {}."""
    head, _, rest = message.partition(" ")
    if not _EVENT.fullmatch(head):
        return {}
    fields = {"event": head}
    if rest:
        for part in _NEXT_FIELD.split(rest):
            key, eq, value = part.partition("=")
            if not eq or not _KEY.fullmatch(key):
                return {"event": head}  # not key=value after all: the raw msg says it
            if key not in _RESERVED:
                fields[key] = value
    return fields


#: The last second formatted, and its text: most records share their second with the one
#: before, and gmtime + strftime cost 0.9 us of the 10-12 a record takes.
_last_second: tuple[int, str] = (-1, "")


def _utc_time(record: logging.LogRecord) -> str:
    global _last_second
    second = int(record.created)
    if second != _last_second[0]:
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_last_second[1]}.{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=INFO logger=server.ws ws.connect conn=ab12 user=3`, on one line."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _utc_time(record)

    def format(self, record: logging.LogRecord) -> str:
        return one_line(redact(super().format(record)))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: envelope, the message's event and fields, the raw msg."""

    def format(self, record: logging.LogRecord) -> str:
        message = redact(record.getMessage())
        entry: dict[str, Any] = {
            "ts": _utc_time(record),
            "level": record.levelname,
            "logger": record.name,
        }
        entry.update(parse_event(message))
        entry["msg"] = message
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        # ASCII-only: every control character and line separator is escaped.
        return json.dumps(entry, default=str)


def setup_logging(level: str, fmt: str = "kv") -> None:
    """Log to stderr at `level` in `fmt` ("kv" or "json"); warnings become log records.

    Records skip what neither format prints: the caller's file and line, and the thread
    and process (the logging HOWTO's "Optimization" switches). Finding the caller costs
    a walk up the stack on every record, and it materialises a frame object for each
    level of the stack, which a connection's suspended handler then keeps: measured,
    350 bytes per open WebSocket, and 2.5 us per record.
    """
    logging._srcfile = None  # type: ignore[attr-defined]  (documented in the HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)


def log_path(request: BaseRequest) -> str:
    """The request's path as sent (percent-encoded), never its query string."""
    return request.rel_url.raw_path


#: Refused requests (4xx, 503) are logged once a minute per status, route and peer: under
#: a flood the access log would otherwise cost more than answering (they are all counted
#: in /metrics, `progress_http_requests_total`, `progress_refused_total`).
_REFUSED_LINES = LogLimiter()


class AccessLogger(AbstractAccessLogger):
    """`http.request method=GET path=/x status=200 ms=1.2` — path only, never the query."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        status = response.status
        held_back = 0
        if 400 <= status < 500 or status == 503:
            info = getattr(request, "match_info", None)  # a bare BaseRequest has none
            resource = info.route.resource if info is not None else None
            key = (status, resource.canonical if resource is not None else "", request.remote)
            allowed = _REFUSED_LINES.allow(key)
            if allowed is None:
                return
            held_back = allowed
        self.logger.info(
            "http.request method=%s path=%s status=%s ms=%.1f peer=%s%s",
            request.method,
            log_path(request),
            status,
            time * 1000,
            request.remote,
            f" held_back={held_back}" if held_back else "",
        )
