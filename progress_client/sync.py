"""`Client`: the same calls as `AsyncClient`, for code that is not async (Celery, RQ,
scripts). Each call runs on a private event loop on a daemon thread, so the caller needs
no asyncio; `report()` does not even wait for that thread: it hands the update over and
returns (coalescing and posting happen on the loop thread).

A process forked after the client was made (Celery's prefork pool, RQ's work horse)
gets its own loop and HTTP session on first use: nothing is shared with the parent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .aio import AsyncClient, AsyncTask, _check_progress, describe_exception
from .auth import TokenSource
from .errors import ProgressError
from .models import ApiKey, Event, ShareLink, Task, Update
from .retry import Backoff, RetryNotice
from .track import Progression
from .watcher import WatchSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever on a daemon thread, made again after a fork."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        #: The process that started the loop; another pid means we were forked.
        self._pid: int | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                self._start()
            assert self._loop is not None
            return self._loop

    @property
    def forked(self) -> bool:
        return self._pid is not None and self._pid != os.getpid()

    def _start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        thread = threading.Thread(target=run, name="progress-client", daemon=True)
        thread.start()
        ready.wait()
        self._loop, self._thread, self._pid = loop, thread, os.getpid()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for its result (or exception)."""
        loop = self.loop()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Client call from its own loop thread would deadlock")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the call too
            raise

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None or self.forked:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class Client:
    """The synchronous client; same arguments as `AsyncClient`."""

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
        on_retry: Callable[[RetryNotice], None] | None = None,
    ) -> None:
        self._options: dict[str, Any] = dict(
            on_retry=on_retry,
            api_key=api_key,
            token=token,
            username=username,
            password=password,
            report_rate=report_rate,
            coalesce=coalesce,
            retry_deadline=retry_deadline,
            request_timeout=request_timeout,
            backoff=backoff,
            watch=watch,
        )
        self._url = url
        self._thread = _LoopThread()
        self._client_lock = threading.Lock()
        # Made now so that a bad URL or argument fails here, not at the first call.
        self._async: AsyncClient | None = self._make_async()
        self._async_pid = os.getpid()

    def _make_async(self) -> AsyncClient:
        client = AsyncClient(self._url, **self._options)
        client._loop = self._thread.loop()
        return client

    @property
    def aio(self) -> AsyncClient:
        """The AsyncClient doing the work (a new one in a forked child)."""
        with self._client_lock:
            if self._async is None or self._async_pid != os.getpid():
                # After a fork the parent's session and loop thread are not ours to use;
                # they are left alone (closing them would disturb the parent's sockets).
                self._async = self._make_async()
                self._async_pid = os.getpid()
            return self._async

    @property
    def url(self) -> str:
        return self.aio.url

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._thread.run(coro)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Post what `report()` still holds, close the session, stop the loop thread."""
        if self._async is not None and self._async_pid == os.getpid():
            self._run(self._async.close())
        self._async = None
        self._thread.stop()

    # -- the calls, as AsyncClient's ----------------------------------------------------

    def _bind(self, task: AsyncTask) -> SyncTask:
        fields = {name: getattr(task, name) for name in Task.__dataclass_fields__}
        return SyncTask(**fields, _client=self)

    def login(self, username: str, password: str) -> str:
        return self._run(self.aio.login(username, password))

    def me(self) -> dict[str, Any]:
        return self._run(self.aio.me())

    def create_api_key(self, name: str, scopes: Iterable[str]) -> ApiKey:
        return self._run(self.aio.create_api_key(name, list(scopes)))

    def list_api_keys(self) -> list[ApiKey]:
        return self._run(self.aio.list_api_keys())

    def revoke_api_key(self, key_id: str) -> None:
        self._run(self.aio.revoke_api_key(key_id))

    def logout(self) -> None:
        self._run(self.aio.logout())

    def create_task(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        parent_id: str | None = None,
        weight: float = 1,
        auto_finish: bool = False,
        fail_fast: bool = False,
    ) -> SyncTask:
        """See `AsyncClient.create_task`."""
        return self._bind(
            self._run(
                self.aio.create_task(
                    kind,
                    params,
                    idempotency_key=idempotency_key,
                    parent_id=parent_id,
                    weight=weight,
                    auto_finish=auto_finish,
                    fail_fast=fail_fast,
                )
            )
        )

    def list_children(self, task_id: str, limit: int = 1000) -> list[SyncTask]:
        return [self._bind(t) for t in self._run(self.aio.list_children(task_id, limit))]

    def get_task(self, task_id: str) -> SyncTask:
        return self._bind(self._run(self.aio.get_task(task_id)))

    def list_tasks(
        self, status: str = "any", limit: int = 100, *, root: bool = False
    ) -> list[SyncTask]:
        return [self._bind(t) for t in self._run(self.aio.list_tasks(status, limit, root=root))]

    def list_events(self, task_id: str, after_seq: int = 0) -> list[Event]:
        return self._run(self.aio.list_events(task_id, after_seq))

    def report(
        self, task_id: str, progress: float, step: str | None = None, message: str | None = None
    ) -> None:
        """Coalesced report: returns at once, without waiting for the loop thread."""
        aio = self.aio
        aio._reporter(task_id).offer(Update(_check_progress(progress), step, message))

    def flush(self, task_id: str | None = None) -> None:
        self._run(self.aio.flush(task_id))

    def post_progress(
        self,
        task_id: str,
        progress: float,
        step: str | None = None,
        message: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        return self._run(
            self.aio.post_progress(
                task_id, progress, step, message, idempotency_key=idempotency_key
            )
        )

    def complete(
        self,
        task_id: str,
        result: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> int:
        return self._run(self.aio.complete(task_id, result, idempotency_key=idempotency_key))

    def fail(self, task_id: str, error: str, *, idempotency_key: str | None = None) -> int:
        return self._run(self.aio.fail(task_id, error, idempotency_key=idempotency_key))

    def cancel(self, task_id: str, *, idempotency_key: str | None = None) -> int:
        return self._run(self.aio.cancel(task_id, idempotency_key=idempotency_key))

    def share(self, task_id: str, ttl_s: int | None = None) -> ShareLink:
        return self._run(self.aio.share(task_id, ttl_s))

    def unshare(self, task_id: str) -> None:
        self._run(self.aio.unshare(task_id))

    def watch(self, task_id: str, last_seq: int | None = None) -> Iterator[Event]:
        """`for event in client.watch(id)`: see `AsyncClient.watch`."""
        events = self.aio.watch(task_id, last_seq)

        async def step() -> Event | None:
            try:
                return await events.__anext__()
            except StopAsyncIteration:
                return None

        try:
            while (event := self._run(step())) is not None:
                yield event
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None and not self._thread.forked:
                self._run(aclose())

    @contextmanager
    def task(
        self,
        kind: str,
        params: Mapping[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> Iterator[SyncTask]:
        """`with client.task(kind) as t:`: see `AsyncClient.task`."""
        task = self.create_task(kind, params, idempotency_key=idempotency_key)
        try:
            yield task
        except BaseException as exc:
            if not task._done:
                try:
                    task.fail(describe_exception(exc))
                except ProgressError as fail_error:
                    log.warning("could not fail task %s: %s", task.id, fail_error)
            raise
        if not task._done:
            task.complete(task.result)


@dataclass
class SyncTask(Task):
    """A task bound to a `Client`: the task's fields plus the calls that drive it."""

    _client: Client = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _done: bool = field(default=False, repr=False, compare=False)

    def report(self, progress: float, step: str | None = None, message: str | None = None) -> None:
        """Coalesced progress report; returns at once (see `AsyncClient.report`)."""
        self._client.report(self.id, progress, step, message)

    def flush(self) -> None:
        self._client.flush(self.id)

    def complete(self, result: Mapping[str, Any] | None = None) -> int:
        seq = self._client.complete(self.id, result)
        self._ended("completed", seq, progress=100, result=dict(result or {}))
        return seq

    def fail(self, error: str) -> int:
        seq = self._client.fail(self.id, error)
        self._ended("failed", seq, error=error)
        return seq

    def cancel(self) -> int:
        seq = self._client.cancel(self.id)
        self._ended("cancelled", seq, error="cancelled by user")
        return seq

    def _ended(self, status: str, seq: int, **changes: Any) -> None:
        self._done = True
        self.status, self.seq = status, seq
        self.message = None
        for name, value in changes.items():
            setattr(self, name, value)

    def refresh(self) -> SyncTask:
        self._update_from(self._client.get_task(self.id))
        return self

    def share(self, ttl_s: int | None = None) -> ShareLink:
        return self._client.share(self.id, ttl_s)

    def watch(self, last_seq: int | None = None) -> Iterator[Event]:
        return self._client.watch(self.id, last_seq)

    def track(
        self,
        items: Iterable[T],
        total: int | None = None,
        *,
        step: str | None = None,
        unit: str = "",
        start: float = 0.0,
        end: float = 100.0,
    ) -> Iterator[T]:
        """`for item in t.track(items, step="parse")`: see `AsyncTask.track`."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        rate = self._client.aio.report_rate
        progression = Progression(
            total, start=start, end=end, step=step, unit=unit, interval=1 / rate if rate else 0.1
        )
        self._offer(progression.update(0))
        done = 0
        for item in items:
            yield item
            done += 1
            self._offer(progression.update(done))
        self._offer(progression.update(done, final=True))

    def _offer(self, update: Update | None) -> None:
        if update is not None:
            self._client.report(self.id, update.progress, update.step, update.message)
