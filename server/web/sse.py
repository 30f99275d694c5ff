"""GET /api/v1/tasks/{task_id}/stream: one task's events as Server-Sent Events.

For clients a WebSocket does not suit: `curl -N`, EventSource, proxies that break
upgrades. The stream is a hub peer like a WebSocket, so it gets the same replay (by
`Last-Event-ID` or `?last_seq`), the same no-gap, no-duplicate merge of replay and live
events, the same per-user connection limit and the same slow-consumer rule. Each message
is the WebSocket's JSON under `id: <seq>` and `event: <kind>`; the stream ends after the
task's terminal event, and a reconnect from there gets 204, which stops EventSource.

Like a WebSocket frame, an event's bytes (`id`, `event`, `data` as one HTTP/1.1 chunk)
are built once per message and written straight to each subscriber's transport.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
import uuid
from collections.abc import Hashable

from aiohttp import web

from .. import schemas
from ..credentials import READ
from ..errors import BadRequest, NotFound
from ..models import TaskStatus
from ..stats import ConnectionStats
from .bodies import validate
from .guards import authenticate
from .keys import config_key, hub_key, metrics_key, replayer_key, store_key
from .ws import check_connection_limit, refuse_if_shedding

log = logging.getLogger(__name__)

routes = web.RouteTableDef()

_STREAM_QUERY = schemas.StreamQuery()
#: Seconds between two comment lines (proxies close a silent connection after 30-60 s).
KEEPALIVE = 15.0
#: Milliseconds EventSource waits before reconnecting.
RETRY_MS = 2000
#: Seconds between two looks at whether the client went away.
POLL = 1.0
_TERMINAL = frozenset(s.value for s in TaskStatus if s.is_terminal)


def _chunk(payload: bytes) -> bytes:
    """`payload` as one HTTP/1.1 chunk (the response is chunked: no length is known)."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _ChunkCache:
    """The last message's chunk: the hub pushes one str object to every subscriber."""

    text: str | None = None
    chunk: bytes | None = None
    ends: bool = False


def sse_chunk(text: str) -> tuple[bytes | None, bool]:
    """The SSE bytes of a hub message (None: not for SSE, e.g. a pong), and whether it is
    the task's last (a terminal event, or a snapshot of a finished task)."""
    if text is _ChunkCache.text:
        return _ChunkCache.chunk, _ChunkCache.ends
    message = json.loads(text)
    kind = message.get("type")
    ends = False
    if kind == "event":
        head = f"id: {message['seq']}\nevent: {message['event']}\n"
        ends = message["event"] in _TERMINAL
    elif kind == "snapshot":
        task = message["task"]
        head = f"id: {task['seq']}\nevent: snapshot\n"
        ends = task["status"] in _TERMINAL
    elif kind in ("notice", "error"):
        head = f"event: {kind}\n"
    else:
        head = ""
    chunk = _chunk(f"{head}data: {text}\n\n".encode()) if head else None
    _ChunkCache.text, _ChunkCache.chunk, _ChunkCache.ends = text, chunk, ends
    return chunk, ends


