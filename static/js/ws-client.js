/**
 * A reconnecting WebSocket client for the task-progress server (docs/protocol.md).
 *
 * No dependency and no build step: import it as an ES module from any page.
 *
 *   import { WebSocketClient } from "/static/js/ws-client.js";
 *   const client = new WebSocketClient({
 *     url: "/api/v1/ws",
 *     token: () => sessionStorage.getItem("token"),
 *     onStateChange: (state, info) => console.log(state, info.delay),
 *   });
 *   client.connect();
 *   const stop = client.subscribe(taskId, (msg) => render(msg));
 *
 * What it does for the page:
 * - asks the token provider for a token at every (re)connect and sends it as `?token=`
 *   (browsers cannot set headers on a WebSocket);
 * - reconnects with exponential backoff and full jitter, up to `maxAttempts` tries; the
 *   count starts again only once a connection has stayed open `stableAfter` ms, so a server
 *   that closes every connection right after it opens is retried ever more slowly, then
 *   given up on, never hammered;
 * - sends an application ping every `heartbeatInterval` ms and treats a missing pong as a
 *   dead connection;
 * - remembers the last seq delivered per subscribed task, resubscribes with `last_seq` after
 *   every reconnect, and drops anything at or below that seq, so a handler sees each seq
 *   once, in order;
 * - sends every subscribe with an `id` of its own and routes the replies carrying it
 *   (snapshot, error) to that subscription; a `not_found` or `forbidden` reply ends the
 *   subscription (it is not resubscribed on reconnect);
 * - acts on the server's close codes (reconnect, refresh the token, or stop and say why);
 * - reconnects at once when the browser comes back online or the tab becomes visible.
 *
 * Tokens never appear in anything this module logs or reports: the URL it reports is the
 * one it was given, without the token.
 *
 * @module ws-client
 */

/** Connection states, as reported by `onStateChange`. */
export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

/**
 * Why the client is closed (`client.closeInfo.kind`).
 * - `user`: `close()` was called (or `connect()` was never called);
 * - `normal`: the server closed with 1000;
 * - `fatal`: a close code that retrying cannot fix (1008, 1009, 4403, …);
 * - `auth`: the token provider returned no token, or threw, or returned again the token the
 *   server had just refused with 4401;
 * - `exhausted`: `maxAttempts` reconnect attempts failed.
 */
export const CloseKind = Object.freeze({
  USER: "user",
  NORMAL: "normal",
  FATAL: "fatal",
  AUTH: "auth",
  EXHAUSTED: "exhausted",
});

/** Close codes after which the client stops instead of reconnecting. */
export const FATAL_CLOSE_CODES = Object.freeze(new Set([1002, 1003, 1007, 1008, 1009, 1010, 4403]));

/** The server closed the socket because the token expired while it was open. */
export const CLOSE_TOKEN_EXPIRED = 4401;

/** The code reported when the client itself gives up on a silent connection. */
export const CLOSE_HEARTBEAT_TIMEOUT = 4000;

/**
 * Error codes in a reply to a subscribe that end the subscription: retrying cannot help (the
 * task does not exist, or is not the caller's), so it is dropped and not resubscribed on
 * reconnect. Other error replies (`rate_limited`, `too_many_subscriptions`, …) reach the
 * handler too, but the subscription stays and is sent again at the next reconnect.
 */
export const SUBSCRIPTION_END_CODES = Object.freeze(new Set(["not_found", "forbidden"]));

/**
 * The backoff delay before reconnect attempt `attempt` (1-based): "full jitter", a uniform
 * random value between 0 and min(cap, initial × factor^(attempt-1)).
 *
 * @param {number} attempt 1 for the first retry.
 * @param {{initialDelay: number, maxDelay: number, factor: number}} opts Delays in ms.
 * @param {() => number} random A source of numbers in [0, 1).
 * @returns {number} The delay in ms.
 */
