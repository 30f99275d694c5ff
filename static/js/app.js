/**
 * The demo page: log in, start a stock analysis, watch it live, resume it after a reload;
 * share a task as a read-only link; manage API keys.
 *
 * One WebSocketClient (ws-client.js) per logged-in page; the task panel subscribes to one
 * task at a time and keeps what it showed (with the last seq) in sessionStorage, so that a
 * reload shows that task again at once and asks the server only for the events after that
 * seq. Other tasks still running are offered in a "Resume" banner.
 *
 * A parent task (a multi-code analysis) shows its children as small bars, kept up to date
 * from the parent's own events alone (tree.js); each opens that child in the panel. While
 * the socket is down the card says that live updates are paused, and since when.
 *
 * Opened with a share link (`/#task=…&share=…`, see share.js) the page is a shared view
 * instead: that one task, live, read-only, with the share token as its only credential —
 * no login, no task creation, no Share or Cancel, no keys. The same client and task panel
 * do the work, so reconnecting and resuming behave as for a logged-in user; a token the
 * server no longer accepts (expired, or the owner stopped sharing) ends the view with a
 * message instead of retrying.
 *
 * @module app
 */

import { ApiError, api, login, refresh, session, views } from "./api.js";
import { copyText, selectForCopy } from "./clipboard.js";
import { keysPanel } from "./keys-panel.js";
import { hasShareToken, readShareLink, shareUrl } from "./share.js";
import {
  BATCH_KIND,
  TERMINAL,
  applyMessage,
  clockTime,
  dateTime,
  emptyView,
  h,
  renderEta,
  renderTask,
  restoredView,
  statusLabel,
  stepLabel,
  taskTitle,
} from "./task-view.js";
import { isParent, mergeChildren } from "./tree.js";
import { CloseKind, State, SUBSCRIPTION_END_CODES, WebSocketClient } from "./ws-client.js";

const $ = (selector) => document.querySelector(selector);

/** Events asked for per page when catching up over HTTP (the server's maximum). */
const EVENTS_PAGE = 1000;
/** Children asked for per page of GET /tasks/{id}/children (the server's maximum). */
const CHILDREN_PAGE = 1000;
/** Tasks shown in the recent list. Both it and the resume banner ask for root tasks only
 * (`root=true`): a multi-code analysis is one entry, not one per code. */
const RECENT_SHOWN = 10;
/** Most codes in one analysis (the server's limit). */
const MAX_CODES = 20;
/** A stock code as the server takes it: 6 digits (A-share) or a ticker of 1-10 letters/dots. */
const STOCK_CODE = /^(?:[0-9]{6}|(?=[A-Za-z.]*[A-Za-z])[A-Za-z.]{1,10})$/;

const els = {
  authView: $("#auth-view"),
  appView: $("#app-view"),
  authTitle: $("#auth-title"),
  authMessage: $("#auth-message"),
  loginForm: $("#login-form"),
  registerForm: $("#register-form"),
  showRegister: $("#show-register"),
  showLogin: $("#show-login"),
  switchToRegister: $("#switch-to-register"),
  switchToLogin: $("#switch-to-login"),
  userBox: $("#user-box"),
  userName: $("#user-name"),
  logout: $("#logout"),
  connection: $("#connection-status"),
  connectionText: $("#connection-text"),
  connectionLive: $("#connection-live"),
  retry: $("#retry-now"),
  analyzeForm: $("#analyze-form"),
  analyzeError: $("#analyze-error"),
  resumeBanner: $("#resume-banner"),
  resumeList: $("#resume-list"),
  taskList: $("#task-list"),
  taskListEmpty: $("#task-list-empty"),
  refreshTasks: $("#refresh-tasks"),
  announcer: $("#announcer"),
  appTitle: $("#app-title"),
  sharedLabel: $("#shared-label"),
  sharedEnded: $("#shared-ended"),
  /** What only the owner sees: hidden in a shared view. */
  ownerOnly: [...document.querySelectorAll("[data-owner-only]")],
};

/** The task panel's elements, as task-view.js expects them. */
const panel = {
  card: $("#task-card"),
  title: $("#task-title"),
  status: $("#task-status"),
  empty: $("#task-empty"),
  body: $("#task-body"),
  bar: $("#task-progress"),
  fill: $("#task-progress .progress-fill"),
  percent: $("#task-percent"),
  step: $("#task-step"),
  message: $("#task-message"),
  cancel: $("#cancel-task"),
  outcome: $("#task-outcome"),
  log: $("#step-log"),
  eta: $("#task-eta"),
  paused: $("#task-paused"),
  parent: $("#task-parent"),
  openParent: $("#open-parent"),
  children: $("#task-children"),
  childrenTitle: $("#children-title"),
  childrenSummary: $("#children-summary"),
  childList: $("#child-list"),
  share: $("#share-task"),
  stopSharing: $("#stop-sharing"),
  shareStatus: $("#share-status"),
  shareFallback: $("#share-fallback"),
  shareLink: $("#share-link"),
};

