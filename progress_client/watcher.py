"""`watch()`: follow one task over the WebSocket until its terminal event, across drops.

The reconnect policy is the one of docs/protocol.md ("Close codes") and of the browser
client static/js/ws-client.js: reconnect with full-jitter backoff on 1001, 1006, 4008 and
anything unknown; on 4401 get a new token and reconnect (at once the first time); stop on
1008, 1009, 4403 (and the other protocol-error codes). The attempt count starts again
only once a connection has lasted `stable_after` seconds, so a server that accepts and
then drops every connection is retried ever more slowly, never hammered.

Every resubscribe carries the last seq yielded, and anything at or below it is dropped,
so each seq is yielded once, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .auth import Credentials
from .errors import ApiError, ServerUnreachable, WatchStopped, parse_retry_after
from .models import Event
from .retry import Backoff

log = logging.getLogger(__name__)

#: Close codes after which reconnecting cannot help (the JS client's FATAL_CLOSE_CODES).
FATAL_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010, 4403})
#: The token expired, or its session ended, while the socket was open.
CLOSE_TOKEN_EXPIRED = 4401
#: Ids of the two requests a watch sends, so their replies can be told apart.
SUBSCRIBE_ID = "watch:subscribe"
STATUS_ID = "watch:status"
#: Error codes of a subscribe reply that end the watch (the rest are retried).
RETRIED_SUBSCRIBE_ERRORS = frozenset({"rate_limited", "unavailable", "overloaded", "internal"})
_STATUS_CODES = {"not_found": 404, "forbidden": 403, "insufficient_scope": 403}
_GONE = (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


@dataclass(frozen=True)
class WatchSettings:
    """How a watch connects and reconnects (times in seconds)."""

    backoff: Backoff = Backoff(initial=0.5, maximum=30.0)
    #: WebSocket ping interval; no pong within half of it drops the connection (1006).
    heartbeat: float = 20.0
    #: A handshake not done within this counts as a failed attempt.
    connect_timeout: float = 10.0
    #: A connection open this long resets the backoff.
    stable_after: float = 10.0
    #: Give up (ServerUnreachable) after this long without a connection; None: never.
    reconnect_deadline: float | None = 300.0


async def watch_task(
    get_session: Callable[[], Awaitable[aiohttp.ClientSession]],
    ws_url: str,
    creds: Credentials,
    task_id: str,
    last_seq: int | None,
    settings: WatchSettings,
) -> AsyncIterator[Event]:
    """Yield the task's events after `last_seq` (None: a snapshot first), then live ones,
    ending after the terminal event. See the module docstring for the policy."""
    loop = asyncio.get_running_loop()
    position = _Position(task_id, last_seq)
    attempt = 0  # failed attempts since the last stable connection
    expired_streak = 0  # 4401 closes since the last stable connection
    lost_at = loop.time()  # when we last had no connection (the start counts)
    while True:
        token = await creds.current()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        retry_after: float | None = None
        why = "connection failed"
        session = await get_session()
        try:
            async with asyncio.timeout(settings.connect_timeout):
                ws = await session.ws_connect(
                    ws_url, headers=headers, heartbeat=settings.heartbeat, autoping=True
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401 and expired_streak == 0 and await creds.renew(token):
                expired_streak += 1
                continue
            if exc.status not in (408, 429) and exc.status < 500:
                raise await _refusal(session, ws_url, headers, exc) from None
            retry_after = parse_retry_after(exc.headers.get("Retry-After") if exc.headers else None)
            why = f"handshake refused with {exc.status}"
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            why = f"cannot connect: {type(exc).__name__}: {exc}"
        else:
            opened_at = loop.time()
            code: int | None = None
            reason = ""
            try:
                async with ws:
                    await ws.send_str(json.dumps(position.subscribe()))
                    if position.last is not None:
                        # A subscribe at the latest seq is answered with nothing: ask for the
                        # status too, or a watch of a finished task would wait forever.
                        await ws.send_str(json.dumps(position.get_status()))
                    while True:
                        msg = await ws.receive()
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            step = position.accept(msg.data)
                            if step.event is not None:
                                yield step.event
                            if step.ended:
                                return
                            if step.retry:
                                why, code = step.retry, 1000
                                break
                        elif msg.type is aiohttp.WSMsgType.CLOSE:
                            code, reason = msg.data, str(msg.extra or "")
                            break
                        elif msg.type in _GONE:
                            break
            except (aiohttp.ClientError, OSError):
                code = None  # lost while sending: reconnect below
            if code is None:
                # aiohttp reports a vanished peer as 1000 or 1006; no close frame came.
                code = 1006
                why = "connection lost"
            elif why == "connection failed":
                why = f"closed with {code} {reason}".strip()
            lost_at = loop.time()
            if lost_at - opened_at >= settings.stable_after:
                attempt = 0
                expired_streak = 0
            if code in FATAL_CLOSE_CODES:
                raise WatchStopped(code, reason)
            if code == CLOSE_TOKEN_EXPIRED:
                if not await creds.renew(token):
                    raise WatchStopped(code, reason or "token expired and cannot be renewed")
                expired_streak += 1
                if expired_streak == 1:
                    continue  # a fresh token: reconnect at once
        attempt += 1
        delay = settings.backoff.delay(attempt, retry_after)
        deadline = settings.reconnect_deadline
        if deadline is not None and loop.time() + delay - lost_at > deadline:
            raise ServerUnreachable(f"watch of task {task_id}: {why}; gave up after {deadline:g} s")
        log.info("watch %s: %s; reconnecting in %.2f s", task_id, why, delay)
        await asyncio.sleep(delay)


async def _refusal(
    session: aiohttp.ClientSession,
    ws_url: str,
    headers: dict[str, str],
    exc: aiohttp.WSServerHandshakeError,
) -> ApiError:
    """The ApiError of a refused handshake. aiohttp keeps no body of a failed upgrade, so
    the same URL is asked once more over plain HTTP: the server checks the token, scope
    and task before it looks for the upgrade, and answers with its JSON error."""
    http_url = "http" + ws_url[len("ws") :]
    try:
        async with session.get(http_url, headers=headers) as resp:
            body, status, resp_headers = await resp.read(), resp.status, resp.headers
    except (aiohttp.ClientError, OSError, TimeoutError):
        status = 0
    if status == exc.status:
        return ApiError.from_response(status, body, resp_headers)
    name = {401: "invalid_token", 403: "forbidden", 404: "not_found"}
    return ApiError(exc.status, name.get(exc.status, f"http_{exc.status}"), exc.message)


@dataclass
class _Step:
    """What one message means: an event to yield, the end, or a reason to reconnect."""

    event: Event | None = None
    ended: bool = False
    retry: str = ""


class _Position:
    """How far a watch has got (`last`: the last seq yielded; None before anything), and
    what each message from the server means for it."""

    def __init__(self, task_id: str, last: int | None) -> None:
        self.task_id = task_id
        self.last = last

    def subscribe(self) -> dict[str, Any]:
        message: dict[str, Any] = {"action": "subscribe", "task_id": self.task_id}
        message["id"] = SUBSCRIBE_ID
        if self.last is not None:
            message["last_seq"] = self.last
        return message

    def get_status(self) -> dict[str, Any]:
        return {"action": "get_status", "task_id": self.task_id, "id": STATUS_ID}

    def accept(self, text: str) -> _Step:
        try:
            data = json.loads(text)
        except ValueError:
            return _Step()
        if not isinstance(data, dict):
            return _Step()
        kind = data.get("type")
        if kind == "event" and data.get("task_id") == self.task_id:
            seq = data.get("seq")
            if not isinstance(seq, int) or (self.last is not None and seq <= self.last):
                return _Step()  # a duplicate: already yielded
            self.last = seq
            event = Event.from_json(data)
            return _Step(event, ended=event.terminal)
        if kind == "snapshot" and isinstance(data.get("task"), dict):
            event = Event.from_snapshot(data)
            if event.task_id != self.task_id:
                return _Step()
            if data.get("id") == STATUS_ID:
                # Asked for only to learn that nothing more will come.
                done = event.terminal and self.last is not None and event.seq <= self.last
                return _Step(ended=done)
            if event.recovered and self.last is not None and event.seq <= self.last:
                return _Step()
            self.last = event.seq
            return _Step(event, ended=event.terminal)
        if kind == "error" and data.get("id") in (SUBSCRIBE_ID, STATUS_ID):
            code = str(data.get("code") or "error")
            if code in RETRIED_SUBSCRIBE_ERRORS:
                return _Step(retry=f"subscribe refused: {code}")
            fields = data.get("fields")
            raise ApiError(
                _STATUS_CODES.get(code, 400),
                code,
                str(data.get("message") or ""),
                fields if isinstance(fields, dict) else None,
            )
        return _Step()
