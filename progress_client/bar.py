"""`progress watch`'s output: a one-line bar redrawn in place on a terminal, or one plain
line per event elsewhere."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

from .models import Event


def parse_time(text: str | None) -> float | None:
    """An ISO 8601 time from the server as a Unix timestamp (None if absent or bad)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def format_elapsed(seconds: float) -> str:
    """ "0:07", "12:34", "1:02:03"."""
    whole = max(0, int(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


def format_percent(progress: float) -> str:
    return f"{progress:.0f}%" if float(progress).is_integer() else f"{progress:.1f}%"


class Display:
    """What one watch shows; `update()` per event, `tick()` once a second, `finish()`."""

    def __init__(self, out: TextIO, *, live: bool, clock: Callable[[], float] = time.time) -> None:
        self.out = out
        #: True: redraw one line in place (a terminal); False: a line per event.
        self.live = live
        self._clock = clock
        self._event: Event | None = None
        #: When the task started and finished (Unix time), as far as the events tell.
        self.started: float | None = None
        self.finished: float | None = None
        self._first_seen = clock()
        self._drawn = False

    def elapsed(self) -> float:
        start = self.started if self.started is not None else self._first_seen
        end = self.finished if self.finished is not None else self._clock()
        return end - start

    def update(self, event: Event) -> None:
        self._event = event
        task = event.task
        if task is not None:
            self.started = parse_time(task.started_at) or parse_time(task.created_at)
            self.finished = parse_time(task.finished_at)
        elif event.event in ("created", "started") or self.started is None:
            self.started = parse_time(event.ts) or self.started
        if event.terminal and task is None:
            self.finished = parse_time(event.ts)
        if self.live:
            self._draw()
        else:
            self.out.write(self._plain(event) + "\n")
            self.out.flush()

    def tick(self) -> None:
        """Redraw the elapsed time (live mode only)."""
        if self.live and self._event is not None:
            self._draw()

    def finish(self, event: Event) -> None:
        """The last line: how the task ended."""
        if self.live and self._drawn:
            self.out.write("\n")
        took = format_elapsed(self.elapsed())
        if event.status == "completed":
            result = "" if event.result in (None, {}) else " " + _compact(event.result, 200)
            line = f"completed in {took}{result}"
        elif event.status == "failed":
            line = f"failed after {took}: {event.error or ''}"
        else:
            line = f"cancelled after {took}"
        self.out.write(line + "\n")
        self.out.flush()

    def _draw(self) -> None:
        event = self._event
        assert event is not None
        width = max(40, shutil.get_terminal_size((80, 24)).columns)
        bar_width = 20
        filled = round(bar_width * min(100.0, max(0.0, event.progress)) / 100)
        bar = "[" + "#" * filled + "-" * (bar_width - filled) + "]"
        head = f"{bar} {format_percent(event.progress):>6}"
        tail = format_elapsed(self.elapsed())
        middle = " ".join(x for x in (event.step or event.status, event.message or "") if x)
        room = width - len(head) - len(tail) - 4
        middle = middle.replace("\n", " ")
        if len(middle) > room:
            middle = middle[: max(0, room - 1)] + "…"
        line = f"{head}  {middle.ljust(room)} {tail}"
        self.out.write("\r\x1b[K" + line)
        self.out.flush()
        self._drawn = True

    def _plain(self, event: Event) -> str:
        parts = [f"#{event.seq}", event.event, format_percent(event.progress)]
        if event.step:
            parts.append(f"step={event.step}")
        if event.message:
            parts.append(event.message.replace("\n", " "))
        return " ".join(parts)


def _compact(value: object, limit: int) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"