const keys = keysPanel({
  root: $("#keys-panel"),
  onUnauthorized: () => sessionExpired(),
  announce,
});

/** @type {WebSocketClient | null} */
let client = null;
/** The task on screen: {view, unsubscribe, children: {loading, again}}. */
let current = null;
let refreshTimer = null;
let countdownTimer = null;
/** Counts the time left under the bar down between events (every second while shown). */
let etaTimer = null;
/** Clock ms since when the socket has been down (null: open, or not tried yet). */
let liveLostAt = null;
/** In a shared view: the link's {taskId, token}; null on the logged-in page. */
let shared = null;
/** The last share link made on this page: {taskId, url, expiresAt}; Share copies it again. */
let lastShare = null;

// -- connection status --------------------------------------------------------------------

const CLOSED_TEXT = {
  [CloseKind.USER]: "Not connected",
  [CloseKind.NORMAL]: "Disconnected",
  [CloseKind.FATAL]: "Disconnected by the server",
  [CloseKind.AUTH]: "Session expired",
  [CloseKind.EXHAUSTED]: "Connection lost",
};

/**
 * Show the client's state in #connection-status (data-state + words + "Retry now").
 *
 * @param {string} state
 * @param {{retryAt?: number | null, attempt?: number, maxAttempts?: number, kind?: string | null}} info
 */
function showConnection(state, info = {}) {
  clearInterval(countdownTimer);
  countdownTimer = null;
  els.connection.dataset.state = state;
  let spoken;
  if (state === State.CONNECTING) {
    spoken = "Connecting…";
    els.connectionText.textContent = spoken;
  } else if (state === State.OPEN) {
    spoken = "Live: connected";
    els.connectionText.textContent = "Live";
  } else if (state === State.RECONNECTING) {
    spoken = "Connection lost, reconnecting…";
    if (info.retryAt) {
      const tick = () => {
        const seconds = Math.max(1, Math.ceil((info.retryAt - Date.now()) / 1000));
        els.connectionText.textContent = `Reconnecting in ${seconds} s…`;
      };
      tick();
      countdownTimer = setInterval(tick, 250);
    } else {
      const n = info.attempt ?? 0;
      els.connectionText.textContent = n ? `Reconnecting… (try ${n} of ${info.maxAttempts})` : "Reconnecting…";
    }
  } else {
    const kind = info.kind ?? client?.closeInfo.kind ?? CloseKind.USER;
    spoken = shared && kind === CloseKind.AUTH ? "Link no longer valid" : CLOSED_TEXT[kind] ?? "Disconnected";
    els.connectionText.textContent = spoken;
  }
  const loggedIn = Boolean(client);
  els.retry.hidden = !(state === State.CLOSED && loggedIn && info.kind !== CloseKind.AUTH);
  // Only state changes are spoken, not every tick of the countdown.
  if (els.connectionLive.textContent !== spoken) els.connectionLive.textContent = spoken;
}

/** Logged out, no connection tried: a neutral pill, not one that reads like an error. */
const IDLE_TEXT = "Live after log-in";

function showIdle() {
  clearInterval(countdownTimer);
  countdownTimer = null;
  els.connection.dataset.state = "idle";
  els.connectionText.textContent = IDLE_TEXT;
  els.connectionLive.textContent = "";
  els.retry.hidden = true;
}

/**
 * Since when live updates of the task on screen have been off (the socket is down while it
 * is followed), or null.
 */
function pausedSince() {
  return client && current?.unsubscribe && liveLostAt !== null ? liveLostAt : null;
}

/** What the paused notice says of why, and what happens next. */
function pausedReason() {
  if (client?.state !== State.CLOSED) return "the connection to the server was lost. Reconnecting…";
  const kind = client.closeInfo.kind;
  return kind === CloseKind.EXHAUSTED
    ? "the server cannot be reached. “Retry now” at the top tries again."
    : "the server closed the connection. “Retry now” at the top reconnects.";
}

function announce(text) {
  els.announcer.textContent = "";
  // A fresh text node after a tick makes screen readers speak the same text twice in a row.
  setTimeout(() => (els.announcer.textContent = text), 50);
}

// -- the WebSocket client -----------------------------------------------------------------

/**
 * The client's token provider: the stored token, refreshed when it is about to expire or
 * the server said it expired; after a failed handshake, checked over HTTP (the browser
 * reports a refused handshake as a plain 1006, like a network failure).
 *
 * @param {{reason: string}} ctx
 * @returns {Promise<string | null>}
 */
async function tokenProvider(ctx) {
  let s = session.get();
  if (!s) return null;
  try {
    if (ctx.reason === "expired" || s.expiresAt - Date.now() < 30_000) {
      s = await refresh();
    } else if (ctx.reason === "handshake_failed") {
      await api("/auth/me", { token: s.token });
    }
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      sessionExpired();
      return null;
    }
    // The server is unreachable: keep the token, the client keeps retrying.
  }
  return s.token;
}

