"""The fast paths answer exactly as their schemas do, or step aside.

`schemas.plain_progress` (progress posts) and `schemas.plain_client_message` (WebSocket
client messages) skip marshmallow for ordinary input. For every input hypothesis draws,
and the edge cases below, each must return what its schema returns, or None and leave
the input to the schema; neither may accept what the schema refuses.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import ValidationError

from server import budget, schemas
from server.errors import ValidationFailed
from server.web.bodies import validate

SCHEMA = schemas.ReportProgress()


def schema_answer(body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return validate(SCHEMA, body)
    except ValidationFailed:
        return None


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal, with the same types (5 and 5.0 are not the same answer)."""
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)


texts = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=10),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfff", "é" * 150, "a" * 200, "a" * 201]),
    st.integers(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)
numbers = st.one_of(
    st.integers(min_value=-5, max_value=105),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=100),
    st.booleans(),
    st.none(),
    st.text(max_size=3),
    st.sampled_from([0, 100, 0.0, 100.0, 50.5, -0.0, 1e-300, 100.0000001, math.nan, math.inf]),
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "progress": numbers,
        "step": texts,
        "message": texts,
        "extra": st.integers(),
    },
)


@settings(max_examples=3000, deadline=None)
@given(bodies)
def test_never_disagrees_with_the_schema(body: dict[str, Any]) -> None:
    plain = schemas.plain_progress(body)
    if plain is not None:
        expected = schema_answer(body)
        assert expected is not None, f"fast path accepted what the schema refuses: {body!r}"
        assert same(plain, expected), (body, plain, expected)


@pytest.mark.parametrize(
    "body",
    [
        {"progress": 0},
        {"progress": 100},
        {"progress": 42.5, "message": "fetching prices"},
        {"progress": 42.0, "step": "fetch", "message": None},
        {"progress": 7, "step": None},
        {"progress": 99, "step": "é" * 66, "message": "日本語のメッセージ"},
        {"progress": 1, "step": "s" * budget.MAX_STEP_BYTES},
    ],
)
def test_takes_the_ordinary_updates(body: dict[str, Any]) -> None:
    """The bodies workers send are taken by the fast path, with the schema's answer."""
    plain = schemas.plain_progress(body)
    assert plain is not None
    assert same(plain, validate(SCHEMA, body))


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"progress": True},
        {"progress": "5"},
        {"progress": -0.5},
        {"progress": 100.5},
        {"progress": math.nan},
        {"progress": 5, "other": 1},
        {"progress": 5, "step": "s" * (budget.MAX_STEP_BYTES + 1)},
        {"progress": 5, "step": '"' * 101},  # 202 bytes once escaped
        {"progress": 5, "message": "a\x00"},
        {"progress": 5, "message": "\ud800"},
        {"progress": 5, "message": 3},
    ],
)
def test_leaves_the_rest_to_the_schema(body: dict[str, Any]) -> None:
    """Anything the schema refuses is left to it, so its error message is the one sent."""
    assert schemas.plain_progress(body) is None
    with pytest.raises(ValidationFailed):
        validate(SCHEMA, body)


# -- WebSocket client messages -------------------------------------------------------------

ACTION_SCHEMAS = {
    "ping": schemas.WsPing(),
    "subscribe": schemas.WsSubscribe(),
    "unsubscribe": schemas.WsUnsubscribe(),
    "get_status": schemas.WsGetStatus(),
}


def schema_message(raw: dict[str, Any]) -> dict[str, Any] | None:
    schema = ACTION_SCHEMAS.get(raw.get("action"))  # type: ignore[arg-type]
    if schema is None:
        return None
    try:
        return schema.load(raw)
    except ValidationError:
        return None


task_ids = st.one_of(
    st.none(),
    st.text(max_size=70),
    st.sampled_from(["", "t", "a" * 64, "a" * 65, "é" * 64]),
    st.integers(),
    st.booleans(),
    st.lists(st.text(max_size=2), max_size=2),
)
seqs = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=10**20),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=3),
)
messages = st.fixed_dictionaries(
    {},
    optional={
        "action": st.one_of(
            st.sampled_from(["ping", "subscribe", "unsubscribe", "get_status", "other"]),
            st.integers(),
            st.none(),
        ),
        "task_id": task_ids,
        "last_seq": seqs,
        "id": st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers())),
        "extra": st.integers(),
    },
)


@settings(max_examples=3000, deadline=None)
@given(messages)
def test_client_messages_never_disagree_with_the_schemas(raw: dict[str, Any]) -> None:
    plain = schemas.plain_client_message(raw)
    if plain is not None:
        expected = schema_message(raw)
        assert expected is not None, f"fast path accepted what the schema refuses: {raw!r}"
        assert plain == expected and all(type(plain[k]) is type(expected[k]) for k in plain)


@pytest.mark.parametrize(
    "raw",
    [
        {"action": "ping"},
        {"action": "ping", "id": 7},
        {"action": "subscribe", "task_id": "abc"},
        {"action": "subscribe", "task_id": "abc", "last_seq": 12, "id": "s1"},
        {"action": "subscribe", "task_id": "abc", "last_seq": None},
        {"action": "unsubscribe", "task_id": "abc"},
        {"action": "get_status"},
        {"action": "get_status", "task_id": "abc", "id": None},
    ],
)
def test_takes_the_ordinary_messages(raw: dict[str, Any]) -> None:
    plain = schemas.plain_client_message(raw)
    assert plain is not None and plain == schema_message(raw)


@pytest.mark.parametrize(
    "raw",
    [
        {},
        {"action": "shout"},
        {"action": 3},
        {"action": "subscribe"},
        {"action": "subscribe", "task_id": ""},
        {"action": "subscribe", "task_id": "a" * 65},
        {"action": "subscribe", "task_id": "abc", "last_seq": -1},
        {"action": "subscribe", "task_id": "abc", "last_seq": 1.0},
        {"action": "subscribe", "task_id": "abc", "last_seq": True},
        {"action": "unsubscribe", "task_id": None},
        {"action": "get_status", "task_id": 5},
    ],
)
def test_leaves_odd_messages_to_the_schemas(raw: dict[str, Any]) -> None:
    assert schemas.plain_client_message(raw) is None
