"""The hub with fake peers: fan-out, buffering during replay, cleanup, liveness."""

from __future__ import annotations

from server.hub import Hub
from server.models import Event, EventType, TaskStatus


class FakePeer:
    def __init__(self, peer_id: str, user_id: int = 1) -> None:
        self.id = peer_id
        self.user_id = user_id
        self.last_seen = 0.0
        self.ping_sent_at: float | None = None
        self.sent: list[str] = []
        self.pings = 0
        self.aborted: str | None = None

    def push(self, data: str) -> None:
        self.sent.append(data)

    def ping(self) -> None:
        self.pings += 1

    def abort(self, reason: str) -> None:
        self.aborted = reason


def event(seq: int, task_id: str = "t1") -> Event:
    return Event(task_id, seq, EventType.PROGRESS, TaskStatus.RUNNING, seq, None, None, "ts")


def make_hub() -> tuple[Hub, list[int]]:
    encoded: list[int] = []

    def encode(e: Event) -> str:
        encoded.append(e.seq)
        return f"{e.task_id}:{e.seq}"

    return Hub(encode), encoded


def test_publish_serialises_once_for_all_subscribers():
    """One event is encoded once, whatever the number of subscribers."""
    hub, encoded = make_hub()
    peers = [FakePeer(f"p{i}") for i in range(50)]
    for peer in peers:
        hub.connect(peer)
        hub.go_live(hub.subscribe(peer, "t1"), 0)
    hub.publish(event(1))
    assert encoded == [1]
    assert all(p.sent == ["t1:1"] for p in peers)


def test_buffered_events_are_merged_without_duplicates():
    """Live events during a replay are held, then sent only if newer than the replay."""
    hub, _ = make_hub()
    peer = FakePeer("p")
    hub.connect(peer)
    sub = hub.subscribe(peer, "t1")
    for seq in (4, 5, 6):
        hub.publish(event(seq))
    assert peer.sent == []
    # The replay sent up to seq 5 itself.
    hub.go_live(sub, 5)
    assert peer.sent == ["t1:6"]
    hub.publish(event(6))  # a repeat is dropped
    hub.publish(event(7))
    assert peer.sent == ["t1:6", "t1:7"]


def test_unsubscribe_and_disconnect_release_everything():
    """After unsubscribe or disconnect no event reaches the peer and no state is left."""
    hub, _ = make_hub()
    a, b = FakePeer("a"), FakePeer("b", user_id=2)
    for peer in (a, b):
        hub.connect(peer)
        hub.go_live(hub.subscribe(peer, "t1"), 0)
        hub.go_live(hub.subscribe(peer, "t2"), 0)
    assert hub.unsubscribe(a, "t1") is True
    assert hub.unsubscribe(a, "t1") is False
    hub.publish(event(1, "t1"))
    assert a.sent == [] and b.sent == ["t1:1"]
    assert sorted(hub.disconnect(b)) == ["t1", "t2"]
    assert hub.has_subscribers("t2") and not hub.has_subscribers("t1")
    hub.disconnect(a)
    assert hub.active_tasks() == [] and hub.connection_count == 0 and hub.subscription_count == 0


def test_personal_user_and_broadcast_messages():
    """Messages reach one peer, every peer of one user, or everyone."""
    hub, _ = make_hub()
    a1, a2, b = FakePeer("a1", 1), FakePeer("a2", 1), FakePeer("b", 2)
    for peer in (a1, a2, b):
        hub.connect(peer)
    assert hub.send_personal("a1", "hi") is True
    assert hub.send_personal("zz", "hi") is False
    assert hub.send_to_user(1, "u") == 2
    hub.broadcast("all")
    assert a1.sent == ["hi", "u", "all"] and a2.sent == ["u", "all"] and b.sent == ["all"]


def test_liveness_pings_silent_peers_and_drops_unanswered():
    """A silent peer is pinged after the interval and dropped after the timeout."""
    hub, _ = make_hub()
    quiet, chatty = FakePeer("q"), FakePeer("c")
    for peer in (quiet, chatty):
        hub.connect(peer)
    hub.check_liveness(now=10.0, interval=5.0, timeout=3.0)
    assert quiet.pings == 1 and quiet.ping_sent_at == 10.0
    chatty.ping_sent_at = None  # it answered
    chatty.last_seen = 12.0
    hub.check_liveness(now=13.5, interval=5.0, timeout=3.0)
    assert quiet.aborted == "heartbeat timeout"
    assert chatty.aborted is None


def test_the_replay_buffer_is_bounded_and_overflow_is_counted():
    """A subscription holds at most its bound of live events while replaying; past it the
    buffer is emptied and the overflow counted (the replay then ends with a snapshot)."""
    hub = Hub(lambda e: f"{e.task_id}:{e.seq}:" + "x" * 10, buffer_messages=5, buffer_bytes=10_000)
    peer = FakePeer("p")
    hub.connect(peer)
    sub = hub.subscribe(peer, "t1")
    for seq in range(1, 8):
        hub.publish(event(seq))
    assert sub.overflows == 1
    assert [seq for seq, _ in sub.buffer or []] == [6, 7]
    hub.go_live(sub, 5)
    assert [m.split(":")[1] for m in peer.sent] == ["6", "7"]


def test_the_replay_buffer_is_bounded_in_bytes():
    """The byte bound counts UTF-8 bytes of the buffered messages."""
    hub = Hub(lambda e: "\U0001f600" * 100, buffer_messages=1000, buffer_bytes=1000)
    peer = FakePeer("p")
    hub.connect(peer)
    sub = hub.subscribe(peer, "t1")
    hub.publish(event(1))
    hub.publish(event(2))  # 400 + 400 bytes fit
    assert sub.overflows == 0
    hub.publish(event(3))
    assert sub.overflows == 1 and len(sub.buffer or []) == 1


def test_unsubscribe_only_a_given_subscription():
    """`only=` leaves a newer subscription to the same task alone."""
    hub, _ = make_hub()
    peer = FakePeer("p")
    hub.connect(peer)
    old = hub.subscribe(peer, "t1")
    new = hub.subscribe(peer, "t1")
    assert not hub.unsubscribe(peer, "t1", only=old)
    assert hub.unsubscribe(peer, "t1", only=new)
    assert not hub.is_subscribed(peer, "t1")