/**
 * The shared view's token provider: the share token; after a failed handshake or a 4401,
 * checked over HTTP first (GET /tasks/{id}), since a browser cannot see why a handshake was
 * refused. A 401 there means the link is over: no token, so the client stops (kind `auth`)
 * and the page says so. Unreachable: the same token, and the client keeps retrying.
 *
 * @param {{reason: string}} ctx
 * @returns {Promise<string | null>}
 */
async function sharedTokenProvider(ctx) {
  const link = shared;
  if (!link) return null;
  if (ctx.reason === "expired" || ctx.reason === "handshake_failed") {
    try {
      await api(`/tasks/${encodeURIComponent(link.taskId)}`, { token: link.token });
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) return null;
    }
  }
  return link.token;
}

/** The token for HTTP reads of the task on screen: the share token in a shared view. */
function readToken() {
  return shared ? shared.token : undefined; // undefined: api() uses the session's
}

/** The server refused the page's credential: log out, or end the shared view. */
function credentialRefused() {
  if (shared) shareEnded();
  else sessionExpired();
}

/**
 * Reconnect attempts before the page gives up and offers "Retry now": the client's default,
 * unless a script before app.js set `window.progressConfig = {reconnectAttempts: N}`.
 */
function configuredAttempts() {
  const value = globalThis.progressConfig?.reconnectAttempts;
  return Number.isInteger(value) && value >= 0 ? value : undefined;
}

function startClient(provider = tokenProvider) {
  client?.close();
  liveLostAt = null;
  const c = new WebSocketClient({
    url: "/api/v1/ws",
    token: provider,
    maxAttempts: configuredAttempts(),
    onStateChange: (state, info) => onClientState(c, state, info),
  });
  client = c;
  c.connect();
}

/**
 * Show the client's state; when it stopped for want of a valid token (none could be had, or
 * the server refused the one there is: a revoked or expired session, or share link), log
 * out or end the shared view.
 */
function onClientState(c, state, info) {
  if (c !== client) return; // a client already replaced or closed by leaveApp
  showConnection(state, info);
  if (state === State.OPEN) liveLostAt = null;
  else if (state === State.RECONNECTING || (state === State.CLOSED && info.kind !== CloseKind.USER)) {
    liveLostAt ??= Date.now(); // the first moment it went down, not the latest retry
  }
  if (state === State.CLOSED && info.kind === CloseKind.AUTH) credentialRefused();
  else render(); // the card's paused notice
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  const s = session.get();
  if (!s) return;
  // A minute before expiry; for short-lived tokens, halfway through their life.
  const lifetime = s.expiresAt - Date.now();
  const wait = Math.max(1_000, lifetime > 120_000 ? lifetime - 60_000 : lifetime / 2);
  refreshTimer = setTimeout(async () => {
    try {
      await refresh();
      scheduleRefresh();
    } catch (err) {
      if (err instanceof ApiError && err.status === 401) sessionExpired();
      else refreshTimer = setTimeout(scheduleRefresh, 30_000);
    }
  }, wait);
}

// -- auth ---------------------------------------------------------------------------------

/**
 * @param {"login" | "register"} mode
 * @param {string} [message]
 * @param {"info" | "error"} [tone]
 */
function showAuth(mode = "login", message = "", tone = "info") {
  els.appView.hidden = true;
  els.userBox.hidden = true;
  els.authView.hidden = false;
  const register = mode === "register";
  els.loginForm.hidden = register;
  els.registerForm.hidden = !register;
  els.switchToRegister.hidden = register;
  els.switchToLogin.hidden = !register;
  els.authTitle.textContent = register ? "Create an account" : "Log in";
  els.authMessage.textContent = message;
  els.authMessage.dataset.tone = tone;
  els.authMessage.hidden = !message;
  document.title = `${register ? "Create an account" : "Log in"} · Task progress`;
  const form = register ? els.registerForm : els.loginForm;
  form.querySelector("input:not([value]), input").focus();
}

function fieldErrors(err) {
  const parts = Object.entries(err.fields ?? {}).map(
    ([field, messages]) => `${field}: ${[].concat(messages).join(" ")}`,
  );
  return parts.length ? `${err.message}. ${parts.join("; ")}` : err.message;
}

async function submitLogin(event) {
  event.preventDefault();
  const form = els.loginForm;
  const data = new FormData(form);
  await busy(form, async () => {
    try {
      const s = await login(String(data.get("username")).trim(), String(data.get("password")));
      form.reset();
      enterApp(s.username);
    } catch (err) {
      const text =
        err.code === "invalid_credentials" ? "Wrong username or password." : fieldErrors(err);
      showAuthError(text);
    }
  });
}

