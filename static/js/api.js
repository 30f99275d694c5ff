/**
 * The demo page's HTTP side: the stored session (token) and JSON calls to /api/v1.
 *
 * The token lives in sessionStorage (see README, "The demo page"): it survives a reload of
 * the tab, which is what resuming a task needs, and is gone when the tab is closed.
 *
 * @module api
 */

const SESSION_KEY = "progress.session";
const VIEWS_KEY = "progress.views";
/** The id of the task the panel shows, so that a reload shows it again at once. */
const CURRENT_KEY = "progress.current";
/** How many task views (seq + what was shown) are kept for resuming: a multi-code analysis
 * of up to 20 codes and its children, and a few more. */
const MAX_VIEWS = 25;

/** An HTTP error in the server's shape ({error: {code, message, fields}}), or a network one. */
export class ApiError extends Error {
  /**
   * @param {number} status HTTP status, 0 for a network failure.
   * @param {string} code The server's error code ("network" when there was no answer).
   * @param {string} message
   * @param {Record<string, string[]>} [fields]
   */
  constructor(status, code, message, fields = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.fields = fields;
  }
}

function read(key) {
  try {
    const raw = sessionStorage.getItem(key);
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null; // storage disabled or corrupt: behave as if empty
  }
}

function write(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    /* storage full or disabled: the page still works, it just cannot resume */
  }
}

/** The logged-in session: {token, username, expiresAt (ms)}, kept in sessionStorage. */
export const session = {
  /** @returns {{token: string, username: string, expiresAt: number} | null} */
  get() {
    const s = read(SESSION_KEY);
    return s && typeof s.token === "string" ? s : null;
  },
  /** @param {{token: string, username: string, expiresAt: number}} value */
  set(value) {
    write(SESSION_KEY, value);
  },
  clear() {
    write(SESSION_KEY, null);
    write(VIEWS_KEY, null);
    write(CURRENT_KEY, null);
  },
};

/** What the page last showed of a task (its last seq included), for "Resume". */
export const views = {
  /** @param {string} taskId @returns {object | null} */
  get(taskId) {
    return read(VIEWS_KEY)?.[taskId] ?? null;
  },
  /** @param {string} taskId @param {object} view */
  put(taskId, view) {
    const all = read(VIEWS_KEY) ?? {};
    delete all[taskId];
    all[taskId] = { ...view, savedAt: Date.now() };
    const ids = Object.keys(all);
    for (const id of ids.slice(0, Math.max(0, ids.length - MAX_VIEWS))) delete all[id];
    write(VIEWS_KEY, all);
  },
  /** @returns {string | null} The id of the task last on screen. */
  current() {
    const id = read(CURRENT_KEY);
    return typeof id === "string" ? id : null;
  },
  /** @param {string | null} taskId */
  setCurrent(taskId) {
    write(CURRENT_KEY, taskId);
  },
};

/**
 * Call the JSON API.
 *
 * @param {string} path Below /api/v1, e.g. "/tasks?status=active".
 * @param {{method?: string, body?: object, token?: string | null, keepalive?: boolean}} [options]
 *   `token` defaults to the stored session's; `keepalive` lets the request outlive the page.
 * @returns {Promise<any>} The decoded answer.
 * @throws {ApiError}
 */
export async function api(path, { method = "GET", body, token, keepalive = false } = {}) {
  const headers = { Accept: "application/json" };
  const bearer = token === undefined ? session.get()?.token : token;
  if (bearer) headers.Authorization = `Bearer ${bearer}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(`/api/v1${path}`, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      keepalive,
    });
  } catch {
    throw new ApiError(0, "network", "The server cannot be reached.");
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    /* not JSON: handled below */
  }
  if (!response.ok) {
    const err = data?.error ?? {};
    throw new ApiError(
      response.status,
      err.code ?? "http_error",
      err.message ?? `HTTP ${response.status}`,
      err.fields ?? {},
    );
  }
  return data;
}

/**
 * Log in and store the session.
 *
 * @param {string} username
 * @param {string} password
 * @returns {Promise<{token: string, username: string, expiresAt: number}>}
 */
export async function login(username, password) {
  const data = await api("/auth/login", {
    method: "POST",
    body: { username, password },
    token: null,
  });
  const value = {
    token: data.access_token,
    username,
    expiresAt: Date.now() + data.expires_in * 1000,
  };
  session.set(value);
  return value;
}

/**
 * Exchange the stored (still valid) token for a fresh one.
 *
 * @returns {Promise<{token: string, username: string, expiresAt: number}>}
 * @throws {ApiError} 401 when the stored token is no longer valid.
 */
export async function refresh() {
  const current = session.get();
  if (!current) throw new ApiError(401, "missing_token", "not logged in");
  const data = await api("/auth/refresh", { method: "POST", token: current.token });
  const value = { ...current, token: data.access_token, expiresAt: Date.now() + data.expires_in * 1000 };
  session.set(value);
  return value;
}
