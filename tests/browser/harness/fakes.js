/**
 * Fakes for testing ws-client.js in a real browser without a server: a WebSocket the test
 * drives by hand, a manual clock, and `makeClient`, which wires them into a client and
 * records everything it reports.
 */

/** A WebSocket stand-in: the test opens, feeds and closes it (the "server" side). */
export class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  /** Every socket created, oldest first. */
  static instances = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeWebSocket.CONNECTING;
    this.sent = [];
    this.closeCalled = null;
    this.onopen = this.onmessage = this.onerror = this.onclose = null;
    FakeWebSocket.instances.push(this);
  }

  static get last() {
    return FakeWebSocket.instances[FakeWebSocket.instances.length - 1];
  }

  static reset() {
    FakeWebSocket.instances = [];
  }

  send(text) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error("InvalidStateError: not open");
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closeCalled = { code, reason };
    this.readyState = FakeWebSocket.CLOSING;
  }

  // -- the server's side --
  serverOpen() {
    this.readyState = FakeWebSocket.OPEN;
    this.onopen?.({ type: "open" });
  }

  serverSend(message) {
    this.onmessage?.({ type: "message", data: JSON.stringify(message) });
  }

  serverClose(code, reason = "", wasClean = true) {
    this.readyState = FakeWebSocket.CLOSED;
    this.onclose?.({ type: "close", code, reason, wasClean });
  }

  /** A handshake that fails, as a browser reports it: error, then close 1006. */
  refuse() {
    this.onerror?.({ type: "error" });
    this.serverClose(1006, "", false);
  }
}

/** A manual clock: timers run only when the test advances time. */
export class FakeClock {
  constructor() {
    this.time = 0;
    this.timers = new Map();
    this.nextId = 1;
    this.setTimeout = (fn, ms) => {
      const id = this.nextId++;
      this.timers.set(id, { at: this.time + Math.max(0, ms ?? 0), fn, ms });
      return id;
    };
    this.clearTimeout = (id) => {
      this.timers.delete(id);
    };
    this.now = () => this.time;
  }

  /** Timers not yet run nor cleared. */
  get pending() {
    return this.timers.size;
  }

  /** Run every timer due within `ms` (also those scheduled meanwhile), in time order. */
  advance(ms) {
    const end = this.time + ms;
    for (;;) {
      let nextId = null;
      let next = null;
      for (const [id, t] of this.timers) {
        if (t.at <= end && (next === null || t.at < next.at)) {
          nextId = id;
          next = t;
        }
      }
      if (next === null) break;
      this.timers.delete(nextId);
      this.time = next.at;
      next.fn();
    }
    this.time = end;
  }
}

/** Let awaited promises (an async token provider) settle. */
export function flush() {
  return new Promise((resolve) => setTimeout(resolve, 0));
}

/** An EventTarget standing in for `document`, with a settable visibilityState. */
export function fakeDocument() {
  const doc = new EventTarget();
  doc.visibilityState = "hidden";
  return doc;
}

/**
 * A client on fakes: FakeWebSocket, a FakeClock (unless `realTimers`), a fixed random and
 * fake window/document. Returns {client, clock, win, doc, events} where `events` records
 * what the client reported.
 */
export function makeClient(options = {}) {
  FakeWebSocket.reset();
  const clock = options.realTimers ? null : new FakeClock();
  const win = new EventTarget();
  const doc = fakeDocument();
  const events = { states: [], messages: [], errors: [], closes: [], opens: [], logs: [], tokens: [] };
  const { realTimers, ...rest } = options;
  const client = new window.wsc.WebSocketClient({
    url: "ws://server.test/api/v1/ws",
    token: (ctx) => {
      events.tokens.push(ctx);
      return "tok";
    },
    WebSocket: FakeWebSocket,
    random: () => 0.5,
    window: win,
    document: doc,
    logger: {
      debug: (line) => events.logs.push(line),
      warn: (line) => events.logs.push(line),
    },
    onStateChange: (state, info) => events.states.push({ state, ...info }),
    onMessage: (msg) => events.messages.push(msg),
    onError: (err) => events.errors.push(err),
    onClose: (info) => events.closes.push(info),
    onOpen: (info) => events.opens.push(info),
    ...(clock ? { setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout, now: clock.now } : {}),
    ...rest,
  });
  return { client, clock, win, doc, events };
}

/**
 * Wrap the global setTimeout/clearTimeout/setInterval/clearInterval to count live timers.
 * Returns {pending(): number}.
 */
export function trackTimers() {
  const live = new Set();
  const { setTimeout: st, clearTimeout: ct, setInterval: si, clearInterval: ci } = window;
  window.setTimeout = (fn, ms, ...args) => {
    const id = st((...a) => {
      live.delete(id);
      fn(...a);
    }, ms, ...args);
    live.add(id);
    return id;
  };
  window.clearTimeout = (id) => {
    live.delete(id);
    ct(id);
  };
  window.setInterval = (fn, ms, ...args) => {
    const id = si(fn, ms, ...args);
    live.add(id);
    return id;
  };
  window.clearInterval = (id) => {
    live.delete(id);
    ci(id);
  };
  return {
    pending: () => live.size,
    restore() {
      Object.assign(window, { setTimeout: st, clearTimeout: ct, setInterval: si, clearInterval: ci });
    },
  };
}
