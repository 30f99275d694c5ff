"""One WebSocket client: a bounded outbox drained by its own writer task.

The hub pushes pre-serialised text without waiting. When nothing is queued and the writer
is idle (the usual case), the frame is written to the transport at once, built once per
message and shared by every subscriber, with no task switch per subscriber. Otherwise it
goes to the outbox, and the writer task, the only thing that awaits the socket, sends it
in order; a client that stops reading stalls only its own writer. When the outbox
(messages, or bytes queued here plus bytes in the transport's write buffer) passes its
limit, the client is a slow consumer: it gets close 4008 if it
can still take it within a short grace, and its transport is then aborted, which frees
the kernel and aiohttp buffers at once (a plain close would keep them until it reads).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from aiohttp import web

from .. import protocol
from ..stats import ConnectionStats

log = logging.getLogger(__name__)

#: Seconds a closing client has to take the close frame before its transport is aborted.
CLOSE_GRACE = 1.0
#: Seconds between two looks at a draining socket buffer while a replay waits for room.
ROOM_POLL = 0.02


@dataclass(frozen=True, slots=True)
class _Ping:
    pass


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


_PING = _Ping()
_Item = tuple[str, int] | _Ping | _Close
#: The outbox of a connection that never had to queue anything.
_NOTHING_QUEUED: tuple[()] = ()


class _FrameCache:
    """The last text frame built: a fan-out pushes the same str object to every subscriber,
    so one entry makes the frame once per message."""

    text: str | None = None
    frame: bytes = b""


def text_frame(text: str) -> bytes:
    """An unmasked, uncompressed, final WebSocket text frame (RFC 6455 5.2) carrying `text`."""
    if text is _FrameCache.text:
        return _FrameCache.frame
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    _FrameCache.text, _FrameCache.frame = text, header + payload
    return _FrameCache.frame


class Connection:
    """Implements the hub's Peer for an aiohttp WebSocketResponse."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        user_id: int,
        *,
        session_id: str = "",
        limit_key: Hashable | None = None,
        max_messages: int,
        max_bytes: int,
        stats: ConnectionStats | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        #: Totals shared by every connection of the app, read by /metrics.
        self.stats = stats if stats is not None else ConnectionStats()
        self.id = uuid.uuid4().hex[:12]
        self.user_id = user_id
        #: The login session of the token that opened it: closed 4401 when that ends.
        self.session_id = session_id
        #: What it counts under for the per-user connection limit (hub.limit_key).
        self.limit_key: Hashable = user_id if limit_key is None else limit_key
        self.last_seen = loop.time()
        self.ping_sent_at: float | None = None
        #: Close code and reason the server chose (None: the client closed or vanished).
        self.close_code: int | None = None
        self.close_reason = ""
        self._ws = ws
        self._transport = transport
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        #: Text messages (with their size in bytes on the wire) and control items waiting
        #: for the writer. _NOTHING_QUEUED until the first one: it is almost always
        #: empty, and an empty deque holds a 64-slot block (about 600 bytes) for each of
        #: thousands of sockets.
        self._outbox: deque[_Item] | tuple[()] = _NOTHING_QUEUED
        #: Bytes of text waiting in _outbox.
        self._queued_bytes = 0
        #: True once a close was decided: nothing more is queued.
        self._closing = False
        #: The task draining _outbox, started when something is queued and gone once it
        #: is empty: an idle socket (most are: frames go straight to the transport) holds
        #: no task and no coroutine frame, about 1 KiB each.
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        #: True while the writer task is inside a send (frames then go through the outbox).
        self._sending = False
        self._aborted = False
        #: Resolved by the writer after each send, for `wait_for_room`.
        self._room: asyncio.Future[None] | None = None

    # -- Peer interface ------------------------------------------------------------------

    def push(self, data: str) -> None:
        if self._closing:
            return
        frame = text_frame(data)  # built once per message, whatever the subscribers
        size = len(frame)
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        if (
            len(self._outbox) >= self._max_messages
            or self._queued_bytes + buffered + size > self._max_bytes
        ):
            self._drop_slow(buffered, size)
            return
        transport = self._transport
        if (
            not self._outbox
            and not self._sending
            and transport is not None
            and buffered < self._max_bytes // 2
        ):
            # Nothing queued and the writer idle: writing now keeps the order. aiohttp's
            # writer writes each frame whole, so frames never interleave. A peer already
            # behind goes through the outbox, whose writer waits for the socket to drain
            # (and `wait_for_room` paces replays by the outbox).
            if not transport.is_closing():
                transport.write(frame)
                self.stats.messages_sent += 1
                self.stats.bytes_sent += size
            return
        self._enqueue((data, size))
        self._queued_bytes += size
        self._wake()

    def ping(self) -> None:
        if not self._closing:
            self._enqueue(_PING)
            self._wake()

    def abort(self, reason: str) -> None:
        """Drop at once: for peers that stopped answering (nothing can reach them anyway)."""
        if self._transport is None or self._aborted:
            return
        self._aborted = True
        log.info(
            "ws.abort conn=%s user=%s reason=%s", self.id, self.user_id, reason.replace(" ", "_")
        )
        self._closing = True
        self.close_code = self.close_code or 1006
        self.close_reason = self.close_reason or reason
        self._outbox = _NOTHING_QUEUED
        if self._writer is not None:
            self._writer.cancel()
        self._reset()

    # -- used by the WebSocket handler ---------------------------------------------------

    def mark_seen(self, now: float) -> None:
        self.last_seen = now
        self.ping_sent_at = None

    def close(self, code: int, reason: str, notice: str | None = None) -> None:
        """Send `notice` (if any) after what is queued, then close with `code`."""
        if self._closing:
            return
        if notice is not None:
            self._enqueue((notice, len(notice.encode())))
        self._enqueue(_Close(code, reason))
        self._closing = True
        self._wake()

    async def finish(self) -> None:
        """Called once the handler stops reading: stop the writer and release the socket.

        Safe to cancel (aiohttp cancels the handler when the peer goes away if
        handler_cancellation is on, as in its test server): the writer is stopped anyway.
        """
        self._closing = True
        try:
            if self._closer is not None:
                await asyncio.wait([self._closer], timeout=CLOSE_GRACE * 2)
            # Give an ongoing close (shutdown notice + 1001) a moment, then stop it.
            await self.wait_writer(CLOSE_GRACE)
        finally:
            if self._writer is not None and not self._writer.done():
                self._writer.cancel()
            if self._transport is not None and self.close_code in (
                protocol.CLOSE_SLOW_CONSUMER,
                1006,
            ):
                self._reset()

    @property
    def backlog_bytes(self) -> int:
        """Bytes not yet handed to the kernel: the outbox plus the transport's write buffer."""
        buffered = self._transport.get_write_buffer_size() if self._transport else 0
        return self._queued_bytes + buffered

    @property
    def writer_done(self) -> bool:
        """Nothing is being sent or waits to be (the writer ended, or never had to start)."""
        return self._writer is None or self._writer.done()

    async def wait_writer(self, timeout: float) -> None:
        if self._writer is not None and not self._writer.done():
            await asyncio.wait([self._writer], timeout=timeout)

    async def wait_for_room(self) -> None:
        """Wait until the outbox and the socket's write buffer are at most half full.

        Paces long replays by what the peer really takes: bytes queued here and bytes the
        transport still holds (a replay written straight to the socket fills the latter
        with nothing queued), so a client that reads, only slower, is never dropped as
        slow in the middle of a replay.
        """
        loop = asyncio.get_running_loop()
        last_backlog = self.backlog_bytes
        while not self._closing and (
            len(self._outbox) >= self._max_messages // 2
            or self.backlog_bytes >= self._max_bytes // 2
        ):
            self._room = loop.create_future()
            # The writer resolves _room after each send; with nothing queued the transport
            # drains by itself, so look again soon (and now and then in any case: a closing
            # connection stops resolving _room).
            timeout = ROOM_POLL if not self._outbox else 1.0
            await asyncio.wait([self._room], timeout=timeout)
            backlog = self.backlog_bytes
            if self._room.done() or backlog < last_backlog:
                # The handler does not read (so sees no pong) while it replays; a peer that
                # keeps taking data is alive, so the heartbeat must not drop it meanwhile.
                self.mark_seen(loop.time())
            last_backlog = backlog

    # -- internals -----------------------------------------------------------------------

    def _reset(self) -> None:
        """Drop the peer with a TCP reset, discarding what the kernel still holds for it.

        A plain close (which asyncio's abort() is, at the socket level) lets the kernel keep
        sending what is buffered, megabytes for a stalled reader, for as long as the peer
        takes to read it; SO_LINGER 0 makes close() send RST and free it at once. The peer
        sees the connection reset (1006), and resumes with `last_seq` like after a 4008.
        """
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass  # already closed
        self._transport.abort()

    def _enqueue(self, item: _Item) -> None:
        if not isinstance(self._outbox, deque):
            self._outbox = deque()
        self._outbox.append(item)

    def _wake(self) -> None:
        """Something was queued: start the writer unless it runs (it drains all of it)."""
        if (self._writer is None or self._writer.done()) and not self._aborted:
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name=f"ws-writer-{self.id}"
            )

    def _drop_slow(self, buffered: int, incoming: int) -> None:
        self.stats.slow_consumer_drops += 1
        log.warning(
            "ws.slow_consumer conn=%s user=%s queued_messages=%d queued_bytes=%d"
            " transport_bytes=%d incoming_bytes=%d",
            self.id,
            self.user_id,
            len(self._outbox),
            self._queued_bytes,
            buffered,
            incoming,
        )
        self._closing = True
        self.close_code = protocol.CLOSE_SLOW_CONSUMER
        self.close_reason = "slow consumer"
        self._outbox = _NOTHING_QUEUED
        self._queued_bytes = 0
        if self._writer is not None:
            self._writer.cancel()
        self._closer = asyncio.create_task(
            self._close_then_abort(protocol.CLOSE_SLOW_CONSUMER, "slow consumer")
        )

    async def _close_then_abort(self, code: int, reason: str) -> None:
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await self._ws.close(code=code, message=reason.encode(), drain=False)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        finally:
            if self._transport is not None:
                self._reset()

    async def _write_loop(self) -> None:
        """Send what is queued, in order, then end (the next `_wake` starts a new one)."""
        try:
            while self._outbox:
                item = self._outbox.popleft()  # type: ignore[union-attr]  (not empty)
                self._sending = True
                if isinstance(item, tuple):
                    text, size = item
                    self._queued_bytes -= size
                    await self._ws.send_str(text)
                    self.stats.messages_sent += 1
                    self.stats.bytes_sent += size
                    if self._room is not None and not self._room.done():
                        self._room.set_result(None)
                elif isinstance(item, _Ping):
                    await self._ws.ping()
                else:
                    self.close_code = item.code
                    self.close_reason = item.reason
                    await self._close_then_abort_if_stuck(item)
                    return
                self._sending = False
        except (ConnectionError, RuntimeError) as exc:
            if not self._closing:
                self.stats.send_failures += 1
                log.info(
                    "ws.send_failed conn=%s user=%s error=%s",
                    self.id,
                    self.user_id,
                    type(exc).__name__,
                )
                self._closing = True
                if self._transport is not None:
                    self._reset()

    async def _close_then_abort_if_stuck(self, item: _Close) -> None:
        try:
            async with asyncio.timeout(CLOSE_GRACE):
                await self._ws.close(code=item.code, message=item.reason.encode(), drain=True)
        except TimeoutError:
            if self._transport is not None:
                self._reset()