export function backoffDelay(attempt, { initialDelay, maxDelay, factor }, random) {
  const ceiling = Math.min(maxDelay, initialDelay * Math.pow(factor, Math.max(0, attempt - 1)));
  return Math.floor(random() * ceiling);
}

/**
 * Turn a page-relative or http(s) URL into a ws(s) URL.
 *
 * @param {string} url
 * @param {string | undefined} base The page's location, when there is one.
 * @returns {URL}
 */
function toWebSocketUrl(url, base) {
  const parsed = base ? new URL(url, base) : new URL(url);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  else if (parsed.protocol === "https:") parsed.protocol = "wss:";
  return parsed;
}

/**
 * @typedef {object} TokenContext
 * @property {"connect" | "reconnect" | "expired" | "handshake_failed"} reason Why a token is
 *   needed: the first connect, a reconnect after a drop, the server said the token expired
 *   (4401), or the previous attempt failed before the socket opened (a network failure, or
 *   a refused handshake: the browser cannot tell them apart, so the provider may check the
 *   token over HTTP, e.g. GET /api/v1/auth/me).
 * @property {number} attempt The reconnect attempt about to be made (0 for the first connect).
 */

/**
 * @typedef {object} StateInfo
 * @property {number} attempt Reconnect attempts made since the last stable connection (one
 *   that stayed open `stableAfter` ms).
 * @property {number} maxAttempts The limit.
 * @property {number | null} delay While waiting to reconnect: the wait, in ms.
 * @property {number | null} retryAt While waiting: when the next attempt starts (clock ms).
 * @property {number | null} code The close code that caused this state, if any.
 * @property {string} reason A short human-readable reason (never contains a token).
 * @property {string | null} kind When closed: one of {@link CloseKind}.
 */

/**
 * @typedef {object} WebSocketClientOptions
 * @property {string} url The endpoint, e.g. "/api/v1/ws" or "wss://host/api/v1/ws"; http(s)
 *   and page-relative URLs are turned into ws(s).
 * @property {(ctx: TokenContext) => (string | null | undefined | Promise<string | null | undefined>)} [token]
 *   Called before every connection attempt; the token is appended as `?token=`. Returning
 *   null/undefined/"" (or throwing) means "no valid token": the client stops (kind `auth`).
 *   Leave the option out for an endpoint that needs no token.
 * @property {number} [initialDelay=500] First backoff ceiling, in ms.
 * @property {number} [maxDelay=30000] Backoff cap, in ms.
 * @property {number} [factor=2] Backoff growth per attempt.
 * @property {number} [maxAttempts=10] Reconnect attempts before giving up (state `closed`,
 *   kind `exhausted`). Attempts are counted until a connection is stable (`stableAfter`), so
 *   connections that close soon after they open count too.
 * @property {number} [stableAfter=10000] Ms a connection must stay open before the attempt
 *   count (and the count of 4401 closes) starts again from 0. Time, not traffic, decides: a
 *   server that sends a message or two and then closes (a crash loop, a 4008 for a message
 *   that never fits) still backs off. 0 resets the count at every open.
 * @property {number} [connectTimeout=10000] An attempt still not open after this many ms
 *   counts as failed.
 * @property {number} [heartbeatInterval=20000] Ms between application pings while open
 *   (0 turns the heartbeat off).
 * @property {number} [heartbeatTimeout=10000] Ms to wait for any message (normally the pong)
 *   after a ping before the connection is declared dead.
 * @property {number} [maxQueue=100] Messages `send()` keeps while not open.
 * @property {(state: string, info: StateInfo) => void} [onStateChange]
 * @property {(info: {attempt: number}) => void} [onOpen] After the socket opened and the
 *   subscriptions and queued messages were sent.
 * @property {(msg: any) => void} [onMessage] Every parsed message not dropped as a duplicate.
 * @property {(err: {type: string, message: string, taskId?: string, code?: string}) => void} [onError]
 *   `type` is one of `socket`, `parse`, `handler`, `queue_full`, `token`, `url`, or
 *   `subscription` (a subscription ended by a `not_found`/`forbidden` reply: `taskId` and
 *   `code` say which and why).
 * @property {(info: {code: number, reason: string, wasClean: boolean, willReconnect: boolean}) => void} [onClose]
 *   After every socket that closes (or is given up on).
 * @property {typeof WebSocket} [WebSocket] The constructor to use (tests inject a fake).
 * @property {() => number} [random=Math.random] Jitter source, in [0, 1).
 * @property {() => number} [now=Date.now] Clock, in ms.
 * @property {(fn: () => void, ms: number) => any} [setTimeout] Timer functions (tests inject
 *   fakes); the globals by default.
 * @property {(id: any) => void} [clearTimeout]
 * @property {EventTarget | null} [window] Where `online` is heard (globalThis by default;
 *   null: do not listen).
 * @property {(EventTarget & {visibilityState?: string}) | null} [document] Where
 *   `visibilitychange` is heard (globalThis.document by default; null: do not listen).
 * @property {{debug?: Function, warn?: Function}} [logger] Receives lifecycle lines (never
 *   a token); silent by default.
 */

