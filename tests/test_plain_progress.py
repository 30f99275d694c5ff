"""The progress fast path answers exactly as the ReportProgress schema does, or steps aside.

`schemas.plain_progress` skips marshmallow for ordinary updates. For every body hypothesis
draws (and the edge cases below) it must return what `validate(ReportProgress)` returns,
or None and leave the body to the schema; it must never accept what the schema refuses.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
