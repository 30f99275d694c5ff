"""WebSocket endpoints: origin and token checks before the upgrade, then one session per socket.

`/api/v1/ws` carries many subscriptions; `/api/v1/stock/ws/analyze/{task_id}` is the
original per-task endpoint, subscribed on open. Messages are handled one at a time in
the handler task (aiohttp allows one reader); all sending goes through the connection's
outbox, so a replay and live events for the same task can never interleave out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from marshmallow import ValidationError

from .. import protocol
from ..auth import Identity
from ..config import Config
from ..credentials import READ
from ..errors import (
    ApiError,
    BadRequest,
    Forbidden,
    NotFound,
    TooManyRequests,
    Unavailable,
)
from ..hub import Hub
from ..limits import FLOOD_WINDOW, MessageLimiter, Verdict
from ..models import Task
from ..replay import Replayer
from ..schemas import WsQuery
from ..store import Store
from ..subscription_log import SubscriptionHistory
from .connection import Connection
from .guards import authenticate
from .keys import (
    admission_key,
    config_key,
    history_key,
    hub_key,
    metrics_key,
    replayer_key,
    store_key,
)

log = logging.getLogger(__name__)

#: Retry-After (seconds) of a handshake refused for --max-connections-per-user.
RETRY_CONNECT_AFTER = 5


def origin_allowed(origin: str, host: str | None, scheme: str, allowed: tuple[str, ...]) -> bool:
    """True for the server's own origin or one listed exactly; never for "null" or look-alikes."""
    try:
        parts = urlsplit(origin)
    except ValueError:  # e.g. "http://[": not a URL at all
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        return False
    normalised = f"{parts.scheme}://{parts.netloc}".lower()
    if normalised in {o.lower() for o in allowed}:
        return True
    if host is None:
        return False
    # Same host: the browser's Origin names exactly the host:port the page was served from.
    own_scheme = "https" if scheme in ("https", "wss") else "http"
    return parts.netloc.lower() == host.lower() and parts.scheme in (own_scheme, "https")


