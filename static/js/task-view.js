/**
 * The current task panel: a small state built from the server's messages, and its rendering.
 *
 * `applyMessage` folds `event` and `snapshot` messages into a view (dropping any seq it
 * already has, whatever path it came by); `renderTask` draws the view: the bar, the rate and
 * time left, a parent's children (tree.js), the step log and the outcome (a report with its
 * price chart, chart.js, or a multi-code ranking). Pure DOM, no framework.
 *
 * @module task-view
 */

import { hasSeries, priceChart } from "./chart.js";
import { h } from "./dom.js";
import {
  BATCH_KIND,
  TERMINAL,
  childName,
  clockTime,
  elapsed,
  etaText,
  num,
  rateText,
  signed,
  statusLabel,
  stepLabel,
  taskTitle,
} from "./format.js";
import { childSummary, isParent, moveChild, renderChildren, renderRanking } from "./tree.js";

export { h } from "./dom.js";
export { BATCH_KIND, TERMINAL, clockTime, dateTime, statusLabel, stepLabel, taskTitle } from "./format.js";

const EVENT_LABELS = {
  created: "Queued",
  started: "Started",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

/**
 * A new, empty view of a task.
 *
 * @param {string} taskId
 * @param {object} [task] A task object (from the list) to start from, if known.
 */
export function emptyView(taskId, task = null) {
  return {
    id: taskId,
    kind: task?.kind ?? "",
    params: task?.params ?? {},
    status: task?.status ?? "pending",
    progress: task?.progress ?? 0,
    step: task?.step ?? null,
    message: task?.message ?? null,
    result: task?.result ?? null,
    error: task?.error ?? null,
    createdAt: task?.created_at ?? null,
    parentId: task?.parent_id ?? null,
    // Percent per second and seconds left as of `etaAt` (ms, when the page learnt them);
    // null while the server does not know them yet.
    rate: task?.rate ?? null,
    etaS: task?.eta_s ?? null,
    etaAt: Date.now(),
    // A parent's children: counts from the task, the list itself from tree.js.
    childCounts: task?.children ?? null,
    children: [],
    childrenStale: false, // an event named a child the list lacks, or a gap: load it again
    seq: 0, // the last seq folded in; a task snapshot's seq is not ours until applied
    log: [],
    gap: false, // true when the server could not replay some history (recovered: false)
    gapSeq: null, // the seq of the snapshot that stands for the missing events
  };
}

/**
 * A view kept in storage, with the fields an older page did not keep filled in.
 *
 * @param {object} stored
 */
export function restoredView(stored) {
  return { ...emptyView(stored.id), ...stored };
}

/** @private A row of a parent's log: one child, as long as its status stays the same. */
function logChild(view, msg) {
  const child = msg.child;
  let row = null;
  for (let i = view.log.length - 1; i >= 0; i--) {
    if (view.log[i].child?.id === child.id) {
      row = view.log[i];
      break;
    }
  }
  if (row && row.child.status === child.status) {
    // Progress alone: that child's row follows it rather than a row per step.
    row.seqs.push(msg.seq);
    Object.assign(row, { ts: msg.ts, progress: msg.progress });
    row.child.progress = child.progress;
    return;
  }
  view.log.push({
    seqs: [msg.seq],
    ts: msg.ts,
    event: "progress",
    step: null,
    message: "",
    progress: msg.progress,
    child: { id: child.id, status: child.status, progress: child.progress },
  });
}

/**
 * Fold one server message into the view.
 *
 * @param {object} view From {@link emptyView} (changed in place).
 * @param {object} msg An `event` or `snapshot` message.
 * @param {number} [now] Clock ms (the time left counts down from it).
 * @returns {boolean} Whether the view changed.
 */
export function applyMessage(view, msg, now = Date.now()) {
  if (msg.type === "event") {
    if (!Number.isInteger(msg.seq) || msg.seq <= view.seq) return false; // already shown
    view.seq = msg.seq;
    view.status = msg.status ?? view.status;
    if (typeof msg.progress === "number") view.progress = msg.progress;
    if (msg.step !== undefined) view.step = msg.step;
    view.message = msg.message ?? null;
    if (msg.result !== undefined) view.result = msg.result;
    if (msg.error !== undefined) view.error = msg.error;
    if (msg.event === "created" && msg.ts) view.createdAt = msg.ts;
    if (msg.event === "progress") {
      // Every progress event carries the latest of both (null while unknown).
      view.rate = typeof msg.rate === "number" ? msg.rate : null;
      view.etaS = typeof msg.eta_s === "number" ? msg.eta_s : null;
      view.etaAt = now;
    } else if (TERMINAL.has(view.status)) {
      view.rate = null;
      view.etaS = null;
    }
    if (msg.child && typeof msg.child.id === "string") {
      if (!moveChild(view, msg.child)) view.childrenStale = true;
      logChild(view, msg);
      return true;
    }
    const entry = {
      seqs: [msg.seq],
      ts: msg.ts,
      event: msg.event,
      step: msg.event === "progress" ? msg.step ?? null : null,
      message: msg.event === "progress" ? msg.message ?? "" : msg.error ?? "",
      progress: msg.progress,
    };
    // One row per step: further updates of the same step (e.g. "starting" at 0%, then
    // done at 20%) update its row instead of listing the step again.
    const last = view.log.at(-1);
    if (entry.event === "progress" && last?.event === "progress" && !last.child && last.step === entry.step) {
      last.seqs.push(msg.seq);
      Object.assign(last, { ts: entry.ts, message: entry.message || last.message, progress: entry.progress });
    } else {
      view.log.push(entry);
    }
    return true;
  }
  if (msg.type === "snapshot" && msg.task) {
    const t = msg.task;
    const replace = msg.recovered === false;
    if (!replace && t.seq <= view.seq) return false;
    // A snapshot stands for events the log does not have: say so rather than pretend.
    if (replace) view.log = view.log.filter((e) => e.seqs.at(-1) <= t.seq);
    view.gap = true;
    view.gapSeq = t.seq;
    Object.assign(view, {
      kind: t.kind,
      params: t.params ?? {},
      status: t.status,
      progress: t.progress,
      step: t.step,
      message: t.message,
      result: t.result,
      error: t.error,
      createdAt: t.created_at,
      parentId: t.parent_id ?? view.parentId,
      rate: t.rate ?? null,
      etaS: t.eta_s ?? null,
      etaAt: now,
      childCounts: t.children ?? view.childCounts,
      seq: t.seq,
    });
    // The children moved in the events the snapshot stands for: ask for them again.
    if (isParent(view)) view.childrenStale = true;
    return true;
  }
  return false;
}

// -- rendering ---------------------------------------------------------------------------

/**
 * The line under the bar: "about 2 min left · 1.8 %/s", counting down from when the page
 * learnt the time left; "" while neither is known, once finished, or while `paused`.
 *
 * @param {object} view
 * @param {{paused?: boolean, now?: number}} [options]
 * @returns {string}
 */
export function etaLine(view, { paused = false, now = Date.now() } = {}) {
  if (paused || TERMINAL.has(view.status)) return "";
  const parts = [];
  if (typeof view.etaS === "number") {
    const left = view.etaS - Math.max(0, now - (view.etaAt ?? now)) / 1000;
    parts.push(etaText(Math.max(0, left)));
  }
  if (typeof view.rate === "number") parts.push(view.rate > 0 ? rateText(view.rate) : "no progress lately");
  return parts.join(" · ");
}

/**
 * Draw the time-left line alone (the page calls it every second while it counts down).
 *
 * @param {{eta: HTMLElement}} els
 * @param {object} view
 * @param {{paused?: boolean, now?: number}} [options]
 * @returns {boolean} Whether the line is shown.
 */
export function renderEta(els, view, options = {}) {
  const text = etaLine(view, options);
  if (els.eta.textContent !== text) els.eta.textContent = text;
  els.eta.hidden = !text;
  return Boolean(text);
}

/**
 * Draw the view into the task panel.
 *
 * @param {Record<string, HTMLElement>} els The panel's elements (see app.js).
 * @param {object} view
 * @param {object} [options]
 * @param {((child: object) => void) | null} [options.openChild] Opens a child of this task
 *   in the panel; null: children are listed, not opened (a shared view).
 * @param {boolean} [options.canOpenParent] Whether "Back to …" may open the parent.
 * @param {number | null} [options.pausedSince] Clock ms since when live updates are off
 *   (the socket is down); null: live.
 * @param {string} [options.pausedText] What the paused notice says after "since …".
 */
export function renderTask(els, view, options = {}) {
  const { openChild = null, canOpenParent = false, pausedSince = null, pausedText = "" } = options;
  els.empty.hidden = true;
  els.body.hidden = false;
  els.title.textContent = taskTitle(view);
  els.status.textContent = statusLabel(view.status);
  els.status.dataset.status = view.status;
  els.card.dataset.status = view.status;

  const terminal = TERMINAL.has(view.status);
  const parent = isParent(view);
  const paused = pausedSince !== null && !terminal;
  const pct = Math.max(0, Math.min(100, Math.round(view.progress ?? 0)));
  const eta = etaLine(view, { paused });
  els.bar.setAttribute("aria-valuenow", String(pct));
  els.bar.setAttribute(
    "aria-valuetext",
    `${pct}%${view.step ? `, ${stepLabel(view.step)}` : ""}${parent ? `, ${childSummary(view)}` : ""}` +
      ` (${statusLabel(view.status)})${eta ? `, ${eta}` : ""}`,
  );
  els.bar.dataset.status = view.status;
  els.fill.style.width = `${pct}%`;
  els.percent.textContent = `${pct}%`;

  els.step.textContent = terminal
    ? statusLabel(view.status)
    : parent
      ? childSummary(view)
      : view.step
        ? stepLabel(view.step)
        : view.status === "pending"
          ? "Waiting to start…"
          : "Starting…";
  els.message.textContent = terminal ? "" : view.message ?? "";
  els.cancel.hidden = terminal;
  els.cancel.disabled = false;
  els.parent.hidden = !(view.parentId && canOpenParent);
  // A stock analysis with a parent is one code of a multi-stock analysis.
  const back = view.kind === "stock_analysis" ? "← Back to the whole analysis" : "← Back to the parent task";
  if (els.openParent.textContent !== back) els.openParent.textContent = back;
  const childrenTitle = view.kind === BATCH_KIND ? "Analyses" : "Child tasks";
  if (els.childrenTitle.textContent !== childrenTitle) els.childrenTitle.textContent = childrenTitle;

  // Live updates are off: say so, and since when; the bar stops pretending to move. The
  // text is set only when it changes: it is a live region, read out at each change.
  const notice = paused ? `Live updates paused since ${clockTime(pausedSince)}: ${pausedText}` : "";
  if (els.paused.textContent !== notice) els.paused.textContent = notice;
  els.paused.hidden = !paused;
  if (paused) els.card.dataset.paused = "true";
  else delete els.card.dataset.paused;
  renderEta(els, view, { paused });

  renderChildren({ box: els.children, summary: els.childrenSummary, list: els.childList }, view, openChild);
  renderLog(els.log, view);
  renderOutcome(els.outcome, view, openChild);
}

/** @private What a parent's log row says of its child: "running · 55%", "completed". */
function childWords(child) {
  const status = statusLabel(child.status).toLowerCase();
  return child.status === "running" ? `${status} · ${Math.round(child.progress ?? 0)}%` : status;
}

/** @private The step log: one row per event, with its time. */
function renderLog(list, view) {
  const names = new Map((view.children ?? []).map((c) => [c.id, c]));
  const rows = view.log.map((entry) => {
    const label = entry.child
      ? childName(names.get(entry.child.id) ?? { id: entry.child.id })
      : entry.event === "progress"
        ? stepLabel(entry.step) || "Progress"
        : EVENT_LABELS[entry.event] ?? entry.event;
    const message = entry.child ? childWords(entry.child) : entry.message;
    return h(
      "li",
      {
        class: `log-entry log-${entry.event}${entry.child ? ` log-child log-child-${entry.child.status}` : ""}`,
        "data-seqs": entry.seqs.join(" "),
        "data-event": entry.event,
        "data-step": entry.step,
        "data-child": entry.child?.id,
      },
      h("time", { datetime: entry.ts, class: "log-time" }, clockTime(entry.ts)),
      h("span", { class: "log-elapsed" }, elapsed(view.createdAt, entry.ts)),
      h("span", { class: "log-label" }, label),
      message ? h("span", { class: "log-message" }, message) : null,
    );
  });
  if (view.gap) {
    // The missing events come after the rows kept from before the snapshot and before
    // those that arrived after it.
    const at = Number.isInteger(view.gapSeq)
      ? view.log.findIndex((entry) => entry.seqs[0] > view.gapSeq)
      : 0;
    const where = at === -1 ? rows.length : at;
    const text = where === 0 ? "Earlier steps are not shown." : "Some steps are not shown.";
    rows.splice(where, 0, h("li", { class: "log-entry log-gap" }, text));
  }
  list.replaceChildren(...rows);
}

/**
 * @private The end of a task: the report, or why it did not finish. Drawn again only when
 * what it shows changed, so a chart is not rebuilt and a focused button not lost at every
 * render.
 */
function renderOutcome(box, view, openChild) {
  const key = [view.id, view.status, view.seq, view.children?.length ?? 0, openChild ? 1 : 0].join("|");
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  const what = view.kind === BATCH_KIND ? "multi-stock analysis" : "analysis";
  if (view.status === "completed") {
    const result = view.result ?? {};
    box.replaceChildren(Array.isArray(result.ranking) ? renderRanking(result, view, openChild) : renderReport(result));
  } else if (view.status === "failed") {
    box.replaceChildren(
      h(
        "div",
        { class: "outcome outcome-failed", role: "alert" },
        h("strong", {}, `The ${what} failed.`),
        " ",
        view.error ?? "",
      ),
    );
  } else if (view.status === "cancelled") {
    box.replaceChildren(
      h(
        "div",
        { class: "outcome outcome-cancelled" },
        h("strong", {}, "Cancelled."),
        " ",
        view.error === "cancelled by user" ? `You stopped this ${what}.` : view.error ?? "",
      ),
    );
  } else {
    box.replaceChildren();
  }
}

/**
 * The stock-analysis report (or, for another kind of task, its result as JSON).
 *
 * @param {object} result
 * @returns {HTMLElement}
 */
export function renderReport(result) {
  if (!result.indicators) {
    return h(
      "div",
      { class: "report", id: "task-result" },
      h("h3", {}, "Result"),
      h("pre", { class: "result-json" }, JSON.stringify(result, null, 2)),
    );
  }
  const ind = result.indicators;
  const signal = String(result.signal ?? "hold").toLowerCase();
  const rsi = ind.rsi14;
  const rsiHint = typeof rsi !== "number" ? "" : rsi >= 70 ? "overbought" : rsi <= 30 ? "oversold" : "neutral";
  const changeClass = result.change_20d_pct > 0 ? "up" : result.change_20d_pct < 0 ? "down" : "";
  const row = (name, value, hint = "") =>
    h("tr", {}, h("th", { scope: "row" }, name), h("td", {}, value), h("td", { class: "hint" }, hint));
  return h(
    "div",
    { class: "report", id: "task-result", "data-signal": signal },
    h(
      "div",
      { class: `signal signal-${signal}` },
      h("span", { class: "signal-caption" }, "Signal"),
      h("strong", { class: "signal-value" }, signal.toUpperCase()),
      h("span", { class: "signal-score" }, `score ${signed(result.score, 0)}`),
    ),
    h(
      "dl",
      { class: "facts" },
      h("div", {}, h("dt", {}, "Last close"), h("dd", {}, num(result.last_close))),
      h(
        "div",
        {},
        h("dt", {}, "20-day change"),
        h("dd", { class: changeClass }, `${signed(result.change_20d_pct)}%`),
      ),
      h("div", {}, h("dt", {}, "As of"), h("dd", {}, result.as_of ?? "—")),
      h("div", {}, h("dt", {}, "Data"), h("dd", {}, result.data_source ?? "—")),
    ),
    hasSeries(result.series) ? priceChart(result.series, result.code ?? "") : null,
    h(
      "table",
      { class: "indicators" },
      h("caption", {}, "Indicators"),
      h(
        "tbody",
        {},
        row("MA5", num(ind.ma?.ma5)),
        row("MA10", num(ind.ma?.ma10)),
        row("MA20", num(ind.ma?.ma20)),
        row("RSI (14)", num(rsi), rsiHint),
        row("MACD", num(ind.macd?.macd, 4)),
        row("MACD signal", num(ind.macd?.signal, 4)),
        row("Histogram", signed(ind.macd?.histogram, 4), ind.macd?.histogram > 0 ? "bullish" : "bearish"),
      ),
    ),
    result.reasons?.length
      ? h(
          "div",
          { class: "reasons" },
          h("h3", {}, "Why"),
          h("ul", {}, result.reasons.map((r) => h("li", {}, r))),
        )
      : null,
    result.note ? h("p", { class: "note" }, result.note) : null,
  );
}
