"""`AsyncClient`: the SDK on aiohttp, and `AsyncTask`, a task bound to it.

Every call goes through `AsyncClient._call`: one place for the bearer credential (renewed
once on a 401 when it can be), the `Idempotency-Key` (made once per logical post and sent
again, unchanged, with every retry of it), and retries with full-jitter backoff that
honour `Retry-After`, until `retry_deadline`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from . import __version__
from .auth import Credentials, TokenSource
from .errors import ApiError, ProgressError, ServerUnreachable
from .models import ApiKey, Event, ShareLink, Task, Update
from .reporter import Reporter
from .retry import Backoff, RetryNotice
from .track import Progression
from .watcher import WatchSettings, watch_task

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses that are retried: the server stored nothing (429, 503), or a proxy or the
#: server gave up on the request (408, 502, 504), which is retried only when a replay is
#: harmless (a GET, or a post with an Idempotency-Key).
_NOTHING_STORED = frozenset({429, 503})
_AMBIGUOUS = frozenset({408, 502, 504})
#: Most bytes of `error` the server accepts on fail (longer texts are cut, not refused).
MAX_ERROR_BYTES = 2000


def _base_url(url: str) -> str:
    """ "http://host:8080", "http://host:8080/" and "http://host:8080/api/v1" alike."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    if path.endswith("/api/v1"):
        path = path[: -len("/api/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def truncate_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, on a character boundary."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def describe_exception(exc: BaseException) -> str:
    """The `error` text a task fails with when its block raises."""
    text = str(exc)
    return truncate_utf8(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 2000)


class AsyncClient:
    """The task-progress server's client for asyncio code.

    Args:
        url: the server, e.g. "http://127.0.0.1:8080" (default: $PROGRESS_URL).
        api_key: an API key ("pk_..."), the usual credential of a worker.
        token: an access token, or a function (sync or async) returning one; it is asked
            again whenever the server refuses the token, so it can return a fresh one.
        username, password: log in (and log in again when the token expires).
            With none of the three, $PROGRESS_API_KEY or $PROGRESS_TOKEN is used.
        report_rate: most progress posts per second per task made by `report()`
            (None: no limit).
        coalesce: True: between two posts `report()` keeps only the latest update of each
            step; False: it keeps every update and posts them in batches.
        retry_deadline: seconds one call may spend retrying before it raises.
        request_timeout: seconds one HTTP attempt may take.
        backoff: delays between HTTP retries.
        watch: how `watch()` connects and reconnects.
        session: an aiohttp session to use (not closed by `close()`).
        on_retry: called with a `RetryNotice` before each retry (for logs or metrics).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        token: TokenSource | None = None,
        username: str | None = None,
        password: str | None = None,
        report_rate: float | None = 4.0,
        coalesce: bool = True,
        retry_deadline: float = 60.0,
        request_timeout: float = 10.0,
        backoff: Backoff = Backoff(),
        watch: WatchSettings = WatchSettings(),
        session: aiohttp.ClientSession | None = None,
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        url = url or os.environ.get("PROGRESS_URL")
        if not url:
            raise ValueError("no server URL: pass url= or set PROGRESS_URL")
        if api_key is None and token is None and username is None:
            api_key = os.environ.get("PROGRESS_API_KEY") or None
            token = None if api_key else os.environ.get("PROGRESS_TOKEN") or None
        if report_rate is not None and report_rate <= 0:
            raise ValueError("report_rate must be > 0 (or None: no limit)")
        #: The server's base URL (no trailing slash, no /api/v1).
        self.url = _base_url(url)
        self._api = self.url + "/api/v1"
        scheme = "wss" if self.url.startswith("https:") else "ws"
        self._ws_url = scheme + self.url[self.url.index(":") :] + "/api/v1/ws"
        self._creds = Credentials(
            api_key=api_key, token=token, username=username, password=password
        )
        self._creds.login = self._login
        self.report_rate = report_rate
        self.coalesce = coalesce
        self.retry_deadline = retry_deadline
        self.request_timeout = request_timeout
        self.backoff = backoff
        self.watch_settings = watch
        self._on_retry = on_retry
        self._session = session
        self._own_session = session is None
        #: task id -> its Reporter; made on first report() (possibly on another thread).
        self._reporters: dict[str, Reporter] = {}
        self._reporters_lock = threading.Lock()
        #: The loop this client runs on (set on first use; aiohttp sessions are per loop).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Post what `report()` still holds, then close the HTTP session."""
        if self._closed:
            return
        self._closed = True
        with self._reporters_lock:
            reporters = list(self._reporters.values())
            self._reporters.clear()
        for reporter in reporters:
            try:
                await reporter.flush()
            except ProgressError as exc:
                log.warning("progress report lost at close: %s", exc)
            reporter.close()
        if self._session is not None and self._own_session:
            await self._session.close()
        self._session = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._session is None:
            self._loop = asyncio.get_running_loop()
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": f"progress-client/{__version__}"},
                timeout=aiohttp.ClientTimeout(total=self.request_timeout),
            )
        return self._session

    # -- the one request path ------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        auth: bool = True,
        replay_safe: bool | None = None,
        token: str | None = None,
    ) -> Any:
        """One logical request, retried as the module docstring says; the JSON answer.

        `replay_safe`: may a request that perhaps reached the server be sent again?
        Default: for GET and for posts with an Idempotency-Key.
        """
        session = await self._get_session()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_deadline
        if replay_safe is None:
            replay_safe = method == "GET" or idempotency_key is not None
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False, allow_nan=False).encode("utf-8")
        url = self._api + path
        attempt = 0
        renewed = False
        while True:
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            sent = token
            if auth and sent is None:
                sent = await self._creds.current()
            if sent:
                headers["Authorization"] = f"Bearer {sent}"
            if idempotency_key is not None:
                headers["Idempotency-Key"] = idempotency_key
            retry_after: float | None = None
            try:
                async with session.request(
                    method, url, data=data, params=params, headers=headers
                ) as resp:
                    status, raw, resp_headers = resp.status, await resp.read(), resp.headers
            except aiohttp.ClientConnectorError as exc:
                # Never reached the server (refused, DNS, unreachable): always safe to retry.
                failure: ProgressError = ServerUnreachable(f"{method} {path}: {exc}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = ServerUnreachable(f"{method} {path}: {type(exc).__name__}: {exc}")
                if not replay_safe:
                    raise failure from exc
            else:
                if status < 300:
                    return json.loads(raw) if raw and status != 204 else None
                error = ApiError.from_response(status, raw, resp_headers)
                if status == 401 and auth and token is None and not renewed:
                    renewed = True
                    if await self._creds.renew(sent):
                        continue
                if status not in _NOTHING_STORED and not (status in _AMBIGUOUS and replay_safe):
                    raise error
                failure, retry_after = error, error.retry_after
            attempt += 1
            delay = self.backoff.delay(attempt, retry_after)
            if loop.time() + delay > deadline:
                raise failure
            log.info("%s %s: %s; retry %d in %.2f s", method, path, failure, attempt, delay)
            if self._on_retry is not None:
                try:
                    self._on_retry(RetryNotice(method, path, attempt, delay, failure))
                except Exception:  # a broken hook must not break the call
                    log.exception("on_retry hook failed")
            await asyncio.sleep(delay)

    async def _login(self, username: str, password: str) -> str:
        answer = await self._call(
            "POST",
            "/auth/login",
            {"username": username, "password": password},
            auth=False,
            replay_safe=True,  # a second session at worst
        )
        return str(answer["access_token"])

    # -- accounts and keys ---------------------------------------------------------------

    async def login(self, username: str, password: str) -> str:
        """Log in and return an access token (the client keeps using its own credential)."""
        return await self._login(username, password)

    async def me(self) -> dict[str, Any]:
        """`{id, username}` of the caller."""
        return dict(await self._call("GET", "/auth/me"))

    async def create_api_key(self, name: str, scopes: Iterable[str]) -> ApiKey:
        """A new API key; its secret is in `.key`, shown only this once. Needs a login token."""
        answer = await self._call("POST", "/api-keys", {"name": name, "scopes": list(scopes)})
        return ApiKey.from_json(answer)

    async def list_api_keys(self) -> list[ApiKey]:
        """The caller's keys, without secrets, with `last_used_at`."""
        answer = await self._call("GET", "/api-keys")
        items = answer["api_keys"] if isinstance(answer, dict) else answer
        return [ApiKey.from_json(item) for item in items]

    async def revoke_api_key(self, key_id: str) -> None:
        """Revoke a key at once (404 `not_found` for an unknown or another user's key)."""
        await self._call("DELETE", f"/api-keys/{quote(key_id, safe='')}", replay_safe=True)

    async def logout(self) -> None:
        """End the session of the client's login token."""
        await self._call("POST", "/auth/logout", replay_safe=True)

    # -- tasks ---------------------------------------------------------------------------

    def _bind(self, data: dict[str, Any]) -> AsyncTask:
        task = AsyncTask.from_json(data)
        task._client = self
        return task

    async def create_task(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        parent_id: str | None = None,
        weight: float = 1,
        auto_finish: bool = False,
        fail_fast: bool = False,
    ) -> AsyncTask:
        """Create an external task (status `pending`) and return it, bound to this client.

        `idempotency_key`: pass one derived from your own job id (a Celery task id, say)
        and a re-run of the same job gets the same task back instead of a second one
        (within the server's 24 h). By default a fresh key is made for this one call.
        `parent_id` makes it a child counting `weight` in that task's progress; a parent
        created with `auto_finish` completes (or fails) by itself when its children end.
        """
        body: dict[str, Any] = {"kind": kind, "params": dict(params or {})}
        if parent_id is not None:
            body["parent_id"] = parent_id
        if weight != 1:
            body["weight"] = weight
        if auto_finish:
            body["auto_finish"] = True
        if fail_fast:
            body["fail_fast"] = True
        key = idempotency_key or uuid.uuid4().hex
        return self._bind(await self._call("POST", "/tasks", body, idempotency_key=key))

    async def list_children(self, task_id: str, limit: int = 1000) -> list[AsyncTask]:
        """The task's children, oldest first, following the server's pages."""
        tasks: list[AsyncTask] = []
        cursor: str | None = None
        while len(tasks) < limit:
            params: dict[str, Any] = {"limit": min(1000, limit - len(tasks))}
            if cursor is not None:
                params["cursor"] = cursor
            page = await self._call("GET", f"/tasks/{_task_path(task_id)}/children", params=params)
            tasks.extend(self._bind(item) for item in page["tasks"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        return tasks

    async def get_task(self, task_id: str) -> AsyncTask:
        """The task as the server has it now (404 `not_found` if missing or not yours)."""
        return self._bind(await self._call("GET", f"/tasks/{_task_path(task_id)}"))

    async def list_tasks(
        self, status: str = "any", limit: int = 100, *, root: bool = False
    ) -> list[AsyncTask]:
        """Up to `limit` of the caller's tasks, newest first (`status`: any, active, or one
        status; `root`: only tasks with no parent), following the server's pages."""
        tasks: list[AsyncTask] = []
        cursor: str | None = None
        while len(tasks) < limit:
            params: dict[str, Any] = {"status": status, "limit": min(500, limit - len(tasks))}
            if root:
                params["root"] = "true"
            if cursor is not None:
                params["cursor"] = cursor
            page = await self._call("GET", "/tasks", params=params)
            tasks.extend(self._bind(item) for item in page["tasks"])
            cursor = page.get("next_cursor")
            if cursor is None or not page["tasks"]:
                break
        return tasks

    async def list_events(self, task_id: str, after_seq: int = 0) -> list[Event]:
        """Every stored event after `after_seq`, in seq order, following the pages."""
        events: list[Event] = []
        while True:
            page = await self._call(
                "GET",
                f"/tasks/{_task_path(task_id)}/events",
                params={"after_seq": after_seq, "limit": 1000},
            )
            events.extend(Event.from_json(item) for item in page["events"])
            following = page.get("next_after_seq")
            if following is None or not page["events"]:
                return events
            after_seq = following

    def _reporter(self, task_id: str) -> Reporter:
        with self._reporters_lock:
            reporter = self._reporters.get(task_id)
            if reporter is None:
                if self._loop is None:
                    self._loop = asyncio.get_running_loop()
                reporter = Reporter(
                    self._loop,
                    lambda batch: self.post_progress_batch(task_id, batch),
                    rate=self.report_rate,
                    coalesce=self.coalesce,
                )
                self._reporters[task_id] = reporter
            return reporter

    def _forget(self, task_id: str) -> None:
        with self._reporters_lock:
            reporter = self._reporters.pop(task_id, None)
        if reporter is not None:
            reporter.close()

    async def report(
        self, task_id: str, progress: float, step: str | None = None, message: str | None = None
    ) -> None:
        """Report progress, coalesced: returns at once, the post happens in the background
        (at most `report_rate` posts per second per task, always the latest value).

        Raises (once) the ApiError that refused an earlier post of this task: a
        `task_finished` (409) means someone cancelled it, so stop working on it.
        """
        self._reporter(task_id).offer(Update(_check_progress(progress), step, message))
        await asyncio.sleep(0)  # let the sender run even in a loop that never waits

    async def flush(self, task_id: str | None = None) -> None:
        """Wait until what `report()` holds for the task (or every task) is posted."""
        with self._reporters_lock:
            if task_id is None:
                reporters = list(self._reporters.values())
            else:
                reporters = [r for r in [self._reporters.get(task_id)] if r is not None]
        for reporter in reporters:
            await reporter.flush()

    async def post_progress(
        self,
        task_id: str,
        progress: float,
        step: str | None = None,
        message: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """One progress post now, not coalesced; returns the seq of its event."""
        body = Update(_check_progress(progress), step, message).to_json()
        return await self._post_task(task_id, "progress", body, idempotency_key)

    async def post_progress_batch(self, task_id: str, updates: list[Update]) -> int:
        """Post several updates in one transaction (consecutive seqs); the last seq."""
        if len(updates) == 1:
            return await self._post_task(task_id, "progress", updates[0].to_json(), None)
        body = {"updates": [u.to_json() for u in updates]}
        return await self._post_task(task_id, "progress", body, None)

    async def complete(
        self,
        task_id: str,
        result: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        """Post pending reports, then complete the task (`result`: a JSON object)."""
        await self._flush_before_end(task_id)
        body = {} if result is None else {"result": dict(result)}
        return await self._finish(task_id, "complete", body, idempotency_key)

    async def fail(self, task_id: str, error: str, *, idempotency_key: str | None = None) -> int:
        """Post pending reports, then fail the task (`error` is cut to 2000 bytes)."""
        await self._flush_before_end(task_id)
        body = {"error": truncate_utf8(error or "failed", MAX_ERROR_BYTES)}
        return await self._finish(task_id, "fail", body, idempotency_key)

    async def cancel(self, task_id: str, *, idempotency_key: str | None = None) -> int:
        """Cancel the task (what is pending for it is dropped, not posted)."""
        with self._reporters_lock:
            reporter = self._reporters.get(task_id)
        if reporter is not None:
            reporter.discard()
        return await self._finish(task_id, "cancel", {}, idempotency_key)

    async def _flush_before_end(self, task_id: str) -> None:
        with self._reporters_lock:
            reporter = self._reporters.get(task_id)
        if reporter is None:
            return
        try:
            await reporter.flush()
        except ApiError as exc:
            # The end post below gets the same refusal (task finished or gone) if it
            # still holds; an invalid update must not keep the task from finishing.
            log.warning("progress report refused before the end of task %s: %s", task_id, exc)

    async def _finish(
        self, task_id: str, action: str, body: dict[str, Any], key: str | None
    ) -> int:
        try:
            return await self._post_task(task_id, action, body, key)
        finally:
            self._forget(task_id)

    async def _post_task(
        self, task_id: str, action: str, body: dict[str, Any], key: str | None
    ) -> int:
        answer = await self._call(
            "POST",
            f"/tasks/{_task_path(task_id)}/{action}",
            body,
            idempotency_key=key or uuid.uuid4().hex,
        )
        return int(answer["seq"])

    async def share(self, task_id: str, ttl_s: int | None = None) -> ShareLink:
        """A read-only share token for the task (default 1 day, at most 30)."""
        body = {} if ttl_s is None else {"ttl_s": ttl_s}
        # Not an idempotent route; a retry that makes a second token is harmless.
        answer = await self._call(
            "POST", f"/tasks/{_task_path(task_id)}/share", body, replay_safe=True
        )
        return ShareLink.from_json(answer)

    async def unshare(self, task_id: str) -> None:
        """End every share token of the task."""
        await self._call("DELETE", f"/tasks/{_task_path(task_id)}/share", replay_safe=True)

    def watch(self, task_id: str, last_seq: int | None = None) -> AsyncIterator[Event]:
        """Follow the task: `async for event in client.watch(id)`; ends after the terminal
        event. With `last_seq` it starts with the events after it (0: all of them), else
        with a snapshot of the task. Each seq comes once, in order, across reconnects;
        a `recovered=False` snapshot replaces history the server no longer keeps."""
        return watch_task(
            self._get_session, self._ws_url, self._creds, task_id, last_seq, self.watch_settings
        )

    @asynccontextmanager
    async def task(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> AsyncIterator[AsyncTask]:
        """`async with client.task(kind) as t:` creates the task; on leaving the block it
        completes it with `t.result` (set it in the block), or fails it with the error if
        the block raised. A task the block finished itself is left alone."""
        task = await self.create_task(kind, params, idempotency_key=idempotency_key)
        task.result = None
        try:
            yield task
        except BaseException as exc:
            if not task._done:
                try:
                    await task.fail(describe_exception(exc))
                except ProgressError as fail_error:
                    log.warning("could not fail task %s: %s", task.id, fail_error)
            raise
        if not task._done:
            await task.complete(task.result)


def _task_path(task_id: str) -> str:
    return quote(task_id, safe="")


def _check_progress(progress: float) -> float:
    if isinstance(progress, bool) or not isinstance(progress, int | float):
        raise TypeError("progress must be a number")
    if not 0 <= progress <= 100:  # NaN fails this too
        raise ValueError(f"progress must be within 0..100, not {progress!r}")
    return progress


@dataclass
class AsyncTask(Task):
    """A task bound to an `AsyncClient`: the task's fields plus the calls that drive it."""

    _client: AsyncClient = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    #: True once this handle completed, failed or cancelled the task.
    _done: bool = field(default=False, repr=False, compare=False)

    async def report(
        self, progress: float, step: str | None = None, message: str | None = None
    ) -> None:
        """Coalesced progress report (see `AsyncClient.report`)."""
        await self._client.report(self.id, progress, step, message)

    async def flush(self) -> None:
        """Wait until the pending reports are posted."""
        await self._client.flush(self.id)

    async def complete(self, result: Mapping[str, Any] | None = None) -> int:
        """Flush, then complete with `result`; returns the seq."""
        seq = await self._client.complete(self.id, result)
        self._ended("completed", seq, progress=100, result=dict(result or {}))
        return seq

    async def fail(self, error: str) -> int:
        """Flush, then fail with `error`; returns the seq."""
        seq = await self._client.fail(self.id, error)
        self._ended("failed", seq, error=error)
        return seq

    async def cancel(self) -> int:
        """Cancel; returns the seq."""
        seq = await self._client.cancel(self.id)
        self._ended("cancelled", seq, error="cancelled by user")
        return seq

    def _ended(self, status: str, seq: int, **changes: Any) -> None:
        self._done = True
        self.status, self.seq = status, seq
        self.message = None
        for name, value in changes.items():
            setattr(self, name, value)

    async def refresh(self) -> AsyncTask:
        """Reload the fields from the server; returns self."""
        self._update_from(await self._client.get_task(self.id))
        return self

    async def share(self, ttl_s: int | None = None) -> ShareLink:
        return await self._client.share(self.id, ttl_s)

    def watch(self, last_seq: int | None = None) -> AsyncIterator[Event]:
        return self._client.watch(self.id, last_seq)

    async def track(
        self,
        items: Iterable[T] | AsyncIterable[T],
        total: int | None = None,
        *,
        step: str | None = None,
        unit: str = "",
        start: float = 0.0,
        end: float = 100.0,
    ) -> AsyncIterator[T]:
        """`async for item in t.track(items, total=n, step="parse")`: yields the items and
        reports progress from `start` to `end` percent by count and time, not per item.
        `total` defaults to `len(items)` when it has one."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        rate = self._client.report_rate
        progression = Progression(
            total, start=start, end=end, step=step, unit=unit, interval=1 / rate if rate else 0.1
        )
        done = 0
        await self._offer(progression.update(0))
        if isinstance(items, AsyncIterable):
            async for item in items:
                yield item
                done += 1
                await self._offer(progression.update(done))
        else:
            for item in items:
                yield item
                done += 1
                await self._offer(progression.update(done))
        await self._offer(progression.update(done, final=True))

    async def _offer(self, update: Update | None) -> None:
        if update is not None:
            await self._client.report(self.id, update.progress, update.step, update.message)