async function submitRegister(event) {
  event.preventDefault();
  const form = els.registerForm;
  const data = new FormData(form);
  const username = String(data.get("username")).trim();
  const password = String(data.get("password"));
  await busy(form, async () => {
    try {
      await api("/auth/register", { method: "POST", body: { username, password }, token: null });
      const s = await login(username, password);
      form.reset();
      enterApp(s.username, "Welcome! Your account is ready.");
    } catch (err) {
      const text = err.code === "username_taken" ? "That username is taken." : fieldErrors(err);
      showAuthError(text);
    }
  });
}

function showAuthError(text) {
  els.authMessage.textContent = text;
  els.authMessage.dataset.tone = "error";
  els.authMessage.hidden = false;
}

/** Disable a form's controls while `work` runs. */
async function busy(form, work) {
  const controls = [...form.elements];
  controls.forEach((c) => (c.disabled = true));
  form.setAttribute("aria-busy", "true");
  try {
    await work();
  } finally {
    controls.forEach((c) => (c.disabled = false));
    form.removeAttribute("aria-busy");
  }
}

function enterApp(username, greeting = "") {
  // Read before clearTask(): after a reload, the task that was on screen comes back at once.
  const shown = views.current();
  const stored = shown ? views.get(shown) : null;
  els.authView.hidden = true;
  els.appView.hidden = false;
  els.userBox.hidden = false;
  els.userName.textContent = username;
  document.title = "Task progress";
  clearTask();
  startClient();
  scheduleRefresh();
  if (stored?.view) showTask(taskOf(restoredView(stored.view)));
  loadRecent();
  offerResume();
  keys.load();
  if (greeting) announce(greeting);
  els.analyzeForm.elements.code.focus();
}

function leaveApp(message, tone = "info") {
  clearTimeout(refreshTimer);
  stopCurrent();
  stopEtaTimer();
  const c = client;
  client = null;
  c?.close();
  session.clear();
  current = null;
  lastShare = null;
  keys.clear();
  liveLostAt = null;
  showIdle();
  showAuth("login", message, tone);
}

/**
 * The Log out button: ask the server to end the session (so the token, and any socket using
 * it, stops working), then forget it. The answer is not awaited and any failure ignored —
 * a 404 from a server without the route, a network error — as the token is forgotten anyway.
 */
function logOut() {
  const token = session.get()?.token;
  // api() starts the request before it first awaits: it carries the token before
  // leaveApp() clears it; keepalive lets it finish if the tab is closed right after.
  if (token) api("/auth/logout", { method: "POST", token, keepalive: true }).catch(() => {});
  leaveApp("You have logged out.");
}

function sessionExpired() {
  leaveApp("Your session has expired. Please log in again.", "error");
}

// -- tasks --------------------------------------------------------------------------------

/**
 * The codes typed in the form: separated by commas, semicolons or spaces, upper-cased, each
 * once; or why they cannot be sent.
 *
 * @param {string} text
 * @returns {{codes: string[], error: string}}
 */
function parseCodes(text) {
  const codes = [...new Set(text.split(/[\s,;]+/).filter(Boolean).map((c) => c.toUpperCase()))];
  const hint = "a 6-digit A-share code (600519) or a ticker (AAPL, BRK.B)";
  if (codes.length === 0) return { codes, error: `Enter ${hint}; several separated by commas.` };
  const bad = codes.find((c) => !STOCK_CODE.test(c));
  if (bad) return { codes, error: `“${bad}” is not a stock code: use ${hint}.` };
  if (codes.length > MAX_CODES) {
    return { codes, error: `At most ${MAX_CODES} codes at once (you gave ${codes.length}).` };
  }
  return { codes, error: "" };
}

async function submitAnalysis(event) {
  event.preventDefault();
  const form = els.analyzeForm;
  const input = form.elements.code;
  const { codes, error } = parseCodes(input.value);
  setAnalyzeError(error);
  if (error) return input.focus();
  // One code: an analysis; several: a parent with an analysis per code, ranked at the end.
  const body = codes.length === 1 ? { code: codes[0] } : { codes };
  await busy(form, async () => {
    try {
      const task = await api("/stock/analyze", { method: "POST", body });
      form.reset();
      els.resumeBanner.hidden = true;
      showTask(task);
      loadRecent();
      announce(
        codes.length === 1
          ? `Started the analysis of ${codes[0]}.`
          : `Started the analysis of ${codes.length} stocks: ${codes.join(", ")}.`,
      );
    } catch (err) {
      if (err.status === 401) return sessionExpired();
      setAnalyzeError(err.status === 422 ? fieldErrors(err) : err.message);
    }
  });
  input.focus();
}

function setAnalyzeError(text) {
  els.analyzeError.textContent = text;
  els.analyzeError.hidden = !text;
  els.analyzeForm.elements.code.setAttribute("aria-invalid", text ? "true" : "false");
}

