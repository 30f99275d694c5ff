"""The byte budget: every value a client sends is measured in UTF-8 bytes of its wire form.

What is stored is sent back later, to every watcher, inside events and snapshots, so each
field is bounded by the bytes it will take on the wire (compact JSON, non-ASCII as UTF-8,
escapes counted as written), not by its length in code points. From those bounds the
largest event and snapshot the server can ever build follow (`largest_message_bytes`),
and the configuration is refused at start if that could not fit a connection's send
queue: an accepted value can never become undeliverable.

JSON values (a task's `params`, `result`) are checked for depth before anything else
touches them (a value nested just under the parser's limit would fail every later
serialisation), then kept as their compact text (`compact`): parsed objects cost many
times their text in memory, and the text is what is stored and spliced into messages.
"""

from __future__ import annotations

import json
from typing import Any

#: Largest `step` and `error`, in wire bytes. A progress `message` may be as large as
#: `--max-json-bytes` (workers send log excerpts).
MAX_STEP_BYTES = 200
MAX_ERROR_BYTES = 2000
#: Largest `kind` (ASCII only, see schemas).
MAX_KIND_BYTES = 64
#: Room for everything else in an event or snapshot: ids, times, numbers, keys.
ENVELOPE_BYTES = 2048


class BudgetError(ValueError):
    """A value over its byte or depth budget; the message says which, for the client."""


def wire_bytes(text: str) -> int:
    """Bytes `text` takes inside a JSON string on the wire: UTF-8, escapes as written.

    Raises UnicodeEncodeError for an unpaired surrogate (it has no UTF-8 form).
    """
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def depth(value: Any, limit: int) -> int:
    """Nesting depth of a JSON value (a scalar is 0, `[]` is 1), counted without recursion.

    Stops early and returns `limit + 1` as soon as the value is deeper than `limit`.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        if level > limit:
            return limit + 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest


def compact(value: Any, *, max_bytes: int, max_depth: int) -> str:
    """The compact JSON text of `value`, checked against the budget.

    Raises:
        BudgetError: deeper than `max_depth`, larger than `max_bytes` once serialised, or
            not standard JSON (NaN, Infinity, an unpaired surrogate).
    """
    if depth(value, max_depth) > max_depth:
        raise BudgetError(f"nested deeper than {max_depth} levels")
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        size = len(text.encode("utf-8"))
    except (ValueError, UnicodeEncodeError):
        raise BudgetError("not valid JSON text: no NaN, Infinity or unpaired surrogates") from None
    if size > max_bytes:
        raise BudgetError(f"{size} bytes once serialised; at most {max_bytes}")
    return text


def largest_message_bytes(max_json_bytes: int) -> int:
    """The most bytes any event or snapshot message can take, given the field limits.

    A snapshot carries a task: params, result and its last message (each at most
    `max_json_bytes`), step and error, plus the envelope. Events carry less.
    """
    return 3 * max_json_bytes + MAX_STEP_BYTES + MAX_ERROR_BYTES + MAX_KIND_BYTES + ENVELOPE_BYTES