/**
 * A reconnecting WebSocket with per-task subscriptions that resume by seq.
 */
export class WebSocketClient {
  /** @param {WebSocketClientOptions} options */
  constructor(options) {
    if (!options || typeof options.url !== "string" || !options.url) {
      throw new TypeError("WebSocketClient: options.url is required");
    }
    const o = options;
    /** @private The URL as given (no token in it, safe to report). */
    this._url = o.url;
    /** @private */
    this._tokenProvider = typeof o.token === "function" ? o.token : null;
    /** Backoff settings, in ms. */
    this.backoff = {
      initialDelay: o.initialDelay ?? 500,
      maxDelay: o.maxDelay ?? 30000,
      factor: o.factor ?? 2,
    };
    /** Reconnect attempts allowed after a drop before the client gives up. */
    this.maxAttempts = o.maxAttempts ?? 10;
    /** Ms a connection must stay open before the attempt count starts again. */
    this.stableAfter = o.stableAfter ?? 10000;
    /** Ms an attempt may stay unopened. */
    this.connectTimeout = o.connectTimeout ?? 10000;
    /** Ms between application pings while open. */
    this.heartbeatInterval = o.heartbeatInterval ?? 20000;
    /** Ms to wait for a message after a ping. */
    this.heartbeatTimeout = o.heartbeatTimeout ?? 10000;
    /** Messages kept by `send()` while not open. */
    this.maxQueue = o.maxQueue ?? 100;

    /** @private */
    this._callbacks = {
      onStateChange: o.onStateChange,
      onOpen: o.onOpen,
      onMessage: o.onMessage,
      onError: o.onError,
      onClose: o.onClose,
    };
    /** @private */
    this._WebSocket = o.WebSocket ?? globalThis.WebSocket;
    /** @private */
    this._random = o.random ?? Math.random;
    /** @private */
    this._now = o.now ?? (() => Date.now());
    // Looked up at call time (not captured at import) so a page may wrap the globals.
    /** @private */
    this._setTimeout = o.setTimeout ?? ((fn, ms) => globalThis.setTimeout(fn, ms));
    /** @private */
    this._clearTimeout = o.clearTimeout ?? ((id) => globalThis.clearTimeout(id));
    /** @private */
    this._window = o.window === undefined ? globalThis : o.window;
    /** @private */
    this._document = o.document === undefined ? globalThis.document ?? null : o.document;
    /** @private */
    this._logger = o.logger ?? {};

    /** Current state, one of {@link State}. */
    this.state = State.CLOSED;
    /** Why the client is closed (when `state` is closed): {code, reason, kind}. */
    this.closeInfo = { code: null, reason: "not connected", kind: CloseKind.USER };
    /** Reconnect attempts made since the last stable connection. */
    this.attempt = 0;

    /** @private The live socket, or null. */
    this._ws = null;
    /**
     * @private Bumped whenever the current connection cycle is abandoned, so that late
     * callbacks (an awaited token, an old socket's events) can tell they are stale.
     */
    this._generation = 0;
    /** @private Whether the last attempt failed before opening. */
    this._failedBeforeOpen = false;
    /** @private Why the next token is needed (see TokenContext.reason). */
    this._tokenReason = "connect";
    /** @private Pending timers by purpose: reconnect, connect, heartbeat, pong, stable. */
    this._timers = { reconnect: null, connect: null, heartbeat: null, pong: null, stable: null };
    /** @private 4401 closes since the last stable connection: only the first is retried at once. */
    this._expiredStreak = 0;
    /** @private The token of the live socket (never logged nor reported). */
    this._socketToken = null;
    /**
     * @private The last token the server refused with 4401, in a box (`{token}`) so that "no
     * token" can be refused too; null when none was. Offered again, it stops the client.
     */
    this._refused = null;
    /** @private Counter for the subscribe ids (`sub:1`, `sub:2`, …). */
    this._lastId = 0;
    /** @private Subscribe id → the subscription it was sent for, to route its replies. */
    this._replyTo = new Map();
    /** @private While waiting to reconnect: {delay, retryAt}. */
    this._pendingRetry = null;
    /** @private Serialised messages waiting for an open socket. */
    this._queue = [];
    /**
     * @private taskId → {taskId, handlers: Set<Function>, lastSeq: number | null, replyId}.
     * lastSeq is the last seq delivered to the handlers (null: none yet; the server will
     * send a snapshot); replyId the id of the last subscribe sent for it.
     */
    this._subs = new Map();
    /** @private Whether the window/document listeners are installed. */
    this._listening = false;
    this._onOnline = () => this._wake("online");
    this._onVisibility = () => {
      if (!this._document || this._document.visibilityState === "visible") this._wake("visible");
    };
  }