class EventStream:
    """Implements the hub's Peer for one SSE response."""

    def __init__(
        self,
        transport: asyncio.Transport,
        user_id: int,
        *,
        session_id: str,
        limit_key: Hashable,
        max_bytes: int,
        stats: ConnectionStats,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex[:12]
        self.user_id = user_id
        self.session_id = session_id
        self.limit_key = limit_key
        self.last_seen = loop.time()
        self.ping_sent_at: float | None = None
        self.stats = stats
        self._transport = transport
        self._max_bytes = max_bytes
        #: Resolved when the stream is over: its end was sent, or it was dropped.
        self.done: asyncio.Future[None] = loop.create_future()
        self.aborted = False
        self.reason = ""

    def write(self, payload: bytes) -> None:
        """Raw SSE text (a comment, `retry:`), as a chunk."""
        if not self.done.done() and not self._transport.is_closing():
            self._transport.write(_chunk(payload))

    # -- Peer interface ------------------------------------------------------------------

    def push(self, data: str) -> None:
        if self.done.done():
            return
        chunk, ends = sse_chunk(data)
        if chunk is None:
            return
        transport = self._transport
        if transport.get_write_buffer_size() + len(chunk) > self._max_bytes:
            self.stats.slow_consumer_drops += 1
            log.warning("sse.slow_consumer stream=%s user=%s", self.id, self.user_id)
            self.abort("slow consumer")
            return
        if not transport.is_closing():
            transport.write(chunk)
            self.stats.messages_sent += 1
            self.stats.bytes_sent += len(chunk)
        if ends:
            self._end("task finished")

    async def wait_for_room(self) -> None:
        """Pace a replay by what the client takes: the transport's buffer at most half full."""
        while not self.done.done() and self._transport.get_write_buffer_size() >= (
            self._max_bytes // 2
        ):
            await asyncio.sleep(0.02)
            self.last_seen = asyncio.get_running_loop().time()

    def close(self, code: int, reason: str, notice: str | None = None) -> None:
        """End the stream (after `notice`, if any): shutdown, a revoked token, expiry."""
        if notice is not None:
            self.push(notice)
        self._end(reason)

    def ping(self) -> None:
        # The keepalive comments are the stream's heartbeat; a client that does not read
        # them is found by the slow-consumer rule, not by a pong it cannot send.
        self.last_seen = asyncio.get_running_loop().time()

    def abort(self, reason: str) -> None:
        """Drop with a TCP reset (what the kernel holds for a stalled reader is freed)."""
        if self.done.done():
            return
        self.aborted = True
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._transport.abort()
        self._end(reason)

    # -- what the shutdown waits for -----------------------------------------------------

    @property
    def writer_done(self) -> bool:
        return self.done.done()

    async def wait_writer(self, timeout: float) -> None:
        await asyncio.wait([self.done], timeout=timeout)

    def _end(self, reason: str) -> None:
        if not self.done.done():
            self.reason = reason
            self.done.set_result(None)


def _position(request: web.Request) -> int | None:
    """`Last-Event-ID` (what EventSource sends on reconnecting), else `?last_seq`."""
    header = request.headers.get("Last-Event-ID")
    if header is not None and header.strip():
        text = header.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise BadRequest(
                "Last-Event-ID must be a seq (a non-negative integer)",
                fields={"Last-Event-ID": ["Not a valid integer."]},
            )
        return int(text)
    return validate(_STREAM_QUERY, dict(request.query))["last_seq"]


@routes.get("/api/v1/tasks/{task_id}/stream")
async def stream_task(request: web.Request) -> web.StreamResponse:
    """The task's events from `Last-Event-ID`/`?last_seq` (else a snapshot), then live."""
    refuse_if_shedding(request)
    identity = await authenticate(request, allow_query=True, scope=READ, allow_share=True)
    last_seq = _position(request)
    app = request.app
    task = await app[store_key].get_task(request.match_info["task_id"])
    if task is None or task.user_id != identity.user_id:
        raise NotFound("task not found")
    if task.status.is_terminal and last_seq is not None and last_seq >= task.seq:
        return web.Response(status=204)  # nothing will ever follow: EventSource stops
    hub, config = app[hub_key], app[config_key]
    check_connection_limit(request, identity.connection_key)
    transport = request.transport
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
            }
        )
        await response.prepare(request)
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            raise ConnectionResetError("client went away")
    except BaseException:
        hub.cancel_reservation(identity.connection_key)
        raise
    stream = EventStream(
        transport,
        identity.user_id,
        session_id=identity.session_id,
        limit_key=identity.connection_key,
        max_bytes=config.send_queue_bytes,
        stats=app[metrics_key].connections,
    )
    hub.connect(stream)
    loop = asyncio.get_running_loop()
    expiry = loop.call_later(
        min(max(0.0, identity.expires_at - time.time()), 10 * 365 * 86400.0),
        stream.close,
        4401,
        "token expired",
        None,
    )
    log.info("sse.connect stream=%s user=%s task=%s", stream.id, identity.user_id, task.id)
    try:
        stream.write(b"retry: %d\n\n" % RETRY_MS)
        sub = hub.subscribe(stream, task.id)
        hub.go_live(sub, await app[replayer_key].replay(sub, task, last_seq))
        quiet = 0.0
        while not stream.done.done():
            await asyncio.wait([stream.done], timeout=POLL)
            if transport.is_closing():
                break
            quiet += POLL
            if quiet >= KEEPALIVE:
                stream.write(b": keepalive\n\n")
                quiet = 0.0
    finally:
        expiry.cancel()
        hub.disconnect(stream)
        log.info(
            "sse.disconnect stream=%s user=%s reason=%s",
            stream.id,
            identity.user_id,
            (stream.reason or "client").replace(" ", "_"),
        )
    if not stream.aborted and not transport.is_closing():
        await response.write_eof()
    return response
