"""The relay and the hub's gap repair, on a real SQLite store, with a fake peer.

What a node sees when the broker loses events: a later event of the task reveals the gap
(or the periodic check does, when none comes), and the missing events are read from the
store before anything newer is delivered: every seq once, in order.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from server import protocol
from server.broker import BrokerStats, Message
from server.config import PROJECT_ROOT
from server.hub import Hub
from server.lifecycle import Progress
from server.relay import Relay
from server.replay import Replayer
from server.store.sqlite import open_sqlite
from server.tracker import Tracker

from .helpers import TIMEOUT


class FakePeer:
    """Collects what it is sent; always has room."""

    def __init__(self, peer_id: str = "p", user_id: int = 1) -> None:
        self.id, self.user_id = peer_id, user_id
        self.last_seen, self.ping_sent_at = 0.0, None
        self.sent: list[dict[str, Any]] = []

    def push(self, data: str) -> None:
        self.sent.append(json.loads(data))

    async def wait_for_room(self) -> None:
        return None

    def close(self, code: int, reason: str, notice: str | None = None) -> None:
        self.sent.append({"type": "closed", "code": code})

    def ping(self) -> None:
        pass

    def abort(self, reason: str) -> None:
        pass

    def seqs(self) -> list[int]:
        return [m["seq"] for m in self.sent if m.get("type") == "event"]


class LossyBroker:
    """A broker that carries nothing: every remote message is handed in by the test."""

    kind = "fake"

    def __init__(self) -> None:
        self.stats = BrokerStats()
        self.published: list[Message] = []
        self.deliver: Any = None
        self.reconnected: Any = None

    async def start(self, deliver: Any, on_reconnect: Any) -> None:
        self.deliver, self.reconnected = deliver, on_reconnect

    def publish(self, message: Message) -> None:
        self.published.append(message)

    @property
    def healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture
async def node(tmp_path: Any) -> Any:
    """A store with one user, a tracker writing to it, and a relay in front of a hub."""
    backend = await open_sqlite(
        tmp_path / "r.db", PROJECT_ROOT / "migrations" / "sqlite", "NORMAL", 2
    )
    await backend.accounts.create_user("u", "x", "2026-01-01T00:00:00.000Z")
    tracker = Tracker(backend.store)  # not wired to the relay: the "other node" writes
    tracker.start()
    hub = Hub(encode=protocol.event_message)
    broker = LossyBroker()
    relay = Relay("here", broker, hub, Replayer(backend.store, hub), backend.store)
    await relay.start()
    yield tracker, hub, relay, broker
    await relay.stop()
    await tracker.stop()
    await backend.close()


async def live_subscriber(hub: Hub, task_id: str, seq: int) -> FakePeer:
    peer = FakePeer()
    hub.connect(peer)
    hub.go_live(hub.subscribe(peer, task_id), seq)
    return peer


def remote(events: list[Any]) -> list[Message]:
    return [
        Message("there", e.task_id, e.seq, e.event.value, protocol.event_message(e)) for e in events
    ]


async def wait_for(check: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not check():
            await asyncio.sleep(0.01)


async def test_a_lost_event_is_read_from_the_store_before_the_next(node: Any) -> None:
    """The broker loses seq 3: seq 4 arriving reveals it; the peer gets 2, 3, 4 in order."""
    tracker, hub, relay, broker = node
    task = await tracker.create_task(1, "external", "{}")
    peer = await live_subscriber(hub, task.id, 1)
    events = await tracker.report_progress(task.id, Progress(10))  # seqs 2, 3
    events += await tracker.report_progress(task.id, Progress(20))  # seq 4
    messages = remote(events)
    broker.deliver(messages[0])  # 2
    broker.deliver(messages[2])  # 4: 3 never came
    await wait_for(lambda: peer.seqs() == [2, 3, 4])
    assert relay.gaps_repaired == 1
    broker.deliver(messages[1])  # 3 arrives late after all: a repeat, dropped
    events = await tracker.report_progress(task.id, Progress(30))
    broker.deliver(remote(events)[0])
    assert peer.seqs() == [2, 3, 4, 5]


class GatedPeer(FakePeer):
    """A peer that takes nothing until `gate` opens; `blocked` is set once a sender waits."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.blocked = asyncio.Event(), asyncio.Event()

    async def wait_for_room(self) -> None:
        self.blocked.set()
        await self.gate.wait()


async def test_a_gap_found_while_a_repair_goes_live_is_repaired_too(node: Any) -> None:
    """Events from several nodes arrive out of order: while a repair sends what it read
    (2, 3), 5 arrives before 4; going live then finds 4 missing, and that is repaired as
    well instead of leaving the subscription buffering for good."""
    tracker, hub, relay, broker = node
    task = await tracker.create_task(1, "external", "{}")
    peer = GatedPeer()
    hub.connect(peer)
    hub.go_live(hub.subscribe(peer, task.id), 1)
    first = remote(await tracker.report_progress(task.id, Progress(10)))  # 2, 3
    broker.deliver(first[1])  # 3 before 2: a gap, and the repair reads 2, 3
    async with asyncio.timeout(TIMEOUT):
        await peer.blocked.wait()  # the repair has read the store and is sending
    later = remote(await tracker.report_progress(task.id, Progress(20)))  # 4
    later += remote(await tracker.report_progress(task.id, Progress(30)))  # 5
    broker.deliver(later[1])  # 5 is buffered; 4 is still on its way
    peer.gate.set()
    await wait_for(lambda: peer.seqs() == [2, 3, 4, 5])
    assert relay.gaps_repaired == 2
    broker.deliver(later[0])  # 4 arrives late after all: a repeat, dropped
    assert peer.seqs() == [2, 3, 4, 5]


async def test_the_periodic_check_finds_a_loss_no_later_event_reveals(node: Any) -> None:
    """The last events are lost and nothing follows: the check catches the subscriber up
    (after a check's grace, or at once when urgent, e.g. after a broker reconnect)."""
    tracker, hub, relay, broker = node
    task = await tracker.create_task(1, "external", "{}")
    peer = await live_subscriber(hub, task.id, 1)
    await tracker.report_progress(task.id, Progress(50))  # 2, 3: both lost
    assert await relay.check() == 0  # behind, but events may still be on their way
    assert await relay.check() == 1  # still behind the same seq: repair
    await wait_for(lambda: peer.seqs() == [2, 3])
    await tracker.complete(task.id, None)  # 4: lost too
    broker.reconnected()  # the broker came back: everything is checked at once
    await wait_for(lambda: peer.seqs() == [2, 3, 4])


async def test_events_committed_here_go_to_local_subscribers_and_the_broker(node: Any) -> None:
    """`committed` delivers to this node's hub and listeners and publishes once."""
    tracker, hub, relay, broker = node
    heard: list[tuple[str, int, str]] = []
    relay.add_listener(lambda n: heard.append((n.task_id, n.seq, str(n.event))))
    tracker.add_listener(relay.committed)
    task = await tracker.create_task(1, "external", "{}")
    peer = await live_subscriber(hub, task.id, 1)
    await tracker.report_progress(task.id, Progress(5))
    assert peer.seqs() == [2, 3]
    assert [(m.origin, m.seq) for m in broker.published] == [("here", 1), ("here", 2), ("here", 3)]
    assert [seq for _, seq, _ in heard] == [1, 2, 3]
    assert heard[-1][2] == "progress"
