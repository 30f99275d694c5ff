/**
 * The "API keys" panel: the logged-in user's keys (docs/protocol.md, "API keys").
 *
 * Lists them (name, scopes, created, last used), creates one (shown once, with a copy
 * button: the server keeps only its hash), revokes one after a confirm. Managing keys needs
 * the login token, which is what the page holds.
 *
 * @module keys-panel
 */

import { api } from "./api.js";
import { copyText, selectForCopy } from "./clipboard.js";
import { dateTime, h } from "./task-view.js";

/** The two scopes a key can have, in the order they are listed. */
const SCOPES = ["tasks:read", "tasks:write"];

/**
 * Wire the panel to its elements.
 *
 * @param {{
 *   root: HTMLElement,
 *   onUnauthorized: () => void,
 *   announce: (text: string) => void,
 * }} options `onUnauthorized`: the login token was refused (the page logs out).
 * @returns {{load: () => Promise<void>, clear: () => void}} `load` (re)reads the list;
 *   `clear` forgets everything shown (on log out: a new key must not stay on screen).
 */
export function keysPanel({ root, onUnauthorized, announce }) {
  const $ = (selector) => root.querySelector(selector);
  const form = $("#key-form");
  const nameInput = $("#key-name");
  const formError = $("#key-error");
  const listError = $("#keys-error");
  const table = $("#keys-table");
  const list = $("#keys-list");
  const empty = $("#keys-empty");
  const fresh = $("#new-key");
  const freshTitle = $("#new-key-title");
  const freshValue = $("#new-key-value");
  const copyStatus = $("#copy-key-status");
  /** Bumped by `clear()` and each `load()`, so a late answer does not redraw a stale list. */
  let generation = 0;

  /** Say what is wrong with the form (`badName`: the name field is the culprit). */
  function setFormError(text, badName = false) {
    formError.textContent = text;
    formError.hidden = !text;
    nameInput.setAttribute("aria-invalid", badName ? "true" : "false");
  }

  function refused(err) {
    if (err.status === 401) {
      onUnauthorized();
      return true;
    }
    return false;
  }

  async function load() {
    const mine = ++generation;
    let keys;
    try {
      ({ api_keys: keys } = await api("/api-keys"));
    } catch (err) {
      if (mine !== generation || refused(err)) return;
      listError.textContent = `Could not load your API keys: ${err.message}`;
      listError.hidden = false;
      return;
    }
    if (mine !== generation) return;
    listError.hidden = true;
    empty.hidden = keys.length > 0;
    table.hidden = keys.length === 0;
    list.replaceChildren(...keys.map(row));
  }

  /** One key as a table row; each cell names its column for the stacked phone layout. */
  function row(key) {
    const when = (ts, none) =>
      ts ? h("time", { datetime: ts }, dateTime(ts)) : h("span", { class: "muted" }, none);
    return h(
      "tr",
      { "data-key-id": key.id },
      h("th", { scope: "row", class: "key-name-cell", "data-label": "Name" }, key.name),
      h(
        "td",
        { "data-label": "Scopes" },
        h("ul", { class: "scope-list" }, key.scopes.map((s) => h("li", {}, h("code", {}, s)))),
      ),
      h("td", { "data-label": "Created" }, when(key.created_at, "—")),
      h("td", { "data-label": "Last used", class: "key-last-used" }, when(key.last_used_at, "Never")),
      h(
        "td",
        { class: "key-actions" },
        h(
          "button",
          { type: "button", class: "danger small", onclick: (ev) => revoke(key, ev.currentTarget) },
          "Revoke",
          h("span", { class: "visually-hidden" }, ` the key ${key.name}`),
        ),
      ),
    );
  }

  async function create(event) {
    event.preventDefault();
    const data = new FormData(form);
    const name = String(data.get("name") ?? "").trim();
    const scopes = SCOPES.filter((s) => data.getAll("scopes").includes(s));
    if (!name) {
      setFormError("Give the key a name, e.g. the program that will use it.", true);
      nameInput.focus();
      return;
    }
    if (scopes.length === 0) {
      setFormError("Choose at least one scope.");
      form.querySelector("input[name=scopes]").focus();
      return;
    }
    setFormError("");
    const controls = [...form.elements];
    controls.forEach((c) => (c.disabled = true));
    let created;
    try {
      created = await api("/api-keys", { method: "POST", body: { name, scopes } });
    } catch (err) {
      if (refused(err)) return;
      if (err.code === "quota_exceeded") {
        setFormError("You have as many API keys as allowed: revoke one first.");
      } else if (err.fields?.name) {
        setFormError("The name is too long: at most 100 bytes.", true);
      } else {
        setFormError(`Could not create the key: ${err.message}`);
      }
      return;
    } finally {
      controls.forEach((c) => (c.disabled = false));
    }
    form.reset();
    showFresh(created);
    load();
  }

  function showFresh(created) {
    freshTitle.textContent = `New key “${created.name}”`;
    freshValue.value = created.key;
    copyStatus.textContent = "";
    fresh.hidden = false;
    freshTitle.focus();
    announce(`Created the key ${created.name}. Copy it now: it will not be shown again.`);
  }

  function hideFresh() {
    // The value is dropped from the DOM, not only hidden: it is not to be shown again.
    freshValue.value = "";
    copyStatus.textContent = "";
    fresh.hidden = true;
  }

  async function copyFresh() {
    const key = freshValue.value;
    if (!key) return;
    if (await copyText(key)) {
      copyStatus.textContent = "Key copied to the clipboard.";
    } else {
      selectForCopy(freshValue, key);
      copyStatus.textContent =
        "Your browser did not let the page copy it: the key is selected, copy it with Ctrl+C (⌘C).";
    }
  }

  async function revoke(key, button) {
    const ok = globalThis.confirm(
      `Revoke the API key “${key.name}”? Programs using it stop working at once; this cannot be undone.`,
    );
    if (!ok) return;
    button.disabled = true;
    try {
      await api(`/api-keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
    } catch (err) {
      if (refused(err)) return;
      button.disabled = false;
      // 404: revoked meanwhile (another tab, the CLI); the reload below shows it gone.
      if (err.status !== 404) {
        listError.textContent = `Could not revoke the key: ${err.message}`;
        listError.hidden = false;
        return;
      }
    }
    announce(`Revoked the key ${key.name}.`);
    await load();
    // The button that had the focus is gone with its row.
    $("#keys-title").focus();
  }

  function clear() {
    generation += 1;
    hideFresh();
    form.reset();
    setFormError("");
    listError.hidden = true;
    list.replaceChildren();
    table.hidden = true;
    empty.hidden = false;
  }

  form.addEventListener("submit", create);
  nameInput.addEventListener("input", () => setFormError(""));
  for (const box of form.querySelectorAll("input[name=scopes]")) {
    box.addEventListener("change", () => setFormError(""));
  }
  $("#copy-key").addEventListener("click", copyFresh);
  $("#dismiss-key").addEventListener("click", () => {
    hideFresh();
    nameInput.focus();
  });
  $("#refresh-keys").addEventListener("click", load);

  return { load, clear };
}
