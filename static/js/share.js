/**
 * Share links: `<origin>/#task=<id>&share=<share token>` (docs/protocol.md, "Share tokens").
 *
 * The token travels in the URL fragment, which browsers never send to a server, so it is in
 * no access log and no Referer. Once read, the page keeps it in sessionStorage (like the
 * login token, see api.js) and takes it out of the address bar with `history.replaceState`,
 * leaving `#task=<id>`: the token is then not in the browser's history (which browsers
 * sync and offer as completions), not on screen when the tab is shown or screen-shared, and
 * not in a URL copied from the bar later — the owner's Share button is the way to pass a
 * link on. A reload still finds the token in this tab's storage.
 *
 * @module share
 */

const SHARE_KEY = "progress.share";

/**
 * The share link this page was opened with (or, after a reload, the one kept for the task
 * named in the fragment); null when the page is not a shared view.
 *
 * @param {Location} location
 * @param {History} history
 * @returns {{taskId: string, token: string} | null}
 */
export function readShareLink(location = globalThis.location, history = globalThis.history) {
  const params = new URLSearchParams(location.hash.replace(/^#/, ""));
  const taskId = params.get("task");
  if (!taskId) return null;
  const token = params.get("share");
  if (token) {
    const link = { taskId, token };
    store(link);
    // Only the fragment changes: no navigation, no request, no hashchange event.
    const fragment = `#task=${encodeURIComponent(taskId)}`;
    history.replaceState(history.state, "", `${location.pathname}${location.search}${fragment}`);
    return link;
  }
  const kept = stored();
  return kept && kept.taskId === taskId ? kept : null;
}

/**
 * Whether a fragment carries a share token (a link pasted into a tab already open).
 *
 * @param {string} hash `location.hash`
 */
export function hasShareToken(hash) {
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  return Boolean(params.get("task") && params.get("share"));
}

/**
 * The link to hand out for a share token, on this page's own origin (which is where the
 * viewer must go: behind a TLS proxy the server may not know its public scheme).
 *
 * @param {string} taskId
 * @param {string} token
 * @param {Location} location
 */
export function shareUrl(taskId, token, location = globalThis.location) {
  const fragment = `task=${encodeURIComponent(taskId)}&share=${encodeURIComponent(token)}`;
  return `${location.origin}${location.pathname}#${fragment}`;
}

function stored() {
  try {
    const raw = sessionStorage.getItem(SHARE_KEY);
    const value = raw ? JSON.parse(raw) : null;
    return value && typeof value.taskId === "string" && typeof value.token === "string" ? value : null;
  } catch {
    return null; // storage disabled or corrupt: no kept link
  }
}

function store(link) {
  try {
    sessionStorage.setItem(SHARE_KEY, JSON.stringify(link));
  } catch {
    /* storage disabled: the view works, a reload just cannot find the token again */
  }
}
