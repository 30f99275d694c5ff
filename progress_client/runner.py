"""`progress run -- CMD ARGS...`: a command as a task.

The task is created, then the command started (its first report moves the task to
`running`); each line of its output matching the progress pattern is reported (coalesced
like any `report()`), and its exit code completes or fails the task, with the last lines
of its stderr. Its output reaches our stdout and stderr unchanged, as it comes, partial
lines included (a progress bar redrawn with `\\r` still shows).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from .aio import AsyncClient, AsyncTask, truncate_utf8
from .errors import ProgressError

#: A percentage such as "42%", "42 %" or "99.5%" (not part of a longer number).
DEFAULT_PATTERN = r"(?<![\d.])(?P<percent>\d{1,3}(?:\.\d+)?)\s?%"
#: Lines of stderr kept for the result or error.
TAIL_LINES = 10
#: Longest line (bytes) kept for matching; longer ones are cut, not buffered forever.
MAX_LINE = 64 * 1024
#: Longest progress message made from a line, in characters.
MAX_MESSAGE = 500


class LineMatcher:
    """Splits output into lines (at \\n and \\r) and finds the progress in them."""

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._partial = b""

    def feed(self, chunk: bytes) -> list[str]:
        """Take a chunk of output; returns the lines it completed."""
        parts = re.split(rb"\r\n|\r|\n", self._partial + chunk)
        self._partial = parts.pop()[-MAX_LINE:]
        return [p[:MAX_LINE].decode("utf-8", "replace") for p in parts]

    def close(self) -> list[str]:
        """The last line, if it had no newline."""
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", "replace")] if rest else []

    def percent(self, line: str) -> float | None:
        """The progress a line reports, or None."""
        found = self._pattern.search(line)
        if found is None:
            return None
        named = found.groupdict().get("percent")
        text = named or (found.group(1) if found.re.groups else found.group(0))
        try:
            percent = float(str(text).strip().rstrip("%"))
        except ValueError:
            return None
        return percent if 0 <= percent <= 100 else None


def compile_pattern(pattern: str | None) -> re.Pattern[str]:
    """The --progress-regex: a group named `percent`, or the first group, is the number."""
    try:
        return re.compile(pattern or DEFAULT_PATTERN)
    except re.error as exc:
        raise ValueError(f"bad --progress-regex: {exc}") from None


async def _pump(
    stream: asyncio.StreamReader | None,
    out: BinaryIO,
    matcher: LineMatcher,
    task: AsyncTask,
    step: str | None,
    tail: deque[str] | None,
) -> None:
    """Copy the command's output as it comes; report the lines that carry progress."""
    assert stream is not None
    closed = False  # our own output went away (`progress run ... | head`): keep draining
    while True:
        chunk = await stream.read(65536)
        lines = matcher.feed(chunk) if chunk else matcher.close()
        if chunk and not closed:
            try:
                out.write(chunk)
                out.flush()
            except (BrokenPipeError, ValueError):
                closed = True
        for line in lines:
            if tail is not None and line.strip():
                tail.append(line)
            percent = matcher.percent(line)
            if percent is not None:
                try:
                    await task.report(percent, step, line.strip()[:MAX_MESSAGE])
                except ProgressError as exc:  # e.g. cancelled meanwhile: keep running
                    print(f"progress: report refused: {exc}", file=sys.stderr)
        if not chunk:
            return


def exit_status(returncode: int) -> int:
    """A shell's view of it: 128 + N for a command killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit code {returncode}"


async def run_command(
    client: AsyncClient,
    argv: list[str],
    *,
    kind: str,
    params: Mapping[str, Any] | None = None,
    pattern: re.Pattern[str],
    step: str | None = None,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
    announce: Callable[[str], None] = lambda line: None,
) -> int:
    """Run `argv` as a task; returns its exit status (what `progress run` exits with)."""
    stdout = stdout or sys.stdout.buffer
    stderr = stderr or sys.stderr.buffer
    task = await client.create_task(kind, {"command": argv, **dict(params or {})})
    announce(f"task {task.id}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except OSError as exc:
        await task.fail(f"cannot run {argv[0]}: {exc.strerror or exc}")
        return 126 if isinstance(exc, PermissionError) else 127
    started = f"started: {shlex.join(argv)}"[:MAX_MESSAGE]
    await task.report(0, step, f"{started} (pid {proc.pid})")
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    forwarded = _forward_signals(proc)
    try:
        await asyncio.gather(
            _pump(proc.stdout, stdout, LineMatcher(pattern), task, step, None),
            _pump(proc.stderr, stderr, LineMatcher(pattern), task, step, tail),
        )
        returncode = await proc.wait()
    finally:
        _restore_signals(forwarded)
    stderr_tail = "\n".join(tail)
    try:
        if returncode == 0:
            await task.complete({"exit_code": 0, "stderr_tail": stderr_tail})
        else:
            error = describe_exit(returncode)
            if stderr_tail:
                error += "\n" + stderr_tail
            await task.fail(truncate_utf8(error, 2000))
    except ProgressError as exc:
        # The command's own status still wins: a wrapper must not turn a build that
        # succeeded into a failure because the progress server was away.
        announce(f"could not record the end of task {task.id}: {exc}")
    return exit_status(returncode)


def _forward_signals(proc: asyncio.subprocess.Process) -> list[int]:
    """SIGTERM and SIGHUP go on to the command; SIGINT from the terminal reaches it by
    itself (same process group), so here it is only kept from killing us first."""
    loop = asyncio.get_running_loop()
    installed: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(sig, _send, proc, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        installed.append(signal.SIGINT)
    except (NotImplementedError, RuntimeError):
        pass
    return installed


def _send(proc: asyncio.subprocess.Process, sig: int) -> None:
    if proc.returncode is None:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass


def _restore_signals(installed: list[int]) -> None:
    loop = asyncio.get_running_loop()
    for sig in installed:
        loop.remove_signal_handler(sig)
