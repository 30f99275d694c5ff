"""`progress`: the command-line client (console script, also `python -m progress_client`).

Exit status: 0 on success; `watch` exits 0 / 1 / 2 when the task completed / failed /
was cancelled; `run` exits with the command's own status; 3 for an error from or on the
way to the server; 64 for a usage error; 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .aio import AsyncClient
from .bar import Display
from .config import Settings, config_path, load, resolve, save
from .errors import ApiError, ProgressError, ServerUnreachable, WatchStopped
from .runner import compile_pattern, run_command

EXIT_FAILED = 1
EXIT_CANCELLED = 2
EXIT_ERROR = 3
EXIT_USAGE = 64
EXIT_INTERRUPTED = 130
WATCH_EXIT = {"completed": 0, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
#: Scopes of the key `progress login` makes for this machine.
CLI_KEY_SCOPES = ("tasks:read", "tasks:write")


class CliError(Exception):
    """A problem to print as one line (exit 3)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("must be within 0..100")
    return int(value) if value.is_integer() else value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="progress",
        description="Client of the task-progress server. Settings come from `progress "
        "login` (saved in $XDG_CONFIG_HOME/progress/config.json), overridden by "
        "PROGRESS_URL, PROGRESS_API_KEY / PROGRESS_TOKEN, overridden by the flags below.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--url", help="server URL (default: $PROGRESS_URL, then the saved one)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--api-key", help="API key (default: $PROGRESS_API_KEY)")
    auth.add_argument("--token", help="access token (default: $PROGRESS_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    login = commands.add_parser("login", help="log in and save the credentials")
    login.add_argument("server", metavar="URL")
    login.add_argument("--username", help="default: asked")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument(
        "--no-key",
        action="store_true",
        help="save only the login token (1 h) instead of also making an API key",
    )
    commands.add_parser("logout", help="revoke the saved key, end the session, forget both")

    keys = commands.add_parser("keys", help="manage API keys (needs `progress login`)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create_key = key_commands.add_parser("create", help="make a key; prints it once")
    create_key.add_argument("name")
    create_key.add_argument(
        "--scope",
        action="append",
        choices=["tasks:read", "tasks:write"],
        required=True,
        help="repeat for both",
    )
    create_key.add_argument("--json", action="store_true")
    list_keys = key_commands.add_parser("list", help="the keys, without secrets")
    list_keys.add_argument("--json", action="store_true")
    revoke = key_commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id", metavar="ID")

    create = commands.add_parser("create", help="create a task; prints its id")
    create.add_argument("kind")
    create.add_argument("--params", type=_json_object, default={}, metavar="JSON")
    create.add_argument("--idempotency-key", metavar="KEY")

    get = commands.add_parser("get", help="print a task as JSON")
    get.add_argument("task_id", metavar="ID")

    report = commands.add_parser("report", help="post progress; prints the seq")
    report.add_argument("task_id", metavar="ID")
    report.add_argument("percent", type=_percent, metavar="PERCENT")
    report.add_argument("--step")
    report.add_argument("--message")

    complete = commands.add_parser("complete", help="complete a task")
    complete.add_argument("task_id", metavar="ID")
    complete.add_argument("--result", type=_json_object, metavar="JSON")
    fail = commands.add_parser("fail", help="fail a task")
    fail.add_argument("task_id", metavar="ID")
    fail.add_argument("error", nargs="?", default="failed", metavar="ERROR")
    cancel = commands.add_parser("cancel", help="cancel a task")
    cancel.add_argument("task_id", metavar="ID")

    watch = commands.add_parser(
        "watch", help="follow a task; exit 0 completed, 1 failed, 2 cancelled"
    )
    watch.add_argument("task_id", metavar="ID")
    watch.add_argument("--json", action="store_true", help="one JSON message per line")
    watch.add_argument("--last-seq", type=int, metavar="N", help="start after seq N")

    run = commands.add_parser(
        "run",
        help="run a command as a task",
        description="Run CMD as a task: started when it starts, completed or failed by its "
        "exit code; output lines matching --progress-regex are reported as progress.",
    )
    run.add_argument("--kind", default="command", help="task kind (default: command)")
    run.add_argument("--params", type=_json_object, default={}, metavar="JSON")
    run.add_argument(
        "--progress-regex",
        metavar="R",
        help="pattern for progress lines; its group `percent` (or first group) is the "
        "number (default: a percentage such as 42%%)",
    )
    run.add_argument("--step", help="step name of the progress reports")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="progress: %(message)s")
    if args.command == "run":
        if args.cmd[:1] == ["--"]:
            args.cmd = args.cmd[1:]
        if not args.cmd:
            parser.error("run needs a command: progress run [options] -- CMD ARGS...")
        try:
            args.pattern = compile_pattern(args.progress_regex)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        return asyncio.run(_dispatch(args))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except CliError as exc:
        _say(str(exc))
        return EXIT_ERROR
    except WatchStopped as exc:
        _say(f"error: {exc}")
        return EXIT_ERROR
    except ApiError as exc:
        _say(_describe_api_error(exc))
        return EXIT_ERROR
    except ServerUnreachable as exc:
        _say(f"error: server unreachable: {exc}")
        return EXIT_ERROR


def _say(line: str) -> None:
    print(f"progress: {line}", file=sys.stderr)


def _describe_api_error(exc: ApiError) -> str:
    line = f"error: {exc.status} {exc.code}: {exc.message}"
    for name, problems in exc.fields.items():
        text = "; ".join(problems) if isinstance(problems, list) else json.dumps(problems)
        line += f"\n  {name}: {text}"
    if exc.status == 401:
        line += "\n  (log in again: progress login URL)"
    return line


async def _dispatch(args: argparse.Namespace) -> int:
    path = config_path()
    if args.command == "login":
        return await _login(args, path)
    settings = resolve(load(path), os.environ, url=args.url, token=args.token, api_key=args.api_key)
    if not settings.url:
        raise CliError("no server: run `progress login URL`, or set PROGRESS_URL or --url")
    if args.command == "logout":
        return await _logout(settings, path)
    if args.command == "keys":
        if not settings.token:
            raise CliError("managing keys needs a login token: run `progress login URL`")
        async with AsyncClient(settings.url, token=settings.token) as client:
            return await _keys(args, client)
    if not (settings.api_key or settings.token):
        raise CliError("not logged in: run `progress login URL`, or set PROGRESS_API_KEY")
    if settings.api_key:
        client = AsyncClient(settings.url, api_key=settings.api_key)
    else:
        client = AsyncClient(settings.url, token=settings.token)
    async with client:
        handler = _TASK_COMMANDS[args.command]
        return await handler(args, client)


# -- login / logout / keys -------------------------------------------------------------


def _ask(prompt: str) -> str:
    """A line from the user, the prompt on stderr (stdout stays clean for scripts)."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise CliError("no input")
    return line.rstrip("\n")


async def _login(args: argparse.Namespace, path: Path) -> int:
    username = args.username or _ask("Username: ")
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise CliError("username and password are required")
    previous = load(path)
    async with AsyncClient(args.server, username=username, password=password) as client:
        token = await client.login(username, password)
        url = client.url
    saved = Settings(url=url, token=token, username=username)
    async with AsyncClient(url, token=token) as client:
        if not args.no_key:
            host = socket.gethostname() or "this machine"
            key = await client.create_api_key(f"progress CLI on {host}"[:64], CLI_KEY_SCOPES)
            saved.api_key, saved.api_key_id = key.key, key.id
        if previous.api_key_id and previous.url == url:
            # The key of the previous login on this machine is replaced, not left behind.
            with contextlib.suppress(ProgressError):
                await client.revoke_api_key(previous.api_key_id)
    save(path, saved)
    what = f"API key {saved.api_key_id}" if saved.api_key else "login token"
    _say(f"logged in to {url} as {username}; {what} saved in {path}")
    return 0


async def _logout(settings: Settings, path: Path) -> int:
    if settings.token:
        async with AsyncClient(settings.url, token=settings.token, retry_deadline=10) as client:
            if settings.api_key_id:
                with contextlib.suppress(ProgressError):
                    await client.revoke_api_key(settings.api_key_id)
            with contextlib.suppress(ProgressError):
                await client.logout()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    _say("logged out")
    return 0


async def _keys(args: argparse.Namespace, client: AsyncClient) -> int:
    if args.keys_command == "create":
        key = await client.create_api_key(args.name, args.scope)
        if args.json:
            print(
                json.dumps({"id": key.id, "name": key.name, "scopes": key.scopes, "key": key.key})
            )
        else:
            print(key.key)
            _say(f"key {key.id} ({', '.join(key.scopes)}): shown only this once")
    elif args.keys_command == "list":
        keys = await client.list_api_keys()
        if args.json:
            for key in keys:
                print(
                    json.dumps(
                        {
                            "id": key.id,
                            "name": key.name,
                            "scopes": key.scopes,
                            "created_at": key.created_at,
                            "last_used_at": key.last_used_at,
                        }
                    )
                )
        else:
            for key in keys:
                used = key.last_used_at or "never used"
                print(f"{key.id}\t{key.name}\t{','.join(key.scopes)}\t{key.created_at}\t{used}")
    else:
        await client.revoke_api_key(args.key_id)
        _say(f"key {args.key_id} revoked")
    return 0


# -- task commands ---------------------------------------------------------------------


async def _create(args: argparse.Namespace, client: AsyncClient) -> int:
    task = await client.create_task(args.kind, args.params, idempotency_key=args.idempotency_key)
    print(task.id)
    return 0


async def _get(args: argparse.Namespace, client: AsyncClient) -> int:
    task = await client.get_task(args.task_id)
    fields = {name: getattr(task, name) for name in type(task).__dataclass_fields__}
    print(json.dumps({k: v for k, v in fields.items() if not k.startswith("_")}, indent=2))
    return 0


async def _report(args: argparse.Namespace, client: AsyncClient) -> int:
    print(await client.post_progress(args.task_id, args.percent, args.step, args.message))
    return 0


async def _complete(args: argparse.Namespace, client: AsyncClient) -> int:
    print(await client.complete(args.task_id, args.result))
    return 0


async def _fail(args: argparse.Namespace, client: AsyncClient) -> int:
    print(await client.fail(args.task_id, args.error))
    return 0


async def _cancel(args: argparse.Namespace, client: AsyncClient) -> int:
    print(await client.cancel(args.task_id))
    return 0


async def _watch(args: argparse.Namespace, client: AsyncClient) -> int:
    live = not args.json and sys.stdout.isatty()
    display = Display(sys.stdout, live=live)
    ticker = asyncio.create_task(_tick(display)) if live else None
    last = None
    try:
        async for event in client.watch(args.task_id, args.last_seq):
            last = event
            if args.json:
                print(json.dumps(event.raw, ensure_ascii=False), flush=True)
            else:
                display.update(event)
    finally:
        if ticker is not None:
            ticker.cancel()
    if last is None:  # a watch from a last_seq at the end of a finished task
        last_task = await client.get_task(args.task_id)
        status = last_task.status
    else:
        status = last.status
        if not args.json:
            display.finish(last)
    return WATCH_EXIT.get(status, EXIT_ERROR)


async def _tick(display: Display) -> None:
    while True:
        await asyncio.sleep(1)
        display.tick()


async def _run(args: argparse.Namespace, client: AsyncClient) -> int:
    return await run_command(
        client,
        args.cmd,
        kind=args.kind,
        params=args.params,
        pattern=args.pattern,
        step=args.step,
        announce=_say,
    )


_TASK_COMMANDS: dict[str, Callable[[argparse.Namespace, AsyncClient], Awaitable[int]]] = {
    "create": _create,
    "get": _get,
    "report": _report,
    "complete": _complete,
    "fail": _fail,
    "cancel": _cancel,
    "watch": _watch,
    "run": _run,
}
