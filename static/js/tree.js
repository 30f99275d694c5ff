/**
 * A parent task's children in the task panel: what the page knows of them, folded from
 * GET /tasks/{id}/children and from the `child` field of the parent's own progress events
 * (docs/protocol.md), and their rendering — a list of small bars, and the ranked table of a
 * multi-code analysis.
 *
 * Watching the parent alone is enough: each of its progress events says which child moved
 * (`{id, seq, status, progress}`), so no child needs a subscription of its own. What the
 * list answer and the events say is merged by each child's own seq, the newest winning,
 * whichever came first.
 *
 * @module tree
 */

import { h } from "./dom.js";
import { childName, num, signed, statusLabel } from "./format.js";

/** The fields kept of each child (a child's full task, its report included, is not). */
function slim(task) {
  return {
    id: task.id,
    kind: task.kind ?? "",
    params: task.params ?? {},
    status: task.status ?? "pending",
    progress: typeof task.progress === "number" ? task.progress : 0,
    seq: Number.isInteger(task.seq) ? task.seq : 0,
  };
}

/** Whether the view is of a task that has (or had) children. */
export function isParent(view) {
  return (view.children?.length ?? 0) > 0 || (view.childCounts?.total ?? 0) > 0;
}

/**
 * Fold a page of GET /tasks/{id}/children into the view: new children are added in the
 * list's order (oldest first), known ones take the answer's state if it is newer.
 *
 * @param {object} view
 * @param {object[]} tasks
 * @returns {boolean} Whether the view changed.
 */
export function mergeChildren(view, tasks) {
  view.children ??= [];
  let changed = false;
  for (const task of tasks) {
    if (typeof task?.id !== "string") continue;
    const known = view.children.find((c) => c.id === task.id);
    if (!known) {
      view.children.push(slim(task));
      changed = true;
    } else if ((task.seq ?? 0) > known.seq) {
      const { id, kind, params, ...state } = slim(task);
      Object.assign(known, state, task.params ? { kind, params } : {});
      changed = true;
    } else if (!known.params?.code && task.params) {
      // Known only from an event so far: the list brings its name.
      Object.assign(known, { kind: task.kind ?? known.kind, params: task.params });
      changed = true;
    }
  }
  return changed;
}

/**
 * Fold an event's `child` field into the view.
 *
 * @param {object} view
 * @param {{id: string, seq: number, status: string, progress: number}} child
 * @returns {boolean} Whether the child was known before (if not, it has no name yet: the
 *   caller asks the server for the list again).
 */
export function moveChild(view, child) {
  view.children ??= [];
  const known = view.children.find((c) => c.id === child.id);
  if (!known) {
    view.children.push(slim(child));
    return false;
  }
  if (Number.isInteger(child.seq) && child.seq > known.seq) {
    Object.assign(known, { status: child.status, progress: child.progress, seq: child.seq });
  }
  return true;
}

/** How many children are in each status: from the list when it is there, else the task's. */
export function childCounts(view) {
  if (view.children?.length) {
    const counts = { total: view.children.length, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 };
    for (const child of view.children) counts[child.status] = (counts[child.status] ?? 0) + 1;
    return counts;
  }
  return view.childCounts ?? { total: 0, pending: 0, running: 0, completed: 0, failed: 0, cancelled: 0 };
}

/** "2 of 3 done · 1 running", "3 of 3 done · 1 failed". */
export function childSummary(view) {
  const c = childCounts(view);
  const done = c.completed + c.failed + c.cancelled;
  const parts = [`${done} of ${c.total} done`];
  if (c.running) parts.push(`${c.running} running`);
  if (c.pending) parts.push(`${c.pending} waiting`);
  if (c.failed) parts.push(`${c.failed} failed`);
  if (c.cancelled) parts.push(`${c.cancelled} cancelled`);
  return parts.join(" · ");
}

/** @private One child's row: a button (or, read-only, a plain row) with its small bar. */
function childRow(child, open) {
  const pct = Math.max(0, Math.min(100, Math.round(child.progress ?? 0)));
  const parts = [
    h("span", { class: "child-name" }, childName(child)),
    h("span", { class: "badge", "data-status": child.status }, statusLabel(child.status)),
    h(
      "span",
      { class: "child-bar", "data-status": child.status, "aria-hidden": "true" },
      h("span", { class: "child-fill", style: { width: `${pct}%` } }),
    ),
    h("span", { class: "child-pct" }, `${pct}%`),
  ];
  const attrs = { class: "child-item", "data-task-id": child.id, "data-status": child.status, "data-progress": pct };
  const item = open
    ? h("button", { ...attrs, type: "button", onclick: () => open(child) }, h("span", { class: "visually-hidden" }, "Open "), parts)
    : h("div", attrs, parts);
  return item;
}

/** @private Bring a row up to date in place (a button keeps its focus while events arrive). */
function updateRow(item, child) {
  const pct = Math.max(0, Math.min(100, Math.round(child.progress ?? 0)));
  // Known from an event first, a child gets its name when the list arrives.
  const name = item.querySelector(".child-name");
  if (name.textContent !== childName(child)) name.textContent = childName(child);
  if (item.dataset.status === child.status && item.dataset.progress === String(pct)) return;
  item.dataset.status = child.status;
  item.dataset.progress = String(pct);
  const badge = item.querySelector(".badge");
  badge.dataset.status = child.status;
  badge.textContent = statusLabel(child.status);
  item.querySelector(".child-bar").dataset.status = child.status;
  item.querySelector(".child-fill").style.width = `${pct}%`;
  item.querySelector(".child-pct").textContent = `${pct}%`;
}

