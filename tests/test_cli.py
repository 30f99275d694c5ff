"""The `progress` CLI as a user runs it (`python -m progress_client`, a real process)
against real `run.py` servers: login and keys, task commands, `run`, `watch`."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from progress_client import AsyncClient, Event
from progress_client.bar import Display

from .helpers import PASSWORD
from .sdk_support import WAIT, make_server, register, until
from .server_process import PROJECT_ROOT, ServerProcess, clean_env

__all__ = ["make_server"]  # the fixture, imported for pytest

MakeServer = Callable[..., ServerProcess]
USER = {"username": "alice", "password": PASSWORD}


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """The user's home and config folder for the CLI (nothing from the real one)."""
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def cli_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = clean_env({"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")})
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(extra or {})
    return env


async def progress(
    home: Path, *args: str, stdin: str = "", env: Mapping[str, str] | None = None
) -> Result:
    """Run `progress ARGS` to the end."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "progress_client",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(home, env),
        cwd=home,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), WAIT)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def _started(make_server: MakeServer) -> ServerProcess:
    server = make_server()
    await server.start()
    await register(server.base_url)
    return server


async def test_login_keys_and_task_commands(make_server: MakeServer, home: Path) -> None:
    """login saves a key (mode 600); keys create/list/revoke; create/report/complete/fail."""
    server = await _started(make_server)
    url = server.base_url
    login = await progress(
        home, "login", url, "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert login.code == 0, login.err
    config = home / ".config" / "progress" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.parent.stat().st_mode) == 0o700
    saved = json.loads(config.read_text())
    assert saved["url"] == url and saved["api_key"].startswith("pk_") and saved["token"]

    created = await progress(home, "keys", "create", "ci", "--scope", "tasks:write", "--json")
    assert created.code == 0, created.err
    ci_key = json.loads(created.out)
    assert ci_key["key"].startswith("pk_") and ci_key["scopes"] == ["tasks:write"]
    listed = await progress(home, "keys", "list", "--json")
    ids = [json.loads(line)["id"] for line in listed.out.splitlines()]
    assert ids == [saved["api_key_id"], ci_key["id"]]
    revoked = await progress(home, "keys", "revoke", ci_key["id"])
    assert revoked.code == 0, revoked.err

    # Logging in again replaces this machine's key instead of piling them up.
    again = await progress(
        home, "login", url, "--username", "alice", "--password-stdin", stdin=PASSWORD + "\n"
    )
    assert again.code == 0, again.err
    new_key_id = json.loads(config.read_text())["api_key_id"]
    listed = await progress(home, "keys", "list", "--json")
    assert [json.loads(line)["id"] for line in listed.out.splitlines()] == [new_key_id]

    task_id = (
        await progress(home, "create", "import", "--params", '{"file": "a.csv"}')
    ).out.strip()
    report = await progress(home, "report", task_id, "40", "--step", "parse", "--message", "2 of 5")
    assert (report.code, report.out.strip()) == (0, "3")  # created, started, progress
    complete = await progress(home, "complete", task_id, "--result", '{"rows": 5}')
    assert (complete.code, complete.out.strip()) == (0, "4")
    late = await progress(home, "report", task_id, "50")
    assert late.code == 3 and "409 task_finished" in late.err
    bad = await progress(home, "create", "not a kind!")
    assert bad.code == 3 and "422 validation_error" in bad.err and "kind:" in bad.err
    usage = await progress(home, "report", task_id, "150")
    assert usage.code == 64

    async with AsyncClient(url, **USER) as client:
        task = await client.get_task(task_id)
        events = await client.list_events(task_id)
    assert (task.status, task.params, task.result) == ("completed", {"file": "a.csv"}, {"rows": 5})
    assert [(e.event, e.progress, e.step, e.message) for e in events][2] == (
        "progress",
        40,
        "parse",
        "2 of 5",
    )

    logout = await progress(home, "logout")
    assert logout.code == 0 and not config.exists()
    async with AsyncClient(url, **USER) as client:
        assert await client.list_api_keys() == []
    gone = await progress(home, "create", "import")
    assert gone.code == 3 and "progress login" in gone.err


SCRIPT = """\
import sys
for percent in (10, 35, 70, 100):
    print(f"step {percent}%", flush=True)
