"""A lossy HTTP/1.1 relay for tests: what a load balancer does when answers get lost.

It forwards each request to the server on a connection of its own and passes the answer
back, except for the requests `drop` picks: those reach the server (which acts on them)
but their answer is thrown away and the client's connection reset, as when a network
or a proxy fails after the server committed. While the server is down the client's
connection is reset too. Only what the SDK sends is understood: requests and answers
with a Content-Length (or none), no chunked bodies, no upgrades.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

#: Decides from (method, path, n) whether to drop an answer; n counts the requests it was
#: asked about, from 1.
DropRule = Callable[[str, str, int], bool]


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


class LossyRelay:
    """Listens on 127.0.0.1:`port` (free if 0) and relays to 127.0.0.1:`upstream`."""

    def __init__(self, upstream: int, drop: DropRule) -> None:
        self.upstream = upstream
        self.drop = drop
        self.port = 0
        #: Requests seen, and answers dropped (the server had acted on each of those).
        self.requests = 0
        self.dropped: list[tuple[str, str]] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await reader.readexactly(_content_length(head))
                method, path = head.split(b" ", 2)[:2]
                self.requests += 1
                answer = await self._forward(head + body)
                name = (method.decode(), path.decode())
                if answer is None or self.drop(*name, self.requests):
                    if answer is not None:
                        self.dropped.append(name)
                    writer.transport.abort()
                    return
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.transport.abort()

    async def _forward(self, request: bytes) -> bytes | None:
        """The server's whole answer, or None if it could not be had (server down)."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            return None
        try:
            writer.write(request)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            return head + await reader.readexactly(_content_length(head))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        finally:
            writer.transport.abort()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
