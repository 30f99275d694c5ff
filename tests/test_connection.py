"""Pre-built text frames: the fast path writes them straight to the transport."""

from __future__ import annotations

import struct

import pytest

from server.connection import text_frame


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_header_and_payload(size):
    """FIN + text opcode, unmasked, with the 7/16/64-bit length form RFC 6455 requires."""
    text = "x" * size
    frame = text_frame(text)
    assert frame[0] == 0x81 and frame[1] & 0x80 == 0
    if size < 126:
        assert frame[1] == size and frame[2:] == text.encode()
    elif size < 65536:
        assert frame[1] == 126 and struct.unpack("!H", frame[2:4])[0] == size
        assert frame[4:] == text.encode()
    else:
        assert frame[1] == 127 and struct.unpack("!Q", frame[2:10])[0] == size
        assert frame[10:] == text.encode()


def test_text_frame_is_built_once_per_message():
    """The same str object gives the same bytes object; an equal but new str a new frame."""
    message = "".join(["{", '"a":1', "}"])
    assert text_frame(message) is text_frame(message)
    other = "".join(["{", '"a":1', "}"])
    assert text_frame(other) == text_frame(message)
