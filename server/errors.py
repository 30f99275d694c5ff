"""Errors that reach clients, each with a stable code and an HTTP status.

ApiError
├── BadRequest (400, bad_request / invalid_json)
├── Unauthorized (401, unauthorized)
├── Forbidden (403, forbidden)
├── NotFound (404, not_found)
├── Conflict (409, conflict; task_finished, username_taken)
├── PayloadTooLarge (413, payload_too_large)
├── ValidationFailed (422, validation_error, with per-field messages)
├── TooManyRequests (429, rate_limited / too_many_connections; with Retry-After)
│   └── QuotaExceeded (429, quota_exceeded; fields.quota names the quota)
└── Unavailable (503, unavailable)
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with a machine-readable code; rendered as {"error": {...}}."""

    status = 400
    code = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        fields: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.fields = fields or {}
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "fields": self.fields}}


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TaskFinished(Conflict):
    """The task is completed, failed or cancelled: nothing more can happen to it."""

    code = "task_finished"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class ValidationFailed(ApiError):
    status, code = 422, "validation_error"


class TooManyRequests(ApiError):
    status, code = 429, "rate_limited"


class QuotaExceeded(TooManyRequests):
    """A per-user quota is used up; it frees as tasks finish or are deleted."""

    code = "quota_exceeded"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"Retry-After": str(QUOTA_RETRY_AFTER)})
        super().__init__(message, **kwargs)


#: Retry-After (seconds) of a quota refusal: quotas free slowly, as tasks end.
QUOTA_RETRY_AFTER = 60


class Unavailable(ApiError):
    status, code = 503, "unavailable"
