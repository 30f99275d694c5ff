"""Request bodies and queries: JSON objects, schema validation, errors in the one shape."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from marshmallow import Schema, ValidationError

from ..errors import BadRequest, PayloadTooLarge, ValidationFailed
from .keys import config_key


async def read_body(request: web.Request) -> bytes:
    """The whole body, within --max-body-bytes (413 beyond)."""
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"body larger than {request.app[config_key].max_body_bytes} bytes"
        ) from None


def json_object(body: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """`body` as a JSON object ({} for an empty body when `allow_empty`); 400 otherwise."""
    if not body.strip():
        if allow_empty:
            return {}
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    try:
        data = json.loads(body)
    except ValueError:
        raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise BadRequest("request body is nested too deeply to read", code="invalid_json") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    return data


def validate(schema: Schema, data: Any) -> dict[str, Any]:
    """`data` loaded by `schema`; 422 with per-field messages otherwise.

    Python's json reads NaN/Infinity and "\\ud800" escapes. Stored, a NaN would be sent back
    as text no browser parses, and a lone surrogate fails to encode inside SQLite's
    transaction. Objects and lists (params, result) are left to `budget.compact`, which
    checks their depth first: serialising a value nested just under the parser's limit
    would blow the stack.
    """
    try:
        loaded = schema.load(data)
    except ValidationError as exc:
        raise ValidationFailed("invalid request", fields=exc.messages_dict) from None
    bad = {}
    for name, value in loaded.items():
        if isinstance(value, dict | list):
            continue
        try:
            json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
        except ValueError:
            bad[name] = ["Not valid JSON text: no NaN, Infinity or unpaired surrogates."]
    if bad:
        raise ValidationFailed("invalid request", fields=bad)
    return loaded