print("warming up", file=sys.stderr)
print("last words", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""


async def test_run_reports_output_lines_and_the_exit_code(
    make_server: MakeServer, home: Path
) -> None:
    """`progress run` passes the output through, reports its percentages, ends by exit code."""
    server = await _started(make_server)
    async with AsyncClient(server.base_url, **USER) as client:
        key = (await client.create_api_key("ci", ["tasks:read", "tasks:write"])).key
    assert key is not None
    env = {"PROGRESS_URL": server.base_url, "PROGRESS_API_KEY": key}
    script = home / "job.py"
    script.write_text(SCRIPT)
    results = {}
    for code in (0, 3):
        results[code] = await progress(
            home, "run", "--kind", "build", "--", sys.executable, str(script), str(code), env=env
        )
    async with AsyncClient(server.base_url, api_key=key) as client:
        tasks = {t.status: t for t in await client.list_tasks()}
        events = {s: await client.list_events(t.id) for s, t in tasks.items()}

    for code, result in results.items():
        assert result.code == code, result.err
        assert result.out == "step 10%\nstep 35%\nstep 70%\nstep 100%\n"  # as the command wrote it
        assert "warming up\nlast words\n" in result.err
    done, failed = tasks["completed"], tasks["failed"]
    assert done.kind == failed.kind == "build"
    assert done.params["command"] == [sys.executable, str(script), "0"]
    assert done.result == {"exit_code": 0, "stderr_tail": "warming up\nlast words"}
    assert failed.error == "exit code 3\nwarming up\nlast words"
    for status in ("completed", "failed"):
        progress_events = [e for e in events[status] if e.event == "progress"]
        assert progress_events[0].message.startswith("started: ")
        # Coalesced, but the last line's value always arrives.
        assert (progress_events[-1].progress, progress_events[-1].message) == (100, "step 100%")

    missing = await progress(home, "run", "--", str(home / "no-such-command"), env=env)
    assert missing.code == 127


async def test_watch_exit_codes_and_a_restart(make_server: MakeServer, home: Path) -> None:
    """watch exits 0/1/2 by how the task ended; --json follows one across a server restart."""
    server = await _started(make_server)
    env = {"PROGRESS_URL": server.base_url}
    async with AsyncClient(server.base_url, **USER) as client:
        key = (await client.create_api_key("cli", ["tasks:read", "tasks:write"])).key
        assert key is not None
        env["PROGRESS_API_KEY"] = key
        ended = {}
        for status in ("completed", "failed", "cancelled"):
            task = await client.create_task("job")
            await task.report(30, step="work")
            if status == "completed":
                await task.complete({"ok": True})
            elif status == "failed":
                await task.fail("boom")
            else:
                await task.cancel()
            ended[status] = task.id
        finished = {s: await progress(home, "watch", i, env=env) for s, i in ended.items()}
        assert [r.code for r in finished.values()] == [0, 1, 2]
        assert "completed in" in finished["completed"].out
        assert "failed after" in finished["failed"].out and "boom" in finished["failed"].out
        assert "cancelled after" in finished["cancelled"].out

        live = await client.create_task("render")
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "progress_client",
            "watch",
            live.id,
            "--json",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(home, env),
            cwd=home,
        )
        assert watcher.stdout is not None
        lines: list[dict[str, object]] = []

        async def read() -> None:
            assert watcher.stdout is not None
            while line := await watcher.stdout.readline():
                lines.append(json.loads(line))

        reader = asyncio.ensure_future(read())
        await until(lambda: len(lines) == 1)  # the snapshot
        seq = await client.post_progress(live.id, 20, step="encode")
        await until(lambda: len(lines) == 3)  # started, progress
        await server.restart()  # SIGKILL: the watch reconnects and resumes
        seq = await client.post_progress(live.id, 60, step="encode")
        seq = await client.complete(live.id, {"frames": 3})
        assert await asyncio.wait_for(watcher.wait(), WAIT) == 0
        await reader
    assert lines[0]["type"] == "snapshot"
    assert [m["seq"] for m in lines[1:]] == list(range(2, seq + 1))
    assert [m.get("event") for m in lines[1:]] == ["started", "progress", "progress", "completed"]
    assert "ws.connect" in server.output(0) and "ws.connect" in server.output(1)


def test_bar_shows_percent_step_message_and_elapsed() -> None:
    """On a terminal the bar is one line redrawn in place, with the elapsed time."""
    now = [1_000_000.0]
    out = io.StringIO()
    display = Display(out, live=True, clock=lambda: now[0])
    snapshot = Event.from_snapshot(
        {
            "type": "snapshot",
            "task": {
                "id": "t",
                "kind": "k",
                "status": "running",
                "progress": 42,
                "step": "parse",
                "message": "2,000 of 5,000 rows",
                "seq": 3,
                "created_at": "1970-01-12T13:46:30.000Z",
                "started_at": "1970-01-12T13:46:35.000Z",
            },
        }
    )
    display.update(snapshot)
    now[0] += 65
    display.tick()
    frames = out.getvalue().split("\r\x1b[K")[1:]
    assert len(frames) == 2
    assert frames[0].startswith("[########------------]    42%  parse 2,000 of 5,000 rows")
    assert frames[0].rstrip().endswith("0:05") and frames[1].rstrip().endswith("1:10")
    assert "\n" not in out.getvalue()
