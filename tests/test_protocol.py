"""Parsing client messages and building server messages, without a server."""

from __future__ import annotations

import json

import pytest

from server import protocol
from server.models import Event, EventType, TaskStatus


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[1, 2]",
        "42",
        '"ping"',
        "{}",
        '{"action": 5}',
        '{"action": "dance"}',
        '{"action": "subscribe"}',
        '{"action": "subscribe", "task_id": 7}',
        '{"action": "subscribe", "task_id": "t", "last_seq": "3"}',
        '{"action": "subscribe", "task_id": "t", "last_seq": true}',
        '{"action": "subscribe", "task_id": "t", "last_seq": -1}',
        '{"action": "subscribe", "task_id": "t", "last_seq": 1.5}',
        '{"action": "unsubscribe"}',
        # Not standard JSON, or not encodable as UTF-8: found by tests/test_properties.py.
        '{"action": "ping", "id": NaN}',
        '{"action": "get_status", "task_id": "t", "id": -Infinity}',
        '{"action": "get_status", "task_id": "\\ud800"}',
        "[" * 100_000,
    ],
)
def test_bad_messages_are_bad_request(text):
    """Anything malformed is a bad_request ProtocolError, never another exception."""
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_client_message(text)
    assert info.value.code == "bad_request"


def test_id_is_kept_for_the_error_reply():
    """A message id survives into the error, so the client can match it."""
    with pytest.raises(protocol.ProtocolError) as info:
        protocol.parse_client_message('{"action": "subscribe", "id": "a1"}')
    assert info.value.msg_id == "a1"


@pytest.mark.parametrize("msg_id", [[], {"a": 1}, True, None])
def test_only_scalar_ids_are_echoed(msg_id):
    """An id that is not a string or a number is not echoed (a client matches by equality)."""
    message = protocol.parse_client_message(json.dumps({"action": "ping", "id": msg_id}))
    assert message.msg_id is None
    assert json.loads(protocol.pong_message(message.msg_id)) == {"type": "pong"}


def test_unknown_fields_are_ignored():
    """Extra fields (from a newer client) do not make a message invalid."""
    message = protocol.parse_client_message('{"action": "ping", "trace": "x", "id": 1}')
    assert message.action == "ping" and "trace" not in message.data


def test_valid_messages():
    """Valid actions parse to their fields."""
    m = protocol.parse_client_message('{"action":"subscribe","task_id":"t","last_seq":0,"id":3}')
    assert (m.action, m.data["task_id"], m.data["last_seq"], m.msg_id) == ("subscribe", "t", 0, 3)
    assert protocol.parse_client_message('{"action":"get_status"}').data["task_id"] is None


def test_event_message_shape():
    """An event carries result only when completed and error only when failed or cancelled."""
    done = Event(
        "t", 5, EventType.COMPLETED, TaskStatus.COMPLETED, 100, "s", None, "ts", result='{"a":1}'
    )
    data = json.loads(protocol.event_message(done))
    assert data == {
        "type": "event",
        "task_id": "t",
        "seq": 5,
        "event": "completed",
        "status": "completed",
        "progress": 100,
        "step": "s",
        "message": None,
        "ts": "ts",
        "result": {"a": 1},
    }
    progress = Event("t", 2, EventType.PROGRESS, TaskStatus.RUNNING, 10, None, "m", "ts")
    assert "result" not in json.loads(protocol.event_message(progress))
