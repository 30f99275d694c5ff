"""Pre-built text frames: the fast path writes them straight to the transport."""

from __future__ import annotations

import asyncio
import struct

import pytest

from server.web.connection import Connection, text_frame


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


class FakeTransport:
    def __init__(self) -> None:
        self.buffered = 0
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send_str(self, text: str) -> None:
        self.sent.append(text)

    async def close(self, **kwargs: object) -> bool:
        return True


async def test_idle_peer_gets_frames_directly_and_a_lagging_one_through_the_writer():
    """Frames go straight to an idle peer's transport; once its buffer is half full, in order
    through the outbox and writer instead."""
    transport, socket = FakeTransport(), FakeSocket()
    conn = Connection(socket, transport, 1, max_messages=100, max_bytes=1000)  # type: ignore[arg-type]
    conn.push('{"n":1}')
    assert transport.written == [text_frame('{"n":1}')] and socket.sent == []
    transport.buffered = 600  # the peer is behind: more than half of max_bytes
    conn.push('{"n":2}')
    conn.push('{"n":3}')
    assert transport.written == [text_frame('{"n":1}')]
    await conn.wait_writer(0.1)  # the writer sends what was queued, in order
    for _ in range(5):
        await asyncio.sleep(0)
    assert socket.sent == ['{"n":2}', '{"n":3}']
    assert conn.stats.messages_sent == 3
    await conn.finish()


async def test_byte_limit_counts_utf8_bytes_not_characters():
    """A message of emoji counts four bytes per character against the send queue."""
    transport, socket = FakeTransport(), FakeSocket()
    conn = Connection(socket, transport, 1, max_messages=100, max_bytes=1000)  # type: ignore[arg-type]
    transport.buffered = 600  # behind: pushes are queued
    conn.push("\U0001f600" * 150)  # 150 characters, 600 bytes: over the 400 bytes left
    assert conn.close_code == 4008
    await conn.finish()


async def test_replay_pacing_waits_for_the_socket_buffer_to_drain():
    """wait_for_room waits while the transport holds half the byte limit, though nothing is
    queued, and returns once the peer has taken it."""
    transport, socket = FakeTransport(), FakeSocket()
    conn = Connection(socket, transport, 1, max_messages=100, max_bytes=1000)  # type: ignore[arg-type]
    transport.buffered = 900
    waiting = asyncio.create_task(conn.wait_for_room())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    transport.buffered = 100  # the peer read
    await asyncio.wait_for(waiting, 1)
    await conn.finish()