  /** The URL as given, without any token. */
  get url() {
    return this._url;
  }

  /** While waiting to reconnect: when the next attempt starts (clock ms); else null. */
  get retryAt() {
    return this._pendingRetry?.retryAt ?? null;
  }

  /**
   * Start connecting (also: "retry now" after the client gave up, or skip a backoff wait).
   * Resets the attempt counter. Does nothing while a connection is open or opening.
   */
  connect() {
    if (this.state === State.OPEN || (this.state === State.CONNECTING && this._ws)) return;
    this._listen(true);
    this._abandon();
    this.attempt = 0;
    this._expiredStreak = 0;
    this._tokenReason = this._failedBeforeOpen ? "handshake_failed" : "connect";
    this._open(State.CONNECTING);
  }

  /**
   * Stop for good: close the socket, clear every timer and listener, forget queued messages.
   * Subscriptions are kept (with their last seq), so a later `connect()` resumes them.
   *
   * @param {number} [code=1000]
   * @param {string} [reason="client closed"]
   */
  close(code = 1000, reason = "client closed") {
    this._listen(false);
    this._queue.length = 0;
    this._abandon(code, reason);
    this._stop(CloseKind.USER, code, reason);
  }

  /**
   * Send a message (an object, sent as JSON). While not open it is queued (at most
   * `maxQueue` messages) and sent once, in order, when the connection opens; `close()`
   * drops the queue.
   *
   * @param {object} message
   * @returns {boolean} false when the queue is full and the message was dropped.
   */
  send(message) {
    const text = JSON.stringify(message);
    if (this._ws && this.state === State.OPEN) {
      this._ws.send(text);
      return true;
    }
    if (this._queue.length >= this.maxQueue) {
      this._error("queue_full", `send queue full (${this.maxQueue} messages); message dropped`);
      return false;
    }
    this._queue.push(text);
    return true;
  }

