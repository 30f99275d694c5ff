"""What the SDK raises.

Error family::

    ProgressError                 anything this package raises on purpose
    ├── ApiError                  the server answered with an error (4xx, or a 5xx given up on)
    ├── ServerUnreachable         no answer at all: connection refused or lost, timeout
    └── WatchStopped              a watch ended by a close code that retrying cannot fix
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class ProgressError(Exception):
    """Base class of every error raised by `progress_client`."""


class ApiError(ProgressError):
    """An HTTP error answer: `{"error": {"code", "message", "fields"}}` and its status.

    Attributes:
        status: the HTTP status (422, 404, 409, 429, ...).
        code: the server's error code (`validation_error`, `not_found`, `task_finished`,
            `rate_limited`, ...), or `http_<status>` when the body was not the server's
            JSON error (e.g. a proxy's page).
        message: the server's human-readable text.
        fields: per-field problems (`{"progress": ["Must be ..."]}`); `{}` when none.
        retry_after: the `Retry-After` header in seconds, when there was one.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields: dict[str, Any] = dict(fields or {})
        self.retry_after = retry_after

    @classmethod
    def from_response(
        cls, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> ApiError:
        """Parse an error answer; tolerate bodies that are not the server's JSON shape."""
        retry_after = parse_retry_after((headers or {}).get("Retry-After"))
        code, message, fields = f"http_{status}", "", {}
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code") or code)
            message = str(error.get("message") or "")
            if isinstance(error.get("fields"), dict):
                fields = error["fields"]
        else:
            message = body[:200].decode("utf-8", "replace").strip()
        return cls(status, code, message or f"HTTP {status}", fields, retry_after)


class ServerUnreachable(ProgressError):
    """The server could not be reached (or stopped answering) until the retry deadline."""


class WatchStopped(ProgressError):
    """A watch was closed with a code that says "do not reconnect" (1008, 1009, 4403), or
    its token was refused and no new one could be had (4401).

    Attributes:
        close_code: the WebSocket close code.
        reason: the close reason the server gave, if any.
    """

    def __init__(self, close_code: int, reason: str = "") -> None:
        super().__init__(f"watch stopped by close code {close_code}: {reason or 'no reason'}")
        self.close_code = close_code
        self.reason = reason


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` in seconds (this server sends whole seconds; an HTTP date is ignored)."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
