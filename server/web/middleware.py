"""Request guards shared by every route.

`request_deadline` gives each request `--header-timeout` seconds to deliver its body (the
deadline for the head itself is `serve.GuardedRequestHandler`'s, since a request only
reaches the app once its head is complete).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import PayloadTooLarge
from .keys import config_key, metrics_key
from .serve import GuardedRequestHandler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def request_deadline(timeout: float) -> Middleware:
    """Read each request's body within `timeout` seconds, or answer 408 and drop the client.

    aiohttp reads a body only when the handler asks, with no deadline: a client that
    sends headers and then dribbles (or never sends) its body would hold the connection
    and the handler forever. So the body is read here first, under the deadline; the
    handlers' `request.read()` then returns aiohttp's cached copy.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        protocol = request.protocol
        guarded = isinstance(protocol, GuardedRequestHandler)
        if guarded:
            protocol.request_started()
        try:
            if request.can_read_body:
                try:
                    async with asyncio.timeout(timeout):
                        await request.read()
                except TimeoutError:
                    return await _drop_slow_body(request, timeout)
                except web.HTTPRequestEntityTooLarge:
                    limit = request.app[config_key].max_body_bytes
                    raise PayloadTooLarge(f"body larger than {limit} bytes") from None
            return await handler(request)
        finally:
            if guarded:
                protocol.request_finished()

    return middleware


async def _drop_slow_body(request: web.Request, timeout: float) -> web.StreamResponse:
    """408, then close at once (no lingering read of the rest of a body that may never come)."""
    request.app[metrics_key].refusals.note("body_timeout", f"peer={request.remote}")
    response = web.json_response(
        {
            "error": {
                "code": "request_timeout",
                "message": f"request body not received within {timeout:g} s",
                "fields": {},
            }
        },
        status=408,
    )
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    # aiohttp would otherwise keep reading the unfinished body for its lingering time
    # (10 s) before closing; force_close() closes the transport once the 408 is flushed.
    request.protocol.force_close()
    return response
