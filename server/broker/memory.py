"""`memory://`: one process, no other node to tell. Local delivery is the relay's."""

from __future__ import annotations

from collections.abc import Callable

from . import BrokerStats, Deliver, Message


class MemoryBroker:
    kind = "memory"

    def __init__(self) -> None:
        self.stats = BrokerStats()

    async def start(self, deliver: Deliver, on_reconnect: Callable[[], None]) -> None:
        return None

    def publish(self, message: Message) -> None:
        return None  # the committing node delivered it itself; there is no other

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        return None
