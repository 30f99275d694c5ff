"""Request guards and response headers shared by every route.

`request_deadline` gives each request `--header-timeout` seconds to deliver its body (the
deadline for the head itself is `serve.GuardedRequestHandler`'s, since a request only
reaches the app once its head is complete). `security_headers` marks every response
`nosniff` and gives HTML a strict Content-Security-Policy: the page loads its scripts,
styles and sockets from this origin only, and cannot be framed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from .bodies import read_body
from .keys import metrics_key
from .serve import GuardedRequestHandler

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: For the page and any HTML under /static/: nothing inline, nothing from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self';"
    " object-src 'none'"
)
HTML_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An `on_response_prepare` hook: every response (errors and upgrades included)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    # By path as well as type: a 304 for the page carries no Content-Type.
    path = request.path
    if response.content_type == "text/html" or path == "/" or path.endswith((".html", ".htm")):
        response.headers.update(HTML_HEADERS)


class BodyTimeout(Exception):
    """A handler that reads its own body did not get it within --header-timeout."""


H = TypeVar("H")


def reads_own_body(handler: H) -> H:
    """Mark a handler that reads its body itself (bounded), so the deadline middleware does
    not read it first with the general --max-body-bytes limit."""
    handler.reads_own_body = True  # type: ignore[attr-defined]
    return handler


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
            # Handlers marked `reads_own_body` (the account routes, with a far smaller
            # limit) read their body themselves, under the same deadline (BodyTimeout).
            own = getattr(request.match_info.handler, "reads_own_body", False)
            if request.can_read_body and not own:
                if request.content.is_eof():
                    # All of it came with the head (most bodies do): no wait, no timer.
                    await read_body(request)
                else:
                    try:
                        async with asyncio.timeout(timeout):
                            await read_body(request)  # cached: the handler's read returns it
                    except TimeoutError:
                        return await _drop_slow_body(request, timeout)
            try:
                return await handler(request)
            except BodyTimeout:
                return await _drop_slow_body(request, timeout)
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