function stopCurrent() {
  current?.unsubscribe?.();
  if (current) current.unsubscribe = null;
}

function clearTask() {
  stopCurrent();
  stopEtaTimer();
  resetShareBox();
  current = null;
  panel.body.hidden = true;
  panel.empty.hidden = false;
  panel.title.textContent = "Current task";
  panel.status.textContent = "";
  delete panel.card.dataset.status;
}

/** The task object showTask() needs, from a stored view (after a reload). */
function taskOf(view) {
  return {
    id: view.id,
    kind: view.kind,
    params: view.params,
    status: view.status,
    progress: view.progress,
    seq: view.seq,
    parent_id: view.parentId,
  };
}

/**
 * Put a task on screen: what was stored of it, then the rest from the server — live over
 * the WebSocket if it is still running (subscribing with the last seq shown), else over HTTP.
 * A parent's children are listed from GET /tasks/{id}/children, then kept up to date from
 * its events.
 *
 * @param {object} task A task object (from the list, or just created).
 */
function showTask(task) {
  stopCurrent();
  if (current?.view.id !== task.id) resetShareBox();
  const stored = views.get(task.id);
  const view = stored?.view ? restoredView(stored.view) : emptyView(task.id, task);
  view.parentId ??= task.parent_id ?? null;
  if (task.children && (task.seq ?? 0) >= view.seq) view.childCounts = task.children;
  current = { view, unsubscribe: null, children: { loading: false, again: false } };
  views.setCurrent(task.id);
  dropResume(task.id); // it is on screen now: no longer something to resume
  markCurrentInList();
  const finished = TERMINAL.has(task.status) || TERMINAL.has(view.status);
  if (!finished) {
    const mine = current;
    current.unsubscribe = client.subscribe(task.id, (msg) => onTaskMessage(mine, msg), {
      lastSeq: view.seq,
    });
  }
  render();
  if (finished && (view.seq < (task.seq ?? 0) || !TERMINAL.has(view.status))) catchUp(view);
  if (isParent(view) || view.kind === BATCH_KIND) loadChildren(current);
}

/** Open a child of the task on screen (from its bar or the ranking). */
function openChild(child) {
  if (!current) return;
  showTask({ ...child, parent_id: current.view.id });
  panel.title.focus();
}

/** "← Back to the whole analysis": the parent of the task on screen. */
async function openParent() {
  const parentId = current?.view.parentId;
  if (!parentId) return;
  let task;
  try {
    task = await api(`/tasks/${encodeURIComponent(parentId)}`);
  } catch (err) {
    if (err.status === 401) return sessionExpired();
    announce(err.status === 404 ? "That analysis no longer exists." : `Could not open it: ${err.message}`);
    return;
  }
  if (current?.view.parentId !== parentId) return; // something else was opened meanwhile
  showTask(task);
  panel.title.focus();
}

/**
 * Load the children of the task on screen (every page), and again if an event names one
 * the list lacks meanwhile; merged by each child's seq with what the events said.
 *
 * @param {{view: object, children: {loading: boolean, again: boolean}}} shown
 */
async function loadChildren(shown) {
  if (shown.children.loading) {
    shown.children.again = true;
    return;
  }
  shown.children.loading = true;
  const view = shown.view;
  view.childrenStale = false;
  const id = encodeURIComponent(view.id);
  let cursor = null;
  try {
    do {
      const query = `limit=${CHILDREN_PAGE}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`;
      const page = await api(`/tasks/${id}/children?${query}`, { token: readToken() });
      if (shown !== current) return;
      if (mergeChildren(view, page.tasks ?? [])) {
        views.put(view.id, { view });
        render();
      }
      cursor = page.next_cursor ?? null;
    } while (cursor);
  } catch (err) {
    if (err.status === 401) return credentialRefused();
    view.childrenStale = true; // unreachable: tried again at the next event
  } finally {
    shown.children.loading = false;
    if (shown.children.again && shown === current) {
      shown.children.again = false;
      loadChildren(shown);
    }
  }
}

function render() {
  if (!current) return;
  const since = pausedSince();
  renderTask(panel, current.view, {
    openChild: shared ? null : openChild, // a share token reads its one task only
    canOpenParent: !shared,
    pausedSince: since,
    pausedText: since === null ? "" : pausedReason(),
  });
  updateListItem(current.view);
  if (!panel.eta.hidden) startEtaTimer();
}

/** Count the time left down every second while it is shown; stops itself once hidden. */
function startEtaTimer() {
  if (etaTimer !== null) return;
  etaTimer = setInterval(() => {
    const shown = current && renderEta(panel, current.view, { paused: pausedSince() !== null });
    if (!shown) stopEtaTimer();
  }, 1000);
}

function stopEtaTimer() {
  clearInterval(etaTimer);
  etaTimer = null;
}

