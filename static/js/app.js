/**
 * The demo page: log in, start a stock analysis, watch it live, resume it after a reload.
 *
 * One WebSocketClient (ws-client.js) per logged-in page; the task panel subscribes to one
 * task at a time and keeps what it showed (with the last seq) in sessionStorage, so that
 * "Resume" after a reload asks the server only for the events after that seq.
 *
 * @module app
 */

import { ApiError, api, login, logout, refresh, session, views } from "./api.js";
import {
  TERMINAL,
  applyMessage,
  clockTime,
  emptyView,
  h,
  renderTask,
  statusLabel,
  stepLabel,
  taskTitle,
} from "./task-view.js";
import { CloseKind, State, WebSocketClient } from "./ws-client.js";

const $ = (selector) => document.querySelector(selector);

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
};

/** @type {WebSocketClient | null} */
let client = null;
/** The task on screen: {view, unsubscribe}. */
let current = null;
let refreshTimer = null;
let countdownTimer = null;

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
    spoken = CLOSED_TEXT[kind] ?? "Disconnected";
    els.connectionText.textContent = spoken;
  }
  const loggedIn = Boolean(client);
  els.retry.hidden = !(state === State.CLOSED && loggedIn && info.kind !== CloseKind.AUTH);
  // Only state changes are spoken, not every tick of the countdown.
  if (els.connectionLive.textContent !== spoken) els.connectionLive.textContent = spoken;
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
 * Reconnect attempts before the page gives up and offers "Retry now": the client's default,
 * unless a script before app.js set `window.progressConfig = {reconnectAttempts: N}`.
 */
function configuredAttempts() {
  const value = globalThis.progressConfig?.reconnectAttempts;
  return Number.isInteger(value) && value >= 0 ? value : undefined;
}

function startClient() {
  client?.close();
  client = new WebSocketClient({
    url: "/api/v1/ws",
    token: tokenProvider,
    maxAttempts: configuredAttempts(),
    onStateChange: showConnection,
  });
  client.connect();
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
  els.authView.hidden = true;
  els.appView.hidden = false;
  els.userBox.hidden = false;
  els.userName.textContent = username;
  document.title = "Task progress";
  clearTask();
  startClient();
  scheduleRefresh();
  loadRecent();
  offerResume();
  if (greeting) announce(greeting);
  els.analyzeForm.elements.code.focus();
}

function leaveApp(message, tone = "info") {
  clearTimeout(refreshTimer);
  stopCurrent();
  const c = client;
  client = null;
  c?.close();
  session.clear();
  current = null;
  showConnection(State.CLOSED, { kind: CloseKind.USER });
  showAuth("login", message, tone);
}

function sessionExpired() {
  leaveApp("Your session has expired. Please log in again.", "error");
}

// -- tasks --------------------------------------------------------------------------------

async function submitAnalysis(event) {
  event.preventDefault();
  const form = els.analyzeForm;
  const input = form.elements.code;
  const code = input.value.trim();
  setAnalyzeError("");
  await busy(form, async () => {
    try {
      const task = await api("/stock/analyze", { method: "POST", body: { code } });
      form.reset();
      els.resumeBanner.hidden = true;
      showTask(task);
      loadRecent();
      announce(`Started the analysis of ${task.params.code}.`);
    } catch (err) {
      if (err.status === 401) return sessionExpired();
      setAnalyzeError(
        err.status === 422
          ? "Enter a 6-digit A-share code (600519) or a ticker (AAPL, BRK.B)."
          : err.message,
      );
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
  current = null;
  panel.body.hidden = true;
  panel.empty.hidden = false;
  panel.title.textContent = "Current task";
  panel.status.textContent = "";
  delete panel.card.dataset.status;
}

/**
 * Put a task on screen: what was stored of it, then the rest from the server — live over
 * the WebSocket if it is still running (subscribing with the last seq shown), else over HTTP.
 *
 * @param {object} task A task object (from the list, or just created).
 */
function showTask(task) {
  stopCurrent();
  const stored = views.get(task.id);
  const view = stored?.view ?? emptyView(task.id, task);
  current = { view, unsubscribe: null };
  render();
  const finished = TERMINAL.has(task.status) || TERMINAL.has(view.status);
  if (finished) {
    if (view.seq < task.seq || !TERMINAL.has(view.status)) catchUp(view);
  } else {
    const mine = current;
    current.unsubscribe = client.subscribe(task.id, (msg) => onTaskMessage(mine, msg), {
      lastSeq: view.seq,
    });
  }
}

function render() {
  if (!current) return;
  renderTask(panel, current.view);
  updateListItem(current.view);
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
    panel.outcome.replaceChildren(
      h("div", { class: "outcome outcome-failed", role: "alert" }, `Cannot follow this task: ${msg.message}`),
    );
    stopCurrent();
    return;
  }
  const view = shown.view;
  const wasTerminal = TERMINAL.has(view.status);
  if (!applyMessage(view, msg)) return;
  views.put(view.id, { view });
  render();
  if (!wasTerminal && TERMINAL.has(view.status)) {
    stopCurrent(); // nothing more will come
    loadRecent();
    const code = view.params?.code ?? "";
    if (view.status === "completed") {
      const signal = String(view.result?.signal ?? "").toUpperCase();
      announce(`Analysis of ${code} completed${signal ? `: ${signal}` : ""}.`);
    } else {
      announce(`Analysis of ${code} ${statusLabel(view.status).toLowerCase()}.`);
    }
  }
}

/** Fetch the events after the view's seq over HTTP (finished tasks, or the socket is down). */
async function catchUp(view) {
  const shown = current;
  try {
    const { events } = await api(`/tasks/${view.id}/events?after_seq=${view.seq}`);
    for (const event of events) onTaskMessage(shown, { type: "event", ...event });
  } catch (err) {
    if (err.status === 401) sessionExpired();
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

/** The recent tasks list (newest first); each entry shows the task when clicked. */
async function loadRecent() {
  let tasks;
  try {
    ({ tasks } = await api("/tasks?limit=10"));
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
    ({ tasks } = await api("/tasks?status=active"));
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
        {},
        h("span", {}, h("strong", {}, taskTitle(emptyView(task.id, task))), ` — ${where}`),
        h(
          "button",
          {
            type: "button",
            class: "primary",
            "data-task-id": task.id,
            onclick: () => {
              els.resumeBanner.hidden = true;
              showTask(task);
              markCurrentInList();
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

// -- start --------------------------------------------------------------------------------

function wire() {
  els.loginForm.addEventListener("submit", submitLogin);
  els.registerForm.addEventListener("submit", submitRegister);
  els.showRegister.addEventListener("click", () => showAuth("register"));
  els.showLogin.addEventListener("click", () => showAuth("login"));
  els.logout.addEventListener("click", () => {
    logout(); // takes the token before leaveApp forgets it
    leaveApp("You have logged out.");
  });
  els.retry.addEventListener("click", () => client?.connect());
  els.analyzeForm.addEventListener("submit", submitAnalysis);
  els.analyzeForm.elements.code.addEventListener("input", () => setAnalyzeError(""));
  panel.cancel.addEventListener("click", cancelCurrent);
  els.refreshTasks.addEventListener("click", () => {
    loadRecent();
    offerResume();
  });
}

async function start() {
  wire();
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
