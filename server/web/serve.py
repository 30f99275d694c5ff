"""Serving: bind first, then start the app, then accept, guarding every TCP connection.

`web.run_app` starts the application (opens the database, resumes jobs, closes stale
subscription rows) before it binds the port, so a taken port was found only after all
that, with "server.ready" already logged. Here the listening sockets are bound first
(`listen`), then the app starts (`AppRunner.setup`), then the sockets are served through
`ConnectionGate`, with run_app's handling of SIGINT and SIGTERM (graceful shutdown).

What aiohttp 3.14 (`web_protocol.RequestHandler`) gives and what it does not:

- `keepalive_timeout` closes a connection that waits for its next request that long; the
  timer also runs from the moment a connection opens, and a request whose head is only
  partly received still counts as waiting. We pass `--keepalive-timeout` to it.
- It has no deadline for a request's head: a client that dribbles its headers is only
  dropped by that keep-alive timer. `GuardedRequestHandler` adds `--header-timeout`,
  counted from the connection's opening or, on a kept-alive connection, from the first
  byte after the previous request. (A next request that starts arriving while the
  previous one is still in its handler is left to the keep-alive timer: which bytes
  belong to which request only aiohttp's parser knows.)
- It reads a body only when the handler asks, without a deadline: `middleware.
  request_deadline` reads it first, under `--header-timeout`.
- It has no connection cap: `ConnectionGate` is the listening sockets' protocol factory
  and answers a connection beyond `--max-http-connections` itself, with a canned 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from contextlib import suppress
from typing import Any

from aiohttp import web
from yarl import URL

from ..process import tune_garbage_collector
from ..refusals import Refusals
from .keys import config_key, metrics_key, resumed_jobs_key
from .logs import AccessLogger

log = logging.getLogger(__name__)

#: Header deadlines are spread over [timeout, timeout * (1 + HEADER_JITTER)].
HEADER_JITTER = 0.1

#: Pending connections the kernel queues per listening socket (aiohttp's default).
BACKLOG = 128
#: Seconds a refused connection may take to read its 503 before it is cut.
REFUSAL_LINGER = 2.0
#: Refused connections lingering at once; past this they are closed at once (each holds a
#: descriptor, and these come out of process.FD_RESERVE).
REFUSAL_LINGER_MAX = 32


class ListenError(OSError):
    """The address cannot be resolved or bound (e.g. the port is taken); names it."""


def listen(host: str, port: int, backlog: int = BACKLOG) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address of `host` (as asyncio would).

    Raises:
        ListenError: the address cannot be resolved or bound (e.g. the port is taken).
    """
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _, address in infos:
            if address in seen:
                continue
            seen.add(address)
            if port == 0 and sockets:  # one port for every address of the host
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                where = f"[{address[0]}]" if family == socket.AF_INET6 else address[0]
                raise ListenError(
                    f"cannot listen on {where}:{address[1]}: {exc.strerror or exc}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def url_of(sock: socket.socket) -> str:
    """`http://host:port` of a listening socket (IPv6 in brackets)."""
    host, port = sock.getsockname()[:2]
    return str(URL.build(scheme="http", host=host, port=port))


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's HTTP protocol with a deadline for each request's head (`--header-timeout`).

    A head is awaited from the moment the connection opens, and again from the first byte
    after a request; `request_started` (called by `middleware.request_deadline` once
    aiohttp has parsed the head and handed the request to the app) ends the wait. A
    connection whose head is late is closed: it sent nothing, or dribbles its headers
    (slowloris).

    One timer per connection at most, re-armed lazily: a kept-alive client sending
    request after request would otherwise create and cancel a timer for each of them.
    When the timer fires it closes the connection only if the head it finds awaited is
    late; an earlier one finished, so it waits again for the rest of the current one.
    """

    # Slots, as in RequestHandler: one of these per open connection.
    __slots__ = (
        "_gate",
        "_clock",
        "_header_timeout",
        "_head_deadline",
        "_head_since",
        "_in_request",
    )

    def __init__(
        self,
        manager: web.Server,
        gate: ConnectionGate,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._gate = gate
        self._clock = loop
        # Jittered: thousands of idle connections opened together are then closed over a
        # spell of a tenth of the timeout, not in one loop iteration that stalls the rest.
        self._header_timeout = header_timeout * (1 + HEADER_JITTER * random.random())
        #: The timer that checks for a late head (None: none pending).
        self._head_deadline: asyncio.TimerHandle | None = None
        #: Loop time since when a request head is awaited (None: none is).
        self._head_since: float | None = None
        #: A request is in the app (its handler runs, or it is a WebSocket).
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and not self._in_request and self.transport is not None:
            self._await_head()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_since = None
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None
        self._gate.closed()
        super().connection_lost(exc)

    def request_started(self) -> None:
        """The request's head is in; its body has its own deadline (request_deadline)."""
        self._in_request = True
        self._head_since = None

    def request_finished(self) -> None:
        self._in_request = False

    def _await_head(self) -> None:
        self._head_since = self._clock.time()
        if self._head_deadline is None:
            self._head_deadline = self._clock.call_later(self._header_timeout, self._check_head)

    def _check_head(self) -> None:
        self._head_deadline = None
        since = self._head_since
        if since is None or self._in_request or self.transport is None:
            return  # no head awaited now; the next request's first byte starts a wait
        left = since + self._header_timeout - self._clock.time()
        if left > 0:  # an earlier head came in time; this one has the rest of its time
            self._head_deadline = self._clock.call_later(left, self._check_head)
            return
        peer = self.peername
        where = peer[0] if isinstance(peer, tuple) else peer
        self._gate.refusals.note("header_timeout", f"peer={where}")
        self.force_close()


class _Refusal(asyncio.Protocol):
    """A connection over the cap: a canned 503, then closed, its request never parsed.

    The answer is followed by a FIN (write_eof), and what the client sends meanwhile is
    read and dropped until it closes or REFUSAL_LINGER passes: closing a socket with
    unread data sends a reset, which can destroy the answer before the client reads it.
    """

    def __init__(self, gate: ConnectionGate, answer: bytes) -> None:
        self._gate = gate
        self._answer = answer
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._answer)
        if len(self._gate.lingering) >= REFUSAL_LINGER_MAX:
            transport.close()
            return
        self._gate.lingering.add(self)
        transport.write_eof()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSAL_LINGER, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass  # never parsed

    def eof_received(self) -> bool:
        return False  # the client is done: close

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._gate.lingering.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def full_answer(retry_after: int) -> bytes:
    """The whole HTTP/1.1 503 `server_full` response, as bytes."""
    body = json.dumps(
        {
            "error": {
                "code": "server_full",
                "message": "too many open connections: retry later",
                "fields": {},
            }
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Retry-After: {retry_after}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class ConnectionGate:
    """Protocol factory of the listening sockets: counts open TCP connections, caps them.

    A connection is counted from the moment it is accepted (the factory runs before the
    transport exists) until it is lost, so a burst of accepts cannot overshoot the cap.
    """

    def __init__(
        self,
        server: web.Server,
        refusals: Refusals,
        *,
        limit: int,
        header_timeout: float,
        handler_kwargs: dict[str, Any],
    ) -> None:
        self._server = server
        self._loop = asyncio.get_running_loop()
        #: Where refused and timed-out connections are counted (and logged once a spell).
        self.refusals = refusals
        #: --max-http-connections (0: no limit).
        self.limit = limit
        self._header_timeout = header_timeout
        self._handler_kwargs = handler_kwargs
        #: Open TCP connections served by the app (HTTP and WebSocket).
        self.open = 0
        #: Refused connections still being answered.
        self.lingering: set[_Refusal] = set()

    def __call__(self) -> asyncio.Protocol:
        if self.limit and self.open >= self.limit:
            self.refusals.note("http_connections", f"limit={self.limit}")
            # Jittered, so that refused clients do not all come back at once.
            return _Refusal(self, full_answer(random.randint(2, 10)))
        self.open += 1
        try:
            return GuardedRequestHandler(
                self._server,
                self,
                loop=self._loop,
                header_timeout=self._header_timeout,
                **self._handler_kwargs,
            )
        except BaseException:
            self.open -= 1
            raise

    def closed(self) -> None:
        self.open -= 1

    def close(self) -> None:
        """Cut the refused connections still lingering (at shutdown)."""
        for refusal in list(self.lingering):
            refusal.abort()


class GuardedSite(web.BaseSite):
    """Serves one already-bound listening socket through a ConnectionGate."""

    __slots__ = ("_sock", "_gate", "_name")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, gate: ConnectionGate) -> None:
        super().__init__(runner, backlog=BACKLOG)
        self._sock = sock
        self._gate = gate
        self._name = url_of(sock)

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._gate, sock=self._sock, backlog=BACKLOG)