/** Keep the task's entry in the recent list in step with what the panel shows. */
function updateListItem(view) {
  const button = els.taskList.querySelector(`.task-item[data-task-id="${CSS.escape(view.id)}"]`);
  if (!button) return;
  button.dataset.status = view.status;
  const badge = button.querySelector(".badge");
  badge.dataset.status = view.status;
  badge.textContent = statusLabel(view.status);
  button.querySelector(".task-item-progress").textContent = listProgress(view);
}

/** " 55% · RSI (14)" for an active task, "" for a finished one. */
function listProgress(task) {
  if (TERMINAL.has(task.status)) return "";
  return ` ${Math.round(task.progress ?? 0)}%${task.step ? ` · ${stepLabel(task.step)}` : ""}`;
}

/** @param {{view: object}} shown @param {object} msg */
function onTaskMessage(shown, msg) {
  if (shown !== current) return; // a late message for a task no longer on screen
  if (msg.type === "error") {
    // The client routes a subscribe's error reply here. not_found/forbidden end the
    // subscription (the client will not send it again); anything else (rate_limited, …)
    // leaves it to be sent again at the next reconnect.
    const ended = SUBSCRIPTION_END_CODES.has(msg.code);
    delete panel.outcome.dataset.key; // drawn here, not by renderTask: the next render redraws
    panel.outcome.replaceChildren(
      h(
        "div",
        { class: "outcome outcome-failed", role: "alert", "data-code": msg.code },
        ended ? `Cannot follow this task: ${msg.message}` : `Live updates paused: ${msg.message}`,
      ),
    );
    if (ended) {
      panel.cancel.hidden = true;
      stopCurrent();
    }
    return;
  }
  const view = shown.view;
  const wasTerminal = TERMINAL.has(view.status);
  if (!applyMessage(view, msg)) return;
  views.put(view.id, { view });
  render();
  if (view.childrenStale) loadChildren(shown); // a child the list does not have yet
  if (!wasTerminal && TERMINAL.has(view.status)) {
    stopCurrent(); // nothing more will come
    render(); // no longer followed: no paused notice
    if (!shared) loadRecent();
    const code = view.params?.code ?? "";
    if (view.kind === BATCH_KIND) {
      const n = view.params?.codes?.length ?? view.children.length;
      announce(`Analysis of ${n} stocks ${statusLabel(view.status).toLowerCase()}.`);
    } else if (view.status === "completed") {
      const signal = String(view.result?.signal ?? "").toUpperCase();
      announce(`Analysis of ${code} completed${signal ? `: ${signal}` : ""}.`);
    } else {
      announce(`Analysis of ${code} ${statusLabel(view.status).toLowerCase()}.`);
    }
  }
}

/**
 * Fetch the events after the view's seq over HTTP (finished tasks, or the socket is down),
 * page after page. A page may hold fewer events than asked for although more exist (the
 * server caps a page by bytes too): `next_after_seq` then says where to go on; null means
 * nothing more, and so does an empty page. A server that does not send the field has more
 * only when the page is full. When the events do not start right after the seq asked for,
 * that history was trimmed: the task itself (GET /tasks/{id}) replaces the view, marked
 * as having a gap, rather than a log with a hole in it.
 */
async function catchUp(view) {
  const shown = current;
  const id = encodeURIComponent(view.id);
  const token = readToken();
  let after = view.seq;
  try {
    for (;;) {
      const page = await api(`/tasks/${id}/events?after_seq=${after}&limit=${EVENTS_PAGE}`, { token });
      if (shown !== current) return;
      const events = page.events ?? [];
      if (events.length === 0) return;
      if (events[0].seq !== after + 1) {
        const task = await api(`/tasks/${id}`, { token });
        onTaskMessage(shown, { type: "snapshot", task, recovered: false });
        return;
      }
      for (const event of events) onTaskMessage(shown, { type: "event", ...event });
      const next = page.next_after_seq;
      if (Number.isInteger(next) && next > after) after = next;
      else if (next === undefined && events.length >= EVENTS_PAGE) after = events.at(-1).seq;
      else return; // null, or a value that would not move on
    }
  } catch (err) {
    if (err.status === 401) credentialRefused();
  }
}

async function cancelCurrent() {
  if (!current) return;
  const shown = current;
  panel.cancel.disabled = true;
  try {
    await api(`/tasks/${shown.view.id}/cancel`, { method: "POST", body: {} });
    // Normally the `cancelled` event arrives over the socket; if it is down, fetch it.
    if (client?.state !== State.OPEN && shown === current) catchUp(shown.view);
  } catch (err) {
    if (err.status === 401) return sessionExpired();
    if (err.status !== 409) {
      panel.cancel.disabled = false;
      announce(`Could not cancel: ${err.message}`);
    }
  }
}

// -- sharing (the owner) ------------------------------------------------------------------