/**
 * Draw the children of the view into `box` (its rows are updated in place, not rebuilt).
 *
 * @param {{box: HTMLElement, summary: HTMLElement, list: HTMLElement}} els
 * @param {object} view
 * @param {((child: object) => void) | null} open Opens a child in the panel; null: the rows
 *   are not buttons (a shared view cannot open another task).
 */
export function renderChildren(els, view, open) {
  const parent = isParent(view);
  els.box.hidden = !parent;
  if (!parent) {
    els.list.replaceChildren();
    return;
  }
  els.summary.textContent = childSummary(view);
  const children = view.children ?? [];
  const rows = new Map([...els.list.children].map((li) => [li.dataset.taskId, li]));
  const readOnly = !open;
  const wanted = children.map((child) => {
    let li = rows.get(child.id);
    if (li && (li.dataset.readOnly === "true") === readOnly) {
      updateRow(li.firstElementChild, child);
    } else {
      li = h("li", { "data-task-id": child.id, "data-read-only": readOnly ? "true" : "false" }, childRow(child, open));
    }
    return li;
  });
  // Only when the order or the set changed: moving a focused button would blur it.
  const same = wanted.length === els.list.children.length && wanted.every((li, i) => els.list.children[i] === li);
  if (!same) els.list.replaceChildren(...wanted);
  els.list.dataset.loaded = children.length ? "true" : "false";
}

/**
 * A multi-code analysis's report: its codes ranked by signal score (rank, code, signal,
 * score, last close, 20-day change), each row opening that code's own report; the codes
 * that did not complete are listed below.
 *
 * @param {object} result `{children, ranking, not_ranked}`
 * @param {object} view The parent's view (for the names of unranked children).
 * @param {((child: object) => void) | null} open
 * @returns {HTMLElement}
 */
export function renderRanking(result, view, open) {
  const ranking = Array.isArray(result.ranking) ? result.ranking : [];
  const byId = new Map((view.children ?? []).map((c) => [c.id, c]));
  const target = (taskId, code) =>
    byId.get(taskId) ?? { id: taskId, kind: "stock_analysis", params: { code }, status: "completed", progress: 100, seq: 0 };
  const rows = ranking.map((row) => {
    const signal = String(row.signal ?? "").toLowerCase();
    const change = row.change_20d_pct;
    const code = open
      ? h(
          "button",
          {
            type: "button",
            class: "link-button rank-open",
            onclick: () => open(target(row.task_id, row.code)),
          },
          String(row.code ?? ""),
          h("span", { class: "visually-hidden" }, ": open its report"),
        )
      : String(row.code ?? "");
    return h(
      "tr",
      {
        "data-task-id": row.task_id,
        "data-code": row.code,
        // The whole row opens the report for a pointer; the code's button for the keyboard.
        onclick: open ? (e) => e.target.closest("button") || open(target(row.task_id, row.code)) : null,
        class: open ? "rank-row clickable" : "rank-row",
      },
      h("td", { class: "rank" }, String(row.rank ?? "")),
      h("th", { scope: "row", class: "rank-code" }, code),
      h("td", {}, h("span", { class: `rank-signal signal-word-${signal}` }, signal.toUpperCase())),
      // data-label: a phone shows each row as a block, its figures led by their names.
      h("td", { class: "num rank-score", "data-label": "Score" }, signed(row.score, 0)),
      h("td", { class: "num rank-close", "data-label": "Last close" }, num(row.last_close)),
      h(
        "td",
        { class: `num rank-change ${change > 0 ? "up" : change < 0 ? "down" : ""}`, "data-label": "20-day change" },
        `${signed(change)}%`,
      ),
    );
  });
  const missing = Array.isArray(result.not_ranked) ? result.not_ranked : [];
  return h(
    "div",
    { class: "report", id: "task-result", "data-kind": "ranking" },
    h("h3", {}, "Ranking"),
    ranking.length
      ? h(
          "div",
          { class: "table-scroll" },
          h(
            "table",
            { class: "ranking" },
            h("caption", {}, "Best signal first; choose a code to see its report"),
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", { scope: "col" }, h("abbr", { title: "Rank" }, "#")),
                h("th", { scope: "col" }, "Code"),
                h("th", { scope: "col" }, "Signal"),
                h("th", { scope: "col", class: "num" }, "Score"),
                h("th", { scope: "col", class: "num" }, "Last close"),
                h("th", { scope: "col", class: "num" }, "20-day change"),
              ),
            ),
            h("tbody", {}, rows),
          ),
        )
      : h("p", { class: "empty" }, "No code completed its analysis."),
    missing.length
      ? h(
          "p",
          { class: "not-ranked" },
          "Not ranked: ",
          missing
            .map((m) => `${childName(byId.get(m.task_id) ?? { id: m.task_id })} (${statusLabel(m.status).toLowerCase()})`)
            .join(", "),
          ".",
        )
      : null,
    h("p", { class: "note" }, "Each code's report says where its prices come from. Not investment advice."),
  );
}