def serve(app: web.Application, sockets: list[socket.socket]) -> None:
    """Start `app` and serve `sockets` until SIGINT or SIGTERM, then shut down gracefully.

    The loop handling is web.run_app's: a signal raises GracefulExit out of the loop, the
    main task is cancelled, and its `finally` runs the runner's cleanup (stop accepting,
    on_shutdown, wait up to --shutdown-timeout for handlers, cleanup contexts).
    Exceptions from the app's startup (e.g. DatabaseError) propagate to the caller.
    """
    loop = asyncio.new_event_loop()
    main_task = loop.create_task(_serve(app, sockets))
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main_task)
    except (web.GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main_task.done():
                main_task.cancel()
                with suppress(asyncio.CancelledError):
                    loop.run_until_complete(main_task)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(app: web.Application, sockets: list[socket.socket]) -> None:
    config = app[config_key]
    handler_kwargs: dict[str, Any] = {
        "access_log_class": AccessLogger,
        "keepalive_timeout": config.keepalive_timeout,
    }
    runner = web.AppRunner(
        app, handle_signals=True, shutdown_timeout=config.shutdown_timeout, **handler_kwargs
    )
    gate: ConnectionGate | None = None
    try:
        await runner.setup()  # the app's startup: database, migrations, jobs resumed
        assert runner.server is not None
        metrics = app[metrics_key]
        gate = ConnectionGate(
            runner.server,
            metrics.refusals,
            limit=config.max_http_connections,
            header_timeout=config.header_timeout,
            handler_kwargs=handler_kwargs,
        )
        metrics.bind_listener(gate)
        for sock in sockets:
            await GuardedSite(runner, sock, gate).start()
        tune_garbage_collector()
        log.info(
            "server.ready url=%s store=%s resumed_jobs=%d",
            ",".join(url_of(sock) for sock in sockets),
            config.store_label,
            app.get(resumed_jobs_key, 0),
        )
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()
        if gate is not None:
            gate.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop and let it finish (as asyncio.run does)."""
    tasks = asyncio.all_tasks(loop)
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler(
                {
                    "message": "unhandled exception during shutdown",
                    "exception": task.exception(),
                    "task": task,
                }
            )