/** @param {string} text @param {"info" | "error"} [tone] */
function setShareStatus(text, tone = "info") {
  panel.shareStatus.textContent = text;
  panel.shareStatus.dataset.tone = tone;
}

function resetShareBox() {
  setShareStatus("");
  panel.shareFallback.hidden = true;
  panel.shareLink.value = "";
}

/** Whether a Share click is being handled (a second click meanwhile is ignored). */
let sharing = false;

/**
 * The Share button: make a read-only link to the task on screen (POST /tasks/{id}/share,
 * a day long) and copy it; a link made on this page that has a while left is copied again
 * rather than a new one made. When the clipboard is refused, the link is shown selected in
 * a read-only input.
 */
async function shareCurrent() {
  if (!current || sharing) return;
  const taskId = current.view.id;
  const id = encodeURIComponent(taskId);
  const reuse = lastShare?.taskId === taskId && Date.parse(lastShare.expiresAt) - Date.now() > 60_000;
  const made = reuse
    ? Promise.resolve(lastShare)
    : api(`/tasks/${id}/share`, { method: "POST", body: {} }).then((answer) => ({
        taskId,
        url: shareUrl(taskId, answer.token),
        expiresAt: answer.expires_at,
      }));
  sharing = true;
  panel.share.setAttribute("aria-busy", "true");
  panel.shareFallback.hidden = true;
  let link;
  let copied;
  try {
    // Started within the click, with the link still to come (see clipboard.js).
    copied = await copyText(made.then((l) => l.url));
    link = await made;
  } catch (err) {
    if (err.status === 401) return sessionExpired();
    if (current?.view.id === taskId) {
      setShareStatus(
        err.code === "quota_exceeded"
          ? "This task has as many links as allowed: stop sharing, then share again."
          : `Could not share: ${err.message}`,
        "error",
      );
    }
    return;
  } finally {
    sharing = false;
    panel.share.removeAttribute("aria-busy");
  }
  lastShare = link;
  if (current?.view.id !== taskId) return;
  const until = dateTime(link.expiresAt);
  if (copied) {
    setShareStatus(`Link copied. Anyone with it can watch this task until ${until}.`);
  } else {
    panel.shareFallback.hidden = false;
    selectForCopy(panel.shareLink, link.url);
    setShareStatus(
      `Your browser did not let the page copy the link: it is selected below, copy it with` +
        ` Ctrl+C (⌘C). It works until ${until}.`,
    );
  }
}

/** Stop sharing: every link to the task on screen stops working (its viewers are told). */
async function stopSharing() {
  if (!current) return;
  const taskId = current.view.id;
  try {
    await api(`/tasks/${encodeURIComponent(taskId)}/share`, { method: "DELETE" });
  } catch (err) {
    if (err.status === 401) return sessionExpired();
    if (current?.view.id === taskId) setShareStatus(`Could not stop sharing: ${err.message}`, "error");
    return;
  }
  if (lastShare?.taskId === taskId) lastShare = null;
  if (current?.view.id !== taskId) return;
  resetShareBox();
  setShareStatus("Sharing stopped: links to this task no longer work.");
}

// -- the shared view -----------------------------------------------------------------------

/**
 * Show the task of a share link, read-only: the task first over HTTP (which also checks
 * the token), then live over the WebSocket, or its history if it has finished.
 *
 * @param {{taskId: string, token: string}} link
 */
async function enterShared(link) {
  shared = link;
  els.authView.hidden = true;
  els.userBox.hidden = true;
  els.appView.hidden = false;
  els.appView.dataset.mode = "shared";
  for (const el of els.ownerOnly) el.hidden = true;
  els.sharedLabel.hidden = false;
  els.appTitle.textContent = "Shared task (read-only)";
  document.title = "Shared task · Task progress";
  panel.empty.textContent = "Loading the shared task…";
  let task;
  try {
    task = await api(`/tasks/${encodeURIComponent(link.taskId)}`, { token: link.token });
  } catch (err) {
    if (err.status === 401) return shareEnded();
    if (err.status === 404) return shareEnded("This shared task no longer exists.");
    if (err.status > 0 && err.status < 500) return shareEnded(`This link cannot be opened: ${err.message}.`);
    // Unreachable: the client keeps trying, and the replay brings the task when it connects.
    task = { id: link.taskId, status: "pending" };
  }
  startClient(sharedTokenProvider);
  showTask(task);
}

/**
 * The share token is no longer accepted (expired, or the owner stopped sharing): stop,
 * and say so instead of retrying. What was shown of the task stays on screen.
 *
 * @param {string} [reason]
 */
function shareEnded(reason = "This link has expired or was revoked.") {
  const c = client;
  client = null;
  stopCurrent();
  c?.close();
  els.sharedEnded.textContent = `${reason} Ask the person who shared it for a new link.`;
  els.sharedEnded.hidden = false;
  // Nothing shown: the message says it all. Shown: it stays, marked as no longer live.
  if (!current) panel.card.hidden = true;
  else panel.card.dataset.stale = "true";
  stopEtaTimer();
  render(); // no paused notice: the message above says why nothing more comes
  showConnection(State.CLOSED, { kind: CloseKind.AUTH });
}

