"""Unit tests of static/js/ws-client.js, run in Chromium against a fake WebSocket and clock.

Each test runs one async JS function in the harness page (tests/browser/harness/), which has
imported the real module as `wsc` and the fakes from fakes.js (`makeClient`, `FakeWebSocket`,
`FakeClock`, `trackTimers`, `flush`), and returns what the assertions need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page


def js(page: Page, body: str, arg: Any = None) -> Any:
    """Run `body` as the body of an async JS function (argument `arg`) and return its result."""
    return page.evaluate(f"async (arg) => {{ {body} }}", arg)


def test_backoff_grows_is_capped_and_jittered(harness: Page) -> None:
    """Delays double from ~500 ms, stop at the 30 s cap, and are spread by full jitter."""
    result = js(
        harness,
        """
        const opts = { initialDelay: 500, maxDelay: 30000, factor: 2 };
        const top = Array.from(
          { length: 10 }, (_, i) => wsc.backoffDelay(i + 1, opts, () => 0.9999));
        const zero = wsc.backoffDelay(5, opts, () => 0);
        const draws = Array.from({ length: 200 }, () => wsc.backoffDelay(12, opts, Math.random));

        // The client waits exactly these delays between failed attempts.
        const { client, clock, events } = makeClient({ random: () => 0.9999, maxAttempts: 9 });
        client.connect();
        await flush();
        for (let i = 0; i < 9; i++) {
          FakeWebSocket.last.refuse();
          const wait = events.states.at(-1);
          clock.advance(wait.delay);
          await flush();
        }
        const waits = events.states.filter((s) => s.delay !== null).map((s) => s.delay);
        client.close();
        return { top, zero, min: Math.min(...draws), max: Math.max(...draws),
                 distinct: new Set(draws).size, waits };
        """,
    )
    assert result["top"] == [int(min(30_000, 500 * 2**i) * 0.9999) for i in range(10)]
    assert result["top"][-1] == 29_997
    assert result["zero"] == 0
    assert 0 <= result["min"] < 5_000 and 25_000 < result["max"] < 30_000
    assert result["distinct"] > 150  # jittered, not a fixed schedule
    assert result["waits"] == result["top"][:9]


def test_attempts_stop_at_the_limit(harness: Page) -> None:
    """After maxAttempts failed reconnects the state is closed ("exhausted"), with no timer."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient({ maxAttempts: 3 });
        client.connect();
        await flush();
        for (let i = 0; i < 10 && client.state !== "closed"; i++) {
          FakeWebSocket.last.refuse();
          clock.advance(60000);
          await flush();
        }
        const sockets = FakeWebSocket.instances.length;
        clock.advance(600000);
        await flush();
        return { state: client.state, kind: client.closeInfo.kind, sockets,
                 socketsLater: FakeWebSocket.instances.length, pending: clock.pending,
                 last: events.states.at(-1), attempts: events.states.map((s) => s.attempt) };
        """,
    )
    assert result["state"] == "closed"
    assert result["kind"] == "exhausted"
    assert result["sockets"] == 4  # the first connect + 3 reconnects
    assert result["socketsLater"] == 4
    assert result["pending"] == 0
    assert result["last"]["state"] == "closed" and result["last"]["kind"] == "exhausted"


def test_heartbeat_timeout_triggers_reconnect(harness: Page) -> None:
    """A ping without an answer within the timeout closes the socket and reconnects."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient(
          { heartbeatInterval: 1000, heartbeatTimeout: 500 });
        client.connect();
        await flush();
        const first = FakeWebSocket.last;
        first.serverOpen();
        clock.advance(1000);
        const ping = first.sent.at(-1);
        first.serverSend({ type: "pong" });       // answered: stays open
        clock.advance(1000);                       // next ping
        const pings = first.sent.filter((m) => m.action === "ping").length;
        clock.advance(499);
        const stillOpen = client.state;
        clock.advance(1);                          // no answer in time
        const after = client.state;
        const closed = first.closeCalled;
        const close = events.closes.at(-1);
        clock.advance(events.states.at(-1).delay);
        await flush();
        const second = FakeWebSocket.instances.length;
        FakeWebSocket.last.serverOpen();
        return { ping, pings, stillOpen, after, closed, close, second, final: client.state };
        """,
    )
    assert result["ping"] == {"action": "ping"}
    assert result["pings"] == 2
    assert result["stillOpen"] == "open"
    assert result["after"] == "reconnecting"
    assert result["closed"] is not None  # the dead socket was closed, not left dangling
    assert result["close"]["code"] == 1006 and result["close"]["reason"] == "heartbeat timeout"
    assert result["close"]["willReconnect"] is True
    assert result["second"] == 2
    assert result["final"] == "open"


def test_queued_sends_flush_once(harness: Page) -> None:
    """Messages sent while not open go out once, in order, on open; the queue is bounded."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient({ maxQueue: 3 });
        const accepted = [1, 2, 3, 4].map(
          (n) => client.send({ action: "get_status", task_id: `t${n}` }));
        client.connect();
        await flush();
        const first = FakeWebSocket.last;
        const beforeOpen = first.sent.length;
        first.serverOpen();
        const flushed = first.sent.map((m) => m.task_id);
        client.send({ action: "ping" });           // open: sent at once
        first.serverClose(1006, "", false);
        clock.advance(events.states.at(-1).delay);
        await flush();
        FakeWebSocket.last.serverOpen();
        return { accepted, beforeOpen, flushed, firstSent: first.sent.length,
                 secondSent: FakeWebSocket.last.sent, errors: events.errors.map((e) => e.type) };
        """,
    )
    assert result["accepted"] == [True, True, True, False]
    assert result["errors"] == ["queue_full"]
    assert result["beforeOpen"] == 0
    assert result["flushed"] == ["t1", "t2", "t3"]
    assert result["firstSent"] == 4
    assert result["secondSent"] == []  # nothing sent twice after the reconnect


def test_duplicate_seqs_are_dropped_and_resumed_with_last_seq(harness: Page) -> None:
    """Each seq reaches the handler once; a reconnect resubscribes with the last seq."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient();
        const seen = [];
        const other = [];
        const record = (m) => seen.push(m.type === "event" ? m.seq : `snap${m.task.seq}`);
        client.subscribe("T", record, { lastSeq: 2 });
        client.subscribe("U", (m) => other.push(m.seq));
        client.connect();
        await flush();
        const first = FakeWebSocket.last;
        first.serverOpen();
        const subs = first.sent.map((m) => [m.task_id, m.last_seq ?? null]);
        const ev = (task_id, seq) =>
          ({ type: "event", task_id, seq, event: "progress", status: "running" });
        for (const seq of [3, 3, 2, 4, 1]) first.serverSend(ev("T", seq));
        first.serverSend({ type: "snapshot", task: { id: "T", seq: 4 } });  // stale: dropped
        first.serverSend(ev("U", 1));
        first.serverClose(1001, "server shutdown");
        clock.advance(events.states.at(-1).delay);
        await flush();
        const second = FakeWebSocket.last;
        second.serverOpen();
        const resub = second.sent.map((m) => [m.task_id, m.last_seq ?? null]);
        for (const seq of [4, 5]) second.serverSend(ev("T", seq));
        second.serverSend({ type: "snapshot", task: { id: "T", seq: 3 }, recovered: false });
        second.serverSend(ev("T", 4));
        return { seen, other, subs, resub, lastSeq: client.lastSeq("T"),
                 messages: events.messages.filter((m) => m.task_id === "T").map((m) => m.seq) };
        """,
    )
    assert result["subs"] == [["T", 2], ["U", None]]
    assert result["resub"] == [["T", 4], ["U", 1]]
    # 3 and 4 once; 5 after the reconnect; the recovered:false snapshot replaces the state,
    # after which seq 4 is new again.
    assert result["seen"] == [3, 4, 5, "snap3", 4]
    assert result["other"] == [1]
    assert result["lastSeq"] == 4
    assert result["messages"] == [3, 4, 5, 4]


def test_unsubscribe_stops_delivery(harness: Page) -> None:
    """The function returned by subscribe() stops the handler and unsubscribes on the server."""
    result = js(
        harness,
        """
        const { client } = makeClient();
        client.connect();
        await flush();
        const ws = FakeWebSocket.last;
        ws.serverOpen();
        const seen = [];
        const stop = client.subscribe("T", (m) => seen.push(m.seq), { lastSeq: 0 });
        ws.serverSend({ type: "event", task_id: "T", seq: 1 });
        stop();
        stop();
        ws.serverSend({ type: "event", task_id: "T", seq: 2 });
        return { seen, sent: ws.sent };
        """,
    )
    assert result["seen"] == [1]
    assert result["sent"] == [
        {"action": "subscribe", "task_id": "T", "id": "sub:1", "last_seq": 0},
        {"action": "unsubscribe", "task_id": "T"},
    ]


@pytest.mark.parametrize(
    ("code", "state", "kind"),
    [
        (1001, "reconnecting", None),
        (1006, "reconnecting", None),
        (4008, "reconnecting", None),
        (1000, "closed", "normal"),
        (1008, "closed", "fatal"),
        (1009, "closed", "fatal"),
        (4403, "closed", "fatal"),
    ],
)
def test_close_code_policy(harness: Page, code: int, state: str, kind: str | None) -> None:
    """1001/1006/4008 reconnect with backoff; 1000, 1008, 1009 and 4403 stop for good."""
    result = js(
        harness,
        """
        const { client, clock } = makeClient();
        client.connect();
        await flush();
        FakeWebSocket.last.serverOpen();
        FakeWebSocket.last.serverClose(arg, "bye");
        const out = { state: client.state, pending: clock.pending,
                      kind: client.state === "closed" ? client.closeInfo.kind : null };
        clock.advance(60000);
        await flush();
        out.sockets = FakeWebSocket.instances.length;
        return out;
        """,
        code,
    )
    assert result["state"] == state
    assert result["kind"] == kind
    if state == "closed":
        assert result["pending"] == 0 and result["sockets"] == 1
    else:
        assert result["pending"] == 1 and result["sockets"] == 2


def test_token_expired_asks_for_a_fresh_token(harness: Page) -> None:
    """4401 reconnects at once with a new token; a provider with no token stops the client."""
    result = js(
        harness,
        """
        let n = 0;
        const reasons = [];
        const { client, clock } = makeClient({
          token: async (ctx) => {
            reasons.push(ctx.reason);
            n += 1;
            return n <= 2 ? `tok${n}` : null;
          },
        });
        client.connect();
        await flush();
        const first = FakeWebSocket.last;
        first.serverOpen();
        first.serverClose(4401, "token expired");
        await flush();
        const second = FakeWebSocket.last;
        const sockets = FakeWebSocket.instances.length;
        second.serverOpen();
        second.serverClose(1006, "", false);
        clock.advance(60000);
        await flush();
        return { urls: [first.url, second.url], sockets, reasons, state: client.state,
                 kind: client.closeInfo.kind, total: FakeWebSocket.instances.length };
        """,
    )
    assert result["urls"] == [
        "ws://server.test/api/v1/ws?token=tok1",
        "ws://server.test/api/v1/ws?token=tok2",
    ]
    assert result["sockets"] == 2  # no backoff wait after 4401
    assert result["reasons"] == ["connect", "expired", "reconnect"]
    assert result["state"] == "closed" and result["kind"] == "auth"
    assert result["total"] == 2


def test_handshake_failure_is_reported_to_the_provider_and_token_never_logged(
    harness: Page,
) -> None:
    """A failure before open reaches the provider as "handshake_failed"; nothing shows the token."""
    result = js(
        harness,
        """
        const secret = "s3cr3t-token-value";
        const reasons = [];
        const { client, clock, events } = makeClient({
          url: "/api/v1/ws",
          token: (ctx) => { reasons.push(ctx.reason); return secret; },
        });
        const logged = [];
        const orig = {};
        for (const k of ["log", "warn", "error", "debug", "info"]) {
          orig[k] = console[k];
          console[k] = (...a) => { logged.push(a.join(" ")); orig[k](...a); };
        }
        client.connect();
        await flush();
        const url = FakeWebSocket.last.url;
        FakeWebSocket.last.refuse();
        clock.advance(events.states.at(-1).delay);
        await flush();
        FakeWebSocket.last.serverOpen();
        client.close();
        Object.assign(console, orig);
        const reported = JSON.stringify([events, logged, client.url, client.closeInfo]);
        return { url, reasons, leaked: reported.includes(secret), logs: events.logs.length };
        """,
    )
    assert result["url"] == "ws://client.test/api/v1/ws?token=s3cr3t-token-value"
    assert result["reasons"] == ["connect", "handshake_failed"]
    assert result["leaked"] is False
    assert result["logs"] > 0  # it does log, just never the token


def test_online_and_visible_reconnect_at_once(harness: Page) -> None:
    """While waiting out a backoff, `online` or the tab becoming visible reconnects at once."""
    result = js(
        harness,
        """
        const { client, clock, win, doc, events } = makeClient({ random: () => 0.9999 });
        client.connect();
        await flush();
        FakeWebSocket.last.serverOpen();
        FakeWebSocket.last.serverClose(1006, "", false);
        const waiting = FakeWebSocket.instances.length;
        win.dispatchEvent(new Event("online"));
        await flush();
        const afterOnline = FakeWebSocket.instances.length;
        FakeWebSocket.last.refuse();
        doc.visibilityState = "hidden";
        doc.dispatchEvent(new Event("visibilitychange"));
        await flush();
        const afterHidden = FakeWebSocket.instances.length;
        doc.visibilityState = "visible";
        doc.dispatchEvent(new Event("visibilitychange"));
        await flush();
        const afterVisible = FakeWebSocket.instances.length;
        // Open: `online` probes the socket with a ping instead of waiting for the heartbeat.
        FakeWebSocket.last.serverOpen();
        win.dispatchEvent(new Event("online"));
        const probe = FakeWebSocket.last.sent.at(-1);
        client.close();
        return { waiting, afterOnline, afterHidden, afterVisible, probe, pending: clock.pending };
        """,
    )
    assert result["waiting"] == 1
    assert result["afterOnline"] == 2
    assert result["afterHidden"] == 2
    assert result["afterVisible"] == 3
    assert result["probe"] == {"action": "ping"}
    assert result["pending"] == 0


def test_close_leaves_no_timer_or_listener(harness: Page) -> None:
    """close() clears every timer (counted on wrapped globals) in every state, and listeners."""
    result = js(
        harness,
        """
        const timers = trackTimers();
        const out = {};
        const sleep = (ms) => new Promise((r) => window.setTimeout(r, ms));
        try {
          const counted = (target) => {
            let n = 0;
            const add = target.addEventListener.bind(target);
            const remove = target.removeEventListener.bind(target);
            target.addEventListener = (...a) => { n += 1; add(...a); };
            target.removeEventListener = (...a) => { n -= 1; remove(...a); };
            return () => n;
          };
          // 1. open, with a heartbeat pending
          let c = makeClient({ realTimers: true, heartbeatInterval: 50, heartbeatTimeout: 50 });
          const winListeners = counted(c.win);
          const docListeners = counted(c.doc);
          c.client.connect();
          await sleep(0);
          FakeWebSocket.last.serverOpen();
          await sleep(60);  // a ping is out, its timeout pending
          out.openPending = timers.pending();
          out.listenersBefore = winListeners() + docListeners();
          c.client.close();
          out.openAfter = timers.pending();
          out.listenersAfter = winListeners() + docListeners();

          // 2. waiting out a backoff
          c = makeClient({ realTimers: true, initialDelay: 10000 });
          c.client.connect();
          await sleep(0);
          FakeWebSocket.last.serverOpen();
          FakeWebSocket.last.serverClose(1006, "", false);
          out.backoffPending = timers.pending();
          c.client.close();
          out.backoffAfter = timers.pending();

          // 3. an attempt that never opens (connect timeout pending)
          c = makeClient({ realTimers: true });
          c.client.connect();
          await sleep(0);
          out.connectPending = timers.pending();
          c.client.close();
          out.connectAfter = timers.pending();
          out.sockets = FakeWebSocket.instances.length;
          await sleep(100);
          out.socketsLater = FakeWebSocket.instances.length;
          out.state = c.client.state;
          out.closeCalled = FakeWebSocket.last.closeCalled;
        } finally {
          timers.restore();
        }
        return out;
        """,
    )
    assert result["openPending"] >= 1 and result["backoffPending"] >= 1
    assert result["connectPending"] >= 1
    assert result["openAfter"] == 0
    assert result["backoffAfter"] == 0
    assert result["connectAfter"] == 0
    assert result["listenersBefore"] == 2 and result["listenersAfter"] == 0
    assert result["socketsLater"] == result["sockets"]
    assert result["state"] == "closed"
    assert result["closeCalled"] == {"code": 1000, "reason": "client closed"}


def test_short_lived_connections_back_off_and_count(harness: Page) -> None:
    """Connections closed right after they open back off exponentially and run out."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient({ random: () => 0.9999, maxAttempts: 5 });
        client.connect();
        await flush();
        for (let i = 0; i < 20 && client.state !== "closed"; i++) {
          FakeWebSocket.last.serverOpen();
          FakeWebSocket.last.serverSend({ type: "pong" });
          FakeWebSocket.last.serverClose(4008, "slow consumer");
          if (client.state !== "reconnecting") break;
          clock.advance(events.states.at(-1).delay);
          await flush();
        }
        return { waits: events.states.filter((s) => s.delay !== null).map((s) => s.delay),
                 state: client.state, kind: client.closeInfo.kind, pending: clock.pending,
                 sockets: FakeWebSocket.instances.length,
                 opens: events.opens.map((o) => o.attempt) };
        """,
    )
    assert result["waits"] == [499, 999, 1999, 3999, 7999]
    assert result["state"] == "closed" and result["kind"] == "exhausted"
    assert result["pending"] == 0
    assert result["sockets"] == 6  # the first connect + 5 reconnects
    assert result["opens"] == [0, 1, 2, 3, 4, 5]


def test_a_connection_that_lasts_starts_the_count_again(harness: Page) -> None:
    """Open for stableAfter ms resets the attempts; open for less does not."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient({ random: () => 0.9999, stableAfter: 5000 });
        const dropAfter = async (ms) => {
          FakeWebSocket.last.serverOpen();
          clock.advance(ms);
          FakeWebSocket.last.serverClose(1006, "", false);
          const wait = events.states.at(-1);
          clock.advance(wait.delay);
          await flush();
          return [wait.attempt, wait.delay];
        };
        client.connect();
        await flush();
        const waits = [];
        for (const ms of [10, 4999, 10, 5000, 10]) waits.push(await dropAfter(ms));
        client.close();
        return { waits, pending: clock.pending };
        """,
    )
    assert result["waits"] == [[1, 499], [2, 999], [3, 1999], [1, 499], [2, 999]]
    assert result["pending"] == 0


def test_repeated_4401_backs_off(harness: Page) -> None:
    """One 4401 reconnects at once; 4401 again before a stable connection backs off."""
    result = js(
        harness,
        """
        let n = 0;
        const { client, clock, events } = makeClient({
          random: () => 0.9999,
          maxAttempts: 3,
          token: () => `tok${++n}`,   // a fresh token each time, still refused
        });
        client.connect();
        await flush();
        const log = [];
        for (let i = 0; i < 10 && client.state !== "closed"; i++) {
          FakeWebSocket.last.serverOpen();
          FakeWebSocket.last.serverClose(4401, "session revoked");
          await flush();
          const waiting = client.state === "reconnecting" && clock.pending === 1;
          const delay = waiting ? events.states.at(-1).delay : null;
          log.push({ sockets: FakeWebSocket.instances.length, delay });
          if (waiting) {
            clock.advance(delay);
            await flush();
          }
        }
        const tail = { state: client.state, kind: client.closeInfo.kind, pending: clock.pending };
        // After a connection that lasted, a 4401 is retried at once again.
        client.connect();
        await flush();
        FakeWebSocket.last.serverOpen();
        clock.advance(10000);
        FakeWebSocket.last.serverClose(4401, "token expired");
        await flush();
        return { log, ...tail, afterStable: FakeWebSocket.instances.length,
                 reopened: client.state, urls: FakeWebSocket.instances.map((w) => w.url) };
        """,
    )
    assert result["log"] == [
        {"sockets": 2, "delay": None},  # the first 4401: reconnected at once
        {"sockets": 2, "delay": 499},
        {"sockets": 3, "delay": 999},
        {"sockets": 4, "delay": 1999},
        {"sockets": 5, "delay": None},  # attempts spent
    ]
    assert result["state"] == "closed" and result["kind"] == "exhausted"
    assert result["pending"] == 0
    assert result["afterStable"] == 7 and result["reopened"] == "reconnecting"
    assert len(set(result["urls"])) == 7  # each attempt had its own token


def test_same_token_after_4401_is_an_auth_failure(harness: Page) -> None:
    """A provider that offers again the token refused with 4401 stops the client (auth)."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient({ token: () => "revoked" });
        client.connect();
        await flush();
        FakeWebSocket.last.serverOpen();
        FakeWebSocket.last.serverClose(4401, "session revoked");
        await flush();
        clock.advance(600000);
        await flush();
        return { state: client.state, info: client.closeInfo, pending: clock.pending,
                 sockets: FakeWebSocket.instances.length, last: events.states.at(-1),
                 errors: events.errors.map((e) => e.type) };
        """,
    )
    assert result["state"] == "closed"
    assert result["info"]["kind"] == "auth" and result["info"]["code"] == 4401
    assert result["last"]["state"] == "closed" and result["last"]["kind"] == "auth"
    assert result["sockets"] == 1
    assert result["pending"] == 0
    assert result["errors"] == ["token"]


def test_subscribe_replies_are_routed_by_id(harness: Page) -> None:
    """Each subscribe has an id of its own; a snapshot or error carrying it reaches its handler."""
    result = js(
        harness,
        """
        const { client, events } = makeClient();
        const seen = { T: [], U: [] };
        client.subscribe("T", (m) => seen.T.push([m.type, m.code ?? m.task?.seq ?? m.seq]));
        client.subscribe("U", (m) => seen.U.push([m.type, m.code ?? m.task?.seq ?? m.seq]));
        client.connect();
        await flush();
        const ws = FakeWebSocket.last;
        ws.serverOpen();
        const [t, u] = ws.sent;
        ws.serverSend({ type: "error", code: "rate_limited", message: "slow down", id: u.id });
        ws.serverSend({ type: "snapshot", task: { id: "T", seq: 3 }, id: t.id });
        ws.serverSend({ type: "error", code: "bad_request", message: "no id" });
        ws.serverSend({ type: "error", code: "rate_limited", message: "not ours", id: "other" });
        return { ids: [t.id, u.id], seen, messages: events.messages.length,
                 errors: events.errors, still: [client.lastSeq("T"), client.lastSeq("U")] };
        """,
    )
    t_id, u_id = result["ids"]
    assert t_id != u_id and isinstance(t_id, str) and isinstance(u_id, str)
    assert result["seen"] == {"T": [["snapshot", 3]], "U": [["error", "rate_limited"]]}
    assert result["messages"] == 4  # onMessage still sees every message
    assert result["errors"] == []  # rate_limited does not end the subscription
    assert result["still"] == [3, None]


@pytest.mark.parametrize("code", ["not_found", "forbidden"])
def test_refused_subscription_ends_and_is_not_resubscribed(harness: Page, code: str) -> None:
    """not_found/forbidden ends the subscription: reported once, never sent again."""
    result = js(
        harness,
        """
        const { client, clock, events } = makeClient();
        const seen = [];
        const kept = [];
        const stop = client.subscribe("GONE", (m) => {
          seen.push([m.type, m.code, client.lastSeq("GONE")]);
        }, { lastSeq: 4 });
        client.subscribe("KEPT", (m) => kept.push(m.seq));
        client.connect();
        await flush();
        const first = FakeWebSocket.last;
        first.serverOpen();
        const gone = first.sent.find((m) => m.task_id === "GONE");
        first.serverSend({ type: "error", code: arg, message: "task not found", id: gone.id });
        first.serverSend({ type: "error", code: arg, message: "task not found", id: gone.id });
        first.serverSend({ type: "event", task_id: "GONE", seq: 5 });
        stop();  // the page's own stop() after the error: nothing to unsubscribe
        const sentBefore = first.sent.length;
        first.serverClose(1006, "", false);
        clock.advance(events.states.at(-1).delay);
        await flush();
        const second = FakeWebSocket.last;
        second.serverOpen();
        second.serverSend({ type: "event", task_id: "KEPT", seq: 1 });
        return { seen, kept, sentBefore, firstSent: first.sent,
                 resub: second.sent.map((m) => m.task_id),
                 errors: events.errors.filter((e) => e.type === "subscription"),
                 lastSeq: client.lastSeq("GONE") };
        """,
        code,
    )
    assert result["seen"] == [["error", code, None]]
    assert result["sentBefore"] == 2  # the two subscribes; no unsubscribe
    assert [m["action"] for m in result["firstSent"]] == ["subscribe", "subscribe"]
    assert result["resub"] == ["KEPT"]
    assert result["kept"] == [1]
    assert len(result["errors"]) == 1
    err = result["errors"][0]
    assert err["taskId"] == "GONE" and err["code"] == code
    assert result["lastSeq"] is None


def test_a_late_reply_to_an_earlier_subscribe_is_not_misrouted(harness: Page) -> None:
    """A subscription dropped and made again gets a new id; replies to the old one miss it."""
    result = js(
        harness,
        """
        const { client } = makeClient();
        client.connect();
        await flush();
        const ws = FakeWebSocket.last;
        ws.serverOpen();
        const seen = [];
        const stop = client.subscribe("T", () => {});
        stop();
        client.subscribe("T", (m) => seen.push(m.code));
        const [oldSub, , newSub] = ws.sent;
        ws.serverSend({ type: "error", code: "not_found", message: "x", id: oldSub.id });
        const after = client.lastSeq("T") === null && seen.length === 0;
        ws.serverSend({ type: "error", code: "not_found", message: "x", id: newSub.id });
        return { ids: [oldSub.id, newSub.id], after, seen };
        """,
    )
    assert result["ids"][0] != result["ids"][1]
    assert result["after"] is True
    assert result["seen"] == ["not_found"]
