"""Idempotency keys: a retried POST gets its first answer again instead of acting twice.

A claim (owner, key, fingerprint of the request) rides with its request into the commit:
the planner looks the key up inside the write transaction and either replays the stored
answer, refuses a key reused for a different request, or acts and stores its answer in
the same transaction as the event. So a retry after a crash is answered from the
database, never acted on again. Answers are kept `KEEP_SECONDS` (retention deletes them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

#: Longest key accepted (Stripe's is 255 too).
KEY_MAX = 255
#: How long a key's answer is kept and replayed.
KEEP_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class Claim:
    """A request's idempotency key: whose, which, and what request it was first used for."""

    user_id: int
    key: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Answer:
    """The first answer to an idempotent request (status and JSON body), given again."""

    fingerprint: str
    status: int
    body: str


def valid_key(key: str) -> bool:
    """1 to KEY_MAX printable ASCII characters (space included)."""
    return 0 < len(key) <= KEY_MAX and all(" " <= c <= "~" for c in key)


def fingerprint(method: str, path: str, body: Any) -> str:
    """What makes two requests the same request: method, path and the parsed body (so a
    retry that re-serialises its JSON with other spacing or key order is still the same)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{method} {path}\n{canonical}".encode()).hexdigest()