  /**
   * Follow a task. The handler gets the task's messages (`event`, `snapshot`, and `error`
   * replies to the subscription), each seq once and in order, across reconnects. An error
   * whose code is in {@link SUBSCRIPTION_END_CODES} is the last message: the subscription
   * is dropped (also reported to `onError`, type `subscription`); `subscribe()` again to
   * retry.
   *
   * @param {string} taskId
   * @param {(msg: any) => void} handler
   * @param {{lastSeq?: number | null}} [options] `lastSeq`: the last seq the caller already
   *   has (e.g. kept in storage across a reload), so only later events are sent; 0 replays
   *   the whole history; leave it out to start from a snapshot. Ignored when the task is
   *   already followed (the client's own seq is more recent).
   * @returns {() => void} Stops this handler; the last one out unsubscribes on the server.
   */
  subscribe(taskId, handler, options = {}) {
    let sub = this._subs.get(taskId);
    if (!sub) {
      const start = options.lastSeq;
      sub = {
        taskId,
        handlers: new Set(),
        lastSeq: Number.isInteger(start) && start >= 0 ? start : null,
        replyId: null,
      };
      this._subs.set(taskId, sub);
      if (this._ws && this.state === State.OPEN) this._sendSubscribe(taskId, sub);
    }
    sub.handlers.add(handler);
    let active = true;
    return () => {
      if (!active) return;
      active = false;
      sub.handlers.delete(handler);
      if (sub.handlers.size === 0 && this._subs.get(taskId) === sub) {
        this._dropSub(sub);
        if (this._ws && this.state === State.OPEN) {
          this._ws.send(JSON.stringify({ action: "unsubscribe", task_id: taskId }));
        }
      }
    };
  }

  /**
   * The last seq delivered for a task, or null.
   *
   * @param {string} taskId
   * @returns {number | null}
   */
  lastSeq(taskId) {
    return this._subs.get(taskId)?.lastSeq ?? null;
  }

  // -- connection cycle -------------------------------------------------------------------