def check_origin(request: web.Request) -> None:
    """Cross-site WebSocket hijacking guard: a present Origin must be allowed (else 403)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return  # not a browser; scripts authenticate with their token alone
    config = request.app[config_key]
    if not origin_allowed(origin, request.host, request.scheme, config.allowed_origins):
        raise Forbidden("origin not allowed", code="origin_not_allowed")


async def task_socket(request: web.Request) -> web.StreamResponse:
    """GET /api/v1/stock/ws/analyze/{task_id}[?last_seq=N]: subscribed to the task on open."""
    try:
        query = WsQuery().load(dict(request.query))
    except ValidationError as exc:
        raise BadRequest("invalid query", fields=exc.messages_dict) from None
    return await multi_task_socket(
        request, task_id=request.match_info["task_id"], last_seq=query["last_seq"]
    )


async def multi_task_socket(
    request: web.Request, task_id: str | None = None, last_seq: int | None = None
) -> web.StreamResponse:
    """GET /api/v1/ws: one socket, many subscriptions (or, from task_socket, one task's).

    The route's handler itself, not a wrapper around a shared coroutine: every level of
    await is a frame an open socket keeps for its whole life (about 360 bytes each).
    """
    # A refused origin or token is logged (auth.failed) and counted by the error middleware.
    check_origin(request)
    refuse_if_shedding(request)
    identity = await authenticate(request, allow_query=True, scope=READ, allow_share=True)
    store = request.app[store_key]
    if task_id is not None:
        task = await store.get_task(task_id)
        if task is None or task.user_id != identity.user_id:
            raise NotFound("task not found")
    config = request.app[config_key]
    hub = request.app[hub_key]
    check_connection_limit(request, identity.connection_key)
    connected = False
    try:
        # compress=False: frames are written pre-built (connection.text_frame), and tiny
        # JSON messages are not worth deflating anyway.
        ws = web.WebSocketResponse(
            max_msg_size=config.max_frame_bytes, autoping=False, compress=False
        )
        transport = request.transport
        try:
            await ws.prepare(request)
        except web.HTTPBadRequest:  # not a handshake: e.g. a browser's address bar, curl
            # Refused before anything is written; the reservation goes in `finally`.
            raise BadRequest(
                "this endpoint speaks WebSocket only: send a WebSocket handshake"
                " (Upgrade: websocket, Sec-WebSocket-Key, Sec-WebSocket-Version: 13)"
            ) from None
        conn = Connection(
            ws,
            transport if isinstance(transport, asyncio.Transport) else None,
            identity.user_id,
            session_id=identity.session_id,
            limit_key=identity.connection_key,
            max_messages=config.send_queue_messages,
            max_bytes=config.send_queue_bytes,
            stats=request.app[metrics_key].connections,
        )
        app = request.app
        session = Session(
            conn,
            ws,
            hub=hub,
            store=store,
            replayer=app[replayer_key],
            history=app[history_key],
            config=config,
            default_task=task_id,
            only_task=identity.task_id,
        )
        connected = True  # Session.run registers it with the hub at once
        return await session.run(identity, last_seq)
    finally:
        if not connected:
            hub.cancel_reservation(identity.connection_key)


def check_connection_limit(request: web.Request, user_id: Hashable) -> None:
    """--max-connections-per-user (WebSockets and SSE streams): hold a place or 429.

    The place is held from here, with no await since the check, until the connection is
    registered (then the hub counts it) or `hub.cancel_reservation`: concurrent handshakes
    of one user cannot all slip under the limit.
    """
    limit = request.app[config_key].max_connections_per_user
    if not request.app[hub_key].reserve(user_id, limit):
        request.app[metrics_key].refusals.note(
            "ws_too_many_connections", f"user={user_id} limit={limit}"
        )
        raise TooManyRequests(
            f"at most {limit} open WebSocket or SSE connections per user on this node;"
            " close one first",
            code="too_many_connections",
            headers={"Retry-After": str(RETRY_CONNECT_AFTER)},
        )


def refuse_if_shedding(request: web.Request) -> None:
    """Refuse the handshake with 503 + Retry-After while the server sheds load (storms)."""
    app = request.app
    refusal = app[admission_key].refusal(app[hub_key].connection_count)
    if refusal is None:
        return
    reason, retry_after = refusal
    metrics = app[metrics_key]
    metrics.connections.handshakes_shed += 1
    # Counted, and logged once per spell: a reconnect storm is thousands of these.
    metrics.refusals.note(f"ws_{reason}", f"peer={request.remote}")
    raise Unavailable(
        "server busy: retry later" if reason == "overloaded" else "server full: retry later",
        code=reason,
        headers={"Retry-After": str(retry_after)},
    )


class Session:
    """The server side of one WebSocket: reads messages and acts on them."""

    def __init__(
        self,
        conn: Connection,
        ws: web.WebSocketResponse,
        *,
        hub: Hub,
        store: Store,
        replayer: Replayer,
        history: SubscriptionHistory,
        config: Config,
        default_task: str | None,
        only_task: str | None = None,
    ) -> None:
        self._conn = conn
        #: A share token's one task: every other task is "not found".
        self._only_task = only_task
        self._ws = ws
        self._hub = hub
        self._store = store
        self._replayer = replayer
        self._history = history
        self._default_task = default_task
        #: --ws-rate: this connection's message bucket (None: no limit).
        self._limiter = (
            MessageLimiter(config.ws_rate, config.ws_burst, config.ws_flood_limit, conn.last_seen)
            if config.ws_rate > 0
            else None
        )
        #: True once closed for flooding: later messages are not acted on.
        self._flooded = False
        #: --max-subscriptions (0: no limit).
        self._max_subscriptions = config.max_subscriptions

    async def run(self, identity: Identity, last_seq: int | None) -> web.WebSocketResponse:
        conn, ws, hub = self._conn, self._ws, self._hub
        loop = asyncio.get_running_loop()
        hub.connect(conn)
        conn.stats.opened += 1
        opened_at = loop.time()
        log.info("ws.connect conn=%s user=%s", conn.id, conn.user_id)
        # A token that expires while the socket is open ends it with 4401.
        expiry = loop.call_later(
            max(0.0, identity.expires_at - time.time()),
            conn.close,
            protocol.CLOSE_TOKEN_EXPIRED,
            "token expired",
            None,
        )
        try:
            if self._default_task is not None:
                await self._subscribe(self._default_task, last_seq, None)
            while True:
                msg = await ws.receive()
                now = loop.time()
                conn.mark_seen(now)
                if msg.type is WSMsgType.TEXT:
                    if self._admit(now, msg.data):
                        await self._handle_text(msg.data)
                elif msg.type is WSMsgType.PING:  # control frames are not rate-limited
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.PONG:
                    pass
                elif msg.type is WSMsgType.BINARY:
                    if self._admit(now, None):
                        conn.push(
                            protocol.error_message("bad_request", "binary frames are not supported")
                        )
                elif msg.type is WSMsgType.ERROR:
                    if conn.close_code is None and ws.close_code is not None:
                        conn.close_code = ws.close_code
                        conn.close_reason = str(ws.exception() or "error")
                    break
                else:  # CLOSE, CLOSING, CLOSED
                    break
        finally:
            expiry.cancel()
            watched = hub.disconnect(conn)
            for task_id in watched:
                self._history.closed(conn.id, task_id)
            try:
                await conn.finish()
            finally:  # logged even when aiohttp cancels the handler of a vanished peer
                code = conn.close_code or ws.close_code
                conn.stats.closed_by_code[code] += 1
                log.info(
                    "ws.disconnect conn=%s user=%s code=%s reason=%s subscriptions=%d"
                    " duration_s=%.1f",
                    conn.id,
                    conn.user_id,
                    code,
                    (conn.close_reason or "client").replace(" ", "_"),
                    len(watched),
                    loop.time() - opened_at,
                )
        return ws

    def _admit(self, now: float, text: str | None) -> bool:
        """--ws-rate: True if the message may be acted on; else it was answered or closed.

        The cheap path (a token is there) parses nothing. A refused message gets an error
        carrying its "id" if it has one; a flood (--ws-flood-limit refusals within
        limits.FLOOD_WINDOW) closes the connection with 1008, after that error.
        """
        if self._flooded:
            return False  # closing: nothing more is acted on, nor answered
        limiter = self._limiter
        if limiter is None:
            return True
        verdict = limiter.check(now)
        if verdict is Verdict.ADMIT:
            return True
        conn = self._conn
        error = protocol.error_message(
            "rate_limited",
            f"more than {limiter.rate:g} messages per second; message ignored",
            protocol.peek_id(text) if text is not None else None,
        )
        if verdict is Verdict.REFUSE:
            conn.push(error)
            return False
        self._flooded = True
        log.warning(
            "ws.flood conn=%s user=%s refused=%d window_s=%g",
            conn.id,
            conn.user_id,
            limiter.refused,
            FLOOD_WINDOW,
        )
        conn.close(protocol.CLOSE_POLICY, "policy violation: message rate exceeded", error)
        return False

    async def _handle_text(self, text: str) -> None:
        conn = self._conn
        try:
            message = protocol.parse_client_message(text)
            action, data, msg_id = message.action, message.data, message.msg_id
            if action == "ping":
                conn.push(protocol.pong_message(msg_id))
            elif action == "subscribe":
                await self._subscribe(data["task_id"], data.get("last_seq"), msg_id)
            elif action == "unsubscribe":
                if self._hub.unsubscribe(conn, data["task_id"]):
                    self._history.closed(conn.id, data["task_id"])
                    log.info("ws.unsubscribe conn=%s task=%s", conn.id, data["task_id"])
                conn.push(protocol.unsubscribed_message(data["task_id"], msg_id))
            elif action == "get_status":
                task_id = data.get("task_id") or self._default_task
                if task_id is None:
                    raise protocol.ProtocolError(
                        "bad_request",
                        "task_id is required",
                        msg_id=msg_id,
                        fields={"task_id": ["Missing data for required field."]},
                    )
                task = await self._owned_task(task_id, msg_id)
                conn.push(protocol.snapshot_message(task, msg_id))
        except protocol.ProtocolError as exc:
            conn.push(protocol.error_message(exc.code, exc.message, exc.msg_id, exc.fields))
        except ApiError as exc:
            conn.push(protocol.error_message(exc.code, exc.message))
        except Exception:
            log.exception("ws.handler_error conn=%s", conn.id)
            conn.push(protocol.error_message("internal", "internal error"))

    async def _owned_task(self, task_id: str, msg_id: Any) -> Task:
        if self._only_task is not None and task_id != self._only_task:
            raise protocol.ProtocolError("not_found", "task not found", msg_id=msg_id)
        task = await self._store.get_task(task_id)
        if task is None or task.user_id != self._conn.user_id:
            # Same answer for missing and foreign tasks: existence is not revealed.
            raise protocol.ProtocolError("not_found", "task not found", msg_id=msg_id)
        return task

    async def _subscribe(self, task_id: str, last_seq: int | None, msg_id: Any) -> None:
        """Subscribe, then send the snapshot or the missed events, then go live.

        The subscription buffers live events from before the first read, so an event
        committed during the replay is either in what is read or in the buffer; the hub
        drops the buffered ones already sent (by seq).
        """
        conn, hub = self._conn, self._hub
        was_subscribed = hub.is_subscribed(conn, task_id)
        limit = self._max_subscriptions
        if not was_subscribed and limit and hub.subscriptions_of(conn) >= limit:
            # Checked before anything is subscribed; a re-subscribe is not a new one.
            raise protocol.ProtocolError(
                "too_many_subscriptions",
                f"at most {limit} subscriptions per connection; unsubscribe first",
                msg_id=msg_id,
            )
        sub = hub.subscribe(conn, task_id)
        recorded = False
        try:
            task = await self._owned_task(task_id, msg_id)
            if not was_subscribed:
                self._history.opened(conn.id, conn.user_id, task_id)
                recorded = True
            log.info("ws.subscribe conn=%s task=%s last_seq=%s", conn.id, task_id, last_seq)
            delivered = await self._replayer.replay(
                sub, task, last_seq, msg_id, charge=self._charge_page
            )
        except BaseException:
            # Whatever failed (a read, the client going away, a bug), the subscription must
            # not stay behind in buffering mode, holding every later event of the task.
            if hub.unsubscribe(conn, task_id, only=sub) and recorded:
                self._history.closed(conn.id, task_id)
            raise
        hub.go_live(sub, delivered)

    def _charge_page(self) -> None:
        """A replay costs a message per page: re-subscribing in a loop to a long history is
        rate-limited like sending that many messages."""
        if self._limiter is not None:
            self._limiter.charge(asyncio.get_running_loop().time(), 1)
