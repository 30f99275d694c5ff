"""The examples of docs/sdk.md, run as written: the Celery task under real Celery (eager),
the RQ job under a real RQ worker and redis-server, the asyncio watcher as a program that
follows a task through a server restart."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from progress_client import AsyncClient

from .helpers import PASSWORD
from .redis_server import RedisServer
from .sdk_support import SERVER_ARGS, WAIT, register
from .server_process import PROJECT_ROOT, ServerProcess, clean_env

DOC = PROJECT_ROOT / "docs" / "sdk.md"
EXAMPLE = re.compile(r"<!-- example: (\S+) -->\n```python\n(.*?)```", re.S)
USER = {"username": "alice", "password": PASSWORD}


def examples() -> dict[str, str]:
    return dict(EXAMPLE.findall(DOC.read_text(encoding="utf-8")))


def need(module: str) -> ModuleType:
    """Import a library an example uses (in the test extra): skip without it, or fail on CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def server(tmp_path: Path, unused_tcp_port: int) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, unused_tcp_port, tmp_path / "app.db", SERVER_ARGS)
    asyncio.run(proc.start())
    asyncio.run(register(proc.base_url))
    yield proc
    proc.close()


@pytest.fixture
def env(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """PROGRESS_URL and a PROGRESS_API_KEY, set in this process too (examples read them)."""

    async def make_key() -> str:
        async with AsyncClient(server.base_url, **USER) as client:
            key = await client.create_api_key("examples", ["tasks:read", "tasks:write"])
        assert key.key is not None
        return key.key

    values = {"PROGRESS_URL": server.base_url, "PROGRESS_API_KEY": asyncio.run(make_key())}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


@pytest.fixture
def example_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The examples as files, importable by name (RQ imports its job by name)."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for name, code in examples().items():
        (folder / name).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(folder))
    return folder


def task_state(server: ServerProcess, task_id: str) -> tuple[Any, list[Any]]:
    async def read() -> tuple[Any, list[Any]]:
        async with AsyncClient(server.base_url, **USER) as client:
            return await client.get_task(task_id), await client.list_events(task_id)

    return asyncio.run(read())


def test_the_doc_has_the_three_examples() -> None:
    """docs/sdk.md marks a Celery task, an RQ job and an asyncio watcher as examples."""
    assert set(examples()) == {"celery_tasks.py", "rq_jobs.py", "watch_task.py"}


def test_celery_example(server: ServerProcess, env: dict[str, str], example_dir: Path) -> None:
    """The Celery task runs under Celery, reports its rows and completes its task."""
    need("celery")
    tasks = importlib.import_module("celery_tasks")
    tasks.app.conf.task_always_eager = True  # run in this process: no broker needed
    data = example_dir / "a.csv"
    data.write_text("id,name\n1,a\n2,b\n3,c\n")
    try:
        task_id = tasks.import_csv.apply(args=[str(data)]).get()
    finally:
        tasks.progress.close()
    task, events = task_state(server, task_id)
    assert (task.kind, task.status, task.result) == ("import", "completed", {"rows": 3})
    assert task.params == {"file": str(data)}
    last = [e for e in events if e.event == "progress"][-1]
    assert (last.progress, last.step, last.message) == (100, "import", "3 of 3 rows")


def test_rq_example(
    server: ServerProcess, env: dict[str, str], example_dir: Path, redis_server: RedisServer
) -> None:
    """The RQ job runs under a real RQ worker and Redis, and completes its task."""
    need("rq")
    from redis import Redis
    from rq import Queue, SimpleWorker

    connection = Redis.from_url(redis_server.url)
    try:
        queue = Queue(connection=connection)
        job = queue.enqueue("rq_jobs.render", 24)
        assert SimpleWorker([queue], connection=connection).work(burst=True)
        job.refresh()
        task_id = job.return_value()
    finally:
        importlib.import_module("rq_jobs").progress.close()
        connection.close()
    assert isinstance(task_id, str), job.latest_result()
    task, _ = task_state(server, task_id)
    assert (task.kind, task.status, task.result) == ("render", "completed", {"frames": 24})


def test_asyncio_watcher_example(
    server: ServerProcess, env: dict[str, str], example_dir: Path
) -> None:
    """The watcher prints every event once, in order, through a restart, and exits 0."""

    async def run() -> tuple[int, str, int]:
        async with AsyncClient(server.base_url, **USER) as client:
            task = await client.create_task("render")
            watcher = await asyncio.create_subprocess_exec(
                sys.executable,
                str(example_dir / "watch_task.py"),
                task.id,
                stdout=subprocess.PIPE,
                env={**clean_env(env), "PYTHONPATH": str(PROJECT_ROOT)},
            )
            assert watcher.stdout is not None
            first = await asyncio.wait_for(watcher.stdout.readline(), WAIT)  # the snapshot
            await client.post_progress(task.id, 30, step="encode")
            await server.restart()  # SIGKILL: the watcher reconnects and resumes
            await client.post_progress(task.id, 70, step="encode")
            seq = await client.complete(task.id)
            rest, _ = await asyncio.wait_for(watcher.communicate(), WAIT)
            return watcher.returncode or 0, (first + rest).decode(), seq

    code, out, seq = asyncio.run(run())
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert [int(line[0]) for line in lines] == list(range(1, seq + 1))
    assert [line[1] for line in lines] == [
        "snapshot",
        "started",
        "progress",
        "progress",
        "completed",
    ]