  /**
   * @private Ask for a token, then open a socket. `state` is connecting or reconnecting.
   * @param {string} state
   */
  async _open(state) {
    const generation = ++this._generation;
    this._pendingRetry = null;
    this._setState(state, {});
    let token = null;
    if (this._tokenProvider) {
      const ctx = { reason: this._tokenReason, attempt: this.attempt };
      try {
        token = await this._tokenProvider(ctx);
      } catch (err) {
        if (generation !== this._generation) return;
        this._error("token", `token provider failed: ${err?.message ?? err}`);
        this._stop(CloseKind.AUTH, null, "no valid token");
        return;
      }
      if (generation !== this._generation) return; // closed or restarted meanwhile
      if (!token) {
        this._stop(CloseKind.AUTH, null, "no valid token");
        return;
      }
    }
    let url;
    try {
      url = toWebSocketUrl(this._url, globalThis.location?.href);
    } catch {
      this._error("url", `invalid url ${this._url}`);
      this._stop(CloseKind.FATAL, null, "invalid url");
      return;
    }
    // The server refused this very token with 4401 (expired, or its session revoked):
    // connecting with it again can only be refused again, in a loop.
    if (this._refused && this._refused.token === (token || null)) {
      this._error("token", "the token provider returned the token the server refused");
      this._stop(CloseKind.AUTH, CLOSE_TOKEN_EXPIRED, "token refused");
      return;
    }
    if (token) url.searchParams.set("token", token);
    let ws;
    try {
      ws = new this._WebSocket(url.toString());
    } catch (err) {
      // Never report err.message: it may quote the URL, token included.
      this._error("socket", `could not create a WebSocket for ${this._url}`);
      this._stop(CloseKind.FATAL, null, "could not create a WebSocket");
      return;
    }
    this._log("debug", `ws: connecting to ${this._url} (attempt ${this.attempt})`);
    this._ws = ws;
    this._socketToken = token || null;
    this._failedBeforeOpen = true; // until onopen says otherwise
    let opened = false;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      opened = true;
      this._handleOpen();
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      this._handleMessage(ev.data);
    };
    ws.onerror = () => {
      if (ws !== this._ws) return;
      this._error("socket", opened ? "connection error" : "could not connect");
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._handleClose(ev.code, ev.reason || "", !!ev.wasClean, opened);
    };
    this._timers.connect = this._setTimeout(() => {
      this._timers.connect = null;
      if (ws !== this._ws || opened) return;
      this._giveUpOn(ws, 1006, "connect timeout", false);
    }, this.connectTimeout);
  }

  /** @private */
  _handleOpen() {
    this._clearTimer("connect");
    this._failedBeforeOpen = false;
    const attempt = this.attempt;
    // Opening proves little (a server in a crash loop opens too): the counts start again
    // only once the connection has lasted.
    if (this.stableAfter > 0) {
      this._timers.stable = this._setTimeout(() => {
        this._timers.stable = null;
        this._markStable();
      }, this.stableAfter);
    } else {
      this._markStable();
    }
    this._setState(State.OPEN, {});
    this._log("debug", `ws: open ${this._url}`);
    // Subscriptions first, so that queued messages about them find them in place.
    for (const [taskId, sub] of this._subs) this._sendSubscribe(taskId, sub);
    const queued = this._queue.splice(0);
    for (const text of queued) this._ws.send(text);
    this._scheduleHeartbeat();
    this._callbacks.onOpen?.({ attempt });
  }

  /** @private The connection has lasted: later failures count from 0 again. */
  _markStable() {
    this.attempt = 0;
    this._expiredStreak = 0;
  }

  /**
   * @private
   * @param {string} text
   */
  _handleMessage(text) {
    // Any message proves the connection alive: no need to wait for the pong itself.
    this._clearTimer("pong");
    this._scheduleHeartbeat();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this._error("parse", "received a message that is not JSON");
      return;
    }
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "pong") {
      this._callbacks.onMessage?.(msg);
      return;
    }
    // A reply to one of our subscribes carries its id (errors carry nothing else that
    // says which task they are about); events and other messages name their task.
    const replied = msg.id !== undefined && msg.id !== null ? this._replyTo.get(msg.id) : undefined;
    let sub = replied && this._subs.get(replied.taskId) === replied ? replied : undefined;
    if (!sub) {
      const taskId = msg.type === "snapshot" ? msg.task?.id : msg.task_id;
      sub = taskId ? this._subs.get(taskId) : undefined;
    }
    if (sub && !this._accept(sub, msg)) return; // a duplicate: dropped
    const ended = sub !== undefined && msg.type === "error" && SUBSCRIPTION_END_CODES.has(msg.code);
    // Dropped before the handlers run, so that a handler sees it gone (lastSeq() is null,
    // its stop() sends no unsubscribe) and nothing resubscribes it on reconnect.
    if (ended) this._dropSub(sub);
    this._callbacks.onMessage?.(msg);
    if (sub) {
      for (const handler of [...sub.handlers]) {
        try {
          handler(msg);
        } catch (err) {
          this._error("handler", `subscription handler threw: ${err?.message ?? err}`);
        }
      }
    }
    if (ended) {
      this._callbacks.onError?.({
        type: "subscription",
        message: `cannot follow task ${sub.taskId}: ${msg.code}${msg.message ? ` (${msg.message})` : ""}`,
        taskId: sub.taskId,
        code: msg.code,
      });
    }
  }

  /** @private Forget a subscription (and the id its replies would carry). */
  _dropSub(sub) {
    if (this._subs.get(sub.taskId) === sub) this._subs.delete(sub.taskId);
    if (sub.replyId !== null) this._replyTo.delete(sub.replyId);
    sub.replyId = null;
  }

  /**
   * @private Decide whether a task message goes to the handlers, and advance lastSeq.
   * @returns {boolean}
   */
  _accept(sub, msg) {
    if (msg.type === "event") {
      if (!Number.isInteger(msg.seq)) return true;
      if (sub.lastSeq !== null && msg.seq <= sub.lastSeq) return false;
      sub.lastSeq = msg.seq;
      return true;
    }
    if (msg.type === "snapshot") {
      const seq = msg.task?.seq;
      if (!Number.isInteger(seq)) return true;
      // recovered:false means "replace your state with this": always deliver it.
      if (msg.recovered === false || sub.lastSeq === null || seq > sub.lastSeq) {
        sub.lastSeq = seq;
        return true;
      }
      return false;
    }
    return true; // errors and other replies
  }

  /** @private */
  _sendSubscribe(taskId, sub) {
    // A fresh id per subscribe sent, so a late reply to an earlier one (for a subscription
    // since dropped and made again) cannot be taken for this one's.
    if (sub.replyId !== null) this._replyTo.delete(sub.replyId);
    sub.replyId = `sub:${++this._lastId}`;
    this._replyTo.set(sub.replyId, sub);
    const message = { action: "subscribe", task_id: taskId, id: sub.replyId };
    if (sub.lastSeq !== null) message.last_seq = sub.lastSeq;
    this._ws.send(JSON.stringify(message));
  }

  /**
   * @private A socket closed (or was given up on): decide what comes next from its code.
   */
  _handleClose(code, reason, wasClean, opened) {
    this._ws = null;
    this._clearTimer("connect");
    this._clearTimer("heartbeat");
    this._clearTimer("pong");
    this._clearTimer("stable");
    let next; // "reconnect" | "refresh" | a CloseKind to stop with
    if (code === CLOSE_TOKEN_EXPIRED) next = "refresh";
    else if (code === 1000) next = CloseKind.NORMAL;
    else if (FATAL_CLOSE_CODES.has(code)) next = CloseKind.FATAL;
    else next = "reconnect"; // 1001, 1006, 4008, 1011-1014, 4000 (heartbeat), unknown
    const willReconnect = next === "reconnect" || next === "refresh";
    this._log("debug", `ws: closed ${code} ${reason || ""} (opened: ${opened})`);
    this._callbacks.onClose?.({ code, reason, wasClean, willReconnect });
    if (!willReconnect) {
      this._stop(next, code, reason || `closed with code ${code}`);
      return;
    }
    if (next === "refresh") {
      // The token expired (or its session was revoked) while open: the provider must give
      // a different one. The first time, reconnect at once; again before a connection
      // lasted, back off like any failure, so a server that keeps refusing is no tight loop.
      this._refused = { token: this._socketToken };
      this._tokenReason = "expired";
      this._failedBeforeOpen = false;
      this._expiredStreak += 1;
      if (this._expiredStreak === 1) this._open(State.RECONNECTING);
      else this._scheduleReconnect(code, reason);
      return;
    }
    this._tokenReason = opened ? "reconnect" : "handshake_failed";
    this._scheduleReconnect(code, reason);
  }

  /** @private Wait out a backoff delay, or stop when the attempts are spent. */
  _scheduleReconnect(code, reason) {
    if (this.attempt >= this.maxAttempts) {
      this._stop(CloseKind.EXHAUSTED, code, `gave up after ${this.attempt} attempts`);
      return;
    }
    this.attempt += 1;
    const delay = backoffDelay(this.attempt, this.backoff, this._random);
    const retryAt = this._now() + delay;
    this._pendingRetry = { delay, retryAt };
    const generation = ++this._generation;
    this._timers.reconnect = this._setTimeout(() => {
      this._timers.reconnect = null;
      if (generation !== this._generation) return;
      this._open(State.RECONNECTING);
    }, delay);
    this._setState(State.RECONNECTING, { delay, retryAt, code, reason });
  }

  /** @private Close a socket we no longer trust and carry on as if it had closed. */
  _giveUpOn(ws, code, reason, opened) {
    this._closeSocket(ws, CLOSE_HEARTBEAT_TIMEOUT, reason);
    this._handleClose(code, reason, false, opened);
  }

  /** @private */
  _closeSocket(ws, code, reason) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    try {
      ws.close(code, reason);
    } catch {
      try {
        ws.close();
      } catch {
        /* already closed */
      }
    }
  }

  // -- heartbeat ---------------------------------------------------------------------------

  /** @private (Re)arm the next ping, unless a pong is already awaited. */
  _scheduleHeartbeat() {
    if (!this.heartbeatInterval || this.state !== State.OPEN || this._timers.pong) return;
    this._clearTimer("heartbeat");
    this._timers.heartbeat = this._setTimeout(() => {
      this._timers.heartbeat = null;
      this._ping();
    }, this.heartbeatInterval);
  }

  /** @private Send a ping and expect some message back within heartbeatTimeout. */
  _ping() {
    const ws = this._ws;
    if (!ws || this.state !== State.OPEN || this._timers.pong) return;
    try {
      ws.send(JSON.stringify({ action: "ping" }));
    } catch {
      /* a dead socket: the timeout below notices */
    }
    this._timers.pong = this._setTimeout(() => {
      this._timers.pong = null;
      if (ws !== this._ws) return;
      this._log("warn", `ws: no pong within ${this.heartbeatTimeout} ms; reconnecting`);
      this._giveUpOn(ws, 1006, "heartbeat timeout", true);
    }, this.heartbeatTimeout);
  }

  // -- online / visible --------------------------------------------------------------------

  /** @private Reconnect at once if the connection is dead; probe it if it looks alive. */
  _wake(why) {
    if (this.state === State.RECONNECTING && !this._ws) {
      this._log("debug", `ws: ${why}: reconnecting now`);
      this._abandon();
      this._open(State.RECONNECTING);
    } else if (this.state === State.CLOSED && this.closeInfo.kind === CloseKind.EXHAUSTED) {
      this._log("debug", `ws: ${why}: trying again`);
      this.connect();
    } else if (this.state === State.OPEN) {
      // The network changed, or the machine slept, under an open socket: check it now
      // instead of at the next heartbeat.
      this._clearTimer("heartbeat");
      this._ping();
    }
  }

  /** @private */
  _listen(on) {
    if (on === this._listening) return;
    this._listening = on;
    const method = on ? "addEventListener" : "removeEventListener";
    this._window?.[method]?.("online", this._onOnline);
    this._document?.[method]?.("visibilitychange", this._onVisibility);
  }

  // -- helpers -----------------------------------------------------------------------------

  /**
   * @private Drop the current socket (closing it with `code`) and every timer, and make
   * pending callbacks stale.
   */
  _abandon(code = 1000, reason = "reconnecting") {
    this._generation += 1;
    for (const name of Object.keys(this._timers)) this._clearTimer(name);
    this._pendingRetry = null;
    const ws = this._ws;
    this._ws = null;
    if (ws) this._closeSocket(ws, code, reason);
  }

  /** @private Enter the closed state for good (until connect()). */
  _stop(kind, code, reason) {
    this._abandon();
    if (kind !== CloseKind.USER && kind !== CloseKind.EXHAUSTED) this._listen(false);
    this.closeInfo = { code, reason, kind };
    if (kind !== CloseKind.USER) this._log("warn", `ws: stopped (${kind}): ${reason}`);
    this._setState(State.CLOSED, { code, reason, kind });
  }

  /** @private */
  _clearTimer(name) {
    if (this._timers[name] !== null) {
      this._clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  /** @private */
  _setState(state, { delay = null, retryAt = null, code = null, reason = "", kind = null }) {
    const changed = state !== this.state;
    this.state = state;
    // Reconnecting is reported again for each wait, so a page can show its countdown.
    if (!changed && state !== State.RECONNECTING) return;
    this._callbacks.onStateChange?.(state, {
      attempt: this.attempt,
      maxAttempts: this.maxAttempts,
      delay,
      retryAt,
      code,
      reason,
      kind,
    });
  }

  /** @private */
  _error(type, message) {
    this._callbacks.onError?.({ type, message });
  }

  /** @private */
  _log(level, line) {
    this._logger[level]?.(line);
  }
}