/** The recent tasks list (newest first); each entry shows the task when clicked. */
async function loadRecent() {
  let tasks;
  try {
    ({ tasks } = await api(`/tasks?root=true&limit=${RECENT_SHOWN}`));
  } catch (err) {
    if (err.status === 401) sessionExpired();
    return;
  }
  els.taskListEmpty.hidden = tasks.length > 0;
  els.taskList.replaceChildren(
    ...tasks.map((task) => {
      // The panel's view of this task may be fresher than the list's answer, or older.
      const mine = current?.view.id === task.id && current.view.seq >= task.seq;
      const view = mine ? current.view : emptyView(task.id, task);
      return h(
        "li",
        {},
        h(
          "button",
          {
            type: "button",
            class: "task-item",
            "data-task-id": task.id,
            "data-status": view.status,
            "aria-current": current?.view.id === task.id ? "true" : null,
            onclick: () => {
              showTask(task);
              markCurrentInList();
              panel.title.focus();
            },
          },
          h("span", { class: "task-item-title" }, taskTitle(view)),
          h(
            "span",
            { class: "task-item-meta" },
            h("span", { class: "badge", "data-status": view.status }, statusLabel(view.status)),
            h("span", { class: "task-item-progress" }, listProgress(view)),
            h("time", { datetime: task.created_at }, clockTime(task.created_at)),
          ),
        ),
      );
    }),
  );
}

function markCurrentInList() {
  for (const button of els.taskList.querySelectorAll(".task-item")) {
    if (button.dataset.taskId === current?.view.id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
}

/** On load (and after login): offer to resume the tasks still running. */
async function offerResume() {
  let tasks;
  try {
    ({ tasks } = await api("/tasks?status=active&root=true"));
  } catch (err) {
    if (err.status === 401) sessionExpired();
    return;
  }
  tasks = tasks.filter((t) => t.id !== current?.view.id);
  els.resumeBanner.hidden = tasks.length === 0;
  els.resumeList.replaceChildren(
    ...tasks.map((task) => {
      const stored = views.get(task.id);
      const where = stored ? "pick up where you left off" : `${Math.round(task.progress)}% done`;
      return h(
        "li",
        { "data-task-id": task.id },
        h("span", {}, h("strong", {}, taskTitle(emptyView(task.id, task))), ` — ${where}`),
        h(
          "button",
          {
            type: "button",
            class: "primary",
            "data-task-id": task.id,
            onclick: () => {
              showTask(task);
              panel.title.focus();
            },
          },
          "Resume",
          h("span", { class: "visually-hidden" }, ` ${task.params?.code ?? ""}`),
        ),
      );
    }),
  );
}

/** A task now on screen leaves the resume banner, which hides once it lists nothing. */
function dropResume(taskId) {
  for (const item of els.resumeList.querySelectorAll("li")) {
    if (item.dataset.taskId === taskId) item.remove();
  }
  if (els.resumeList.children.length === 0) els.resumeBanner.hidden = true;
}

// -- start --------------------------------------------------------------------------------

function wire() {
  els.loginForm.addEventListener("submit", submitLogin);
  els.registerForm.addEventListener("submit", submitRegister);
  els.showRegister.addEventListener("click", () => showAuth("register"));
  els.showLogin.addEventListener("click", () => showAuth("login"));
  els.logout.addEventListener("click", logOut);
  els.retry.addEventListener("click", () => client?.connect());
  els.analyzeForm.addEventListener("submit", submitAnalysis);
  els.analyzeForm.elements.code.addEventListener("input", () => setAnalyzeError(""));
  panel.cancel.addEventListener("click", cancelCurrent);
  panel.share.addEventListener("click", shareCurrent);
  panel.stopSharing.addEventListener("click", stopSharing);
  panel.openParent.addEventListener("click", openParent);
  // A share link pasted into this tab changes only the fragment, which loads nothing: load
  // the page again, which then opens the shared view (and takes the token out of the bar).
  window.addEventListener("hashchange", () => {
    if (hasShareToken(location.hash)) location.reload();
  });
  els.refreshTasks.addEventListener("click", () => {
    loadRecent();
    offerResume();
  });
}

async function start() {
  wire();
  const link = readShareLink();
  if (link) {
    enterShared(link);
    return;
  }
  const s = session.get();
  if (!s) {
    showAuth("login");
    return;
  }
  try {
    const me = await api("/auth/me", { token: s.token });
    enterApp(me.username);
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      session.clear();
      showAuth("login", "Your session has expired. Please log in again.", "error");
    } else {
      enterApp(s.username); // the server is unreachable: the client keeps trying
    }
  }
}

start();
