/**
 * The current task panel: a small state built from the server's messages, and its rendering.
 *
 * `applyMessage` folds `event` and `snapshot` messages into a view (dropping any seq it
 * already has, whatever path it came by); `renderTask` draws the view. Pure DOM, no framework.
 *
 * @module task-view
 */

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** Human names for the built-in job's steps. */
const STEP_LABELS = {
  load_prices: "Load prices",
  moving_averages: "Moving averages",
  rsi: "RSI (14)",
  macd: "MACD",
  signal: "Signal",
};

const EVENT_LABELS = {
  created: "Queued",
  started: "Started",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

const STATUS_LABELS = {
  pending: "Pending",
  running: "Running",
  completed: "Completed",
  failed: "Failed",
  cancelled: "Cancelled",
};

/** @param {string | null | undefined} step */
export function stepLabel(step) {
  if (!step) return "";
  return STEP_LABELS[step] ?? step.replace(/[_-]+/g, " ").replace(/^./, (c) => c.toUpperCase());
}

/** @param {string} status */
export function statusLabel(status) {
  return STATUS_LABELS[status] ?? status;
}

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
    seq: 0, // the last seq folded in; a task snapshot's seq is not ours until applied
    log: [],
    gap: false, // true when the server could not replay some history (recovered: false)
    gapSeq: null, // the seq of the snapshot that stands for the missing events
  };
}

/**
 * Fold one server message into the view.
 *
 * @param {object} view From {@link emptyView} (changed in place).
 * @param {object} msg An `event` or `snapshot` message.
 * @returns {boolean} Whether the view changed.
 */
export function applyMessage(view, msg) {
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
    if (entry.event === "progress" && last?.event === "progress" && last.step === entry.step) {
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
      seq: t.seq,
    });
    return true;
  }
  return false;
}

// -- rendering ---------------------------------------------------------------------------

/**
 * `h("p", {class: "x"}, "text", child)`: a tiny element builder (text is never parsed as HTML).
 *
 * @param {string} tag
 * @param {Record<string, any>} [attrs]
 * @param {...(Node | string | number | null | false)} children
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    // Through the CSSOM, never a style="" attribute, which the page's CSP refuses.
    else if (name === "style") Object.assign(el.style, value);
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** @param {string | null} ts ISO time @returns {string} "14:03:07" in the user's locale */
export function clockTime(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "";
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

/** @param {string | null} ts ISO time @returns {string} "2 Dec 2026, 14:20" in the user's locale */
export function dateTime(ts) {
  if (!ts) return "";
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "";
  return d.toLocaleString([], { dateStyle: "medium", timeStyle: "short" });
}

/** Elapsed seconds between two ISO times, as "+1.2 s". */
function elapsed(from, to) {
  if (!from || !to) return "";
  const ms = new Date(to).getTime() - new Date(from).getTime();
  if (!Number.isFinite(ms) || ms < 0) return "";
  return `+${(ms / 1000).toFixed(1)} s`;
}

const num = (value, digits = 2) =>
  typeof value === "number" && Number.isFinite(value)
    ? value.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits })
    : "—";

const signed = (value, digits = 2) =>
  typeof value === "number" && Number.isFinite(value) ? `${value > 0 ? "+" : ""}${num(value, digits)}` : "—";

/** A title for a task: "600519 · Stock analysis". */
export function taskTitle(view) {
  const code = view.params?.code;
  const kind = view.kind === "stock_analysis" ? "Stock analysis" : view.kind || "Task";
  return code ? `${code} · ${kind}` : kind;
}

/**
 * Draw the view into the task panel.
 *
 * @param {Record<string, HTMLElement>} els The panel's elements (see app.js).
 * @param {object} view
 */
export function renderTask(els, view) {
  els.empty.hidden = true;
  els.body.hidden = false;
  els.title.textContent = taskTitle(view);
  els.status.textContent = statusLabel(view.status);
  els.status.dataset.status = view.status;
  els.card.dataset.status = view.status;

  const pct = Math.max(0, Math.min(100, Math.round(view.progress ?? 0)));
  els.bar.setAttribute("aria-valuenow", String(pct));
  els.bar.setAttribute(
    "aria-valuetext",
    `${pct}%${view.step ? `, ${stepLabel(view.step)}` : ""} (${statusLabel(view.status)})`,
  );
  els.bar.dataset.status = view.status;
  els.fill.style.width = `${pct}%`;
  els.percent.textContent = `${pct}%`;

  const terminal = TERMINAL.has(view.status);
  els.step.textContent = terminal
    ? statusLabel(view.status)
    : view.step
      ? stepLabel(view.step)
      : view.status === "pending"
        ? "Waiting to start…"
        : "Starting…";
  els.message.textContent = terminal ? "" : view.message ?? "";
  els.cancel.hidden = terminal;
  els.cancel.disabled = false;

  renderLog(els.log, view);
  renderOutcome(els.outcome, view);
}

/** @private The step log: one row per event, with its time. */
function renderLog(list, view) {
  const rows = view.log.map((entry) => {
    const label = entry.event === "progress" ? stepLabel(entry.step) || "Progress" : EVENT_LABELS[entry.event] ?? entry.event;
    return h(
      "li",
      {
        class: `log-entry log-${entry.event}`,
        "data-seqs": entry.seqs.join(" "),
        "data-event": entry.event,
        "data-step": entry.step,
      },
      h("time", { datetime: entry.ts, class: "log-time" }, clockTime(entry.ts)),
      h("span", { class: "log-elapsed" }, elapsed(view.createdAt, entry.ts)),
      h("span", { class: "log-label" }, label),
      entry.message ? h("span", { class: "log-message" }, entry.message) : null,
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

/** @private The end of a task: the report, or why it did not finish. */
function renderOutcome(box, view) {
  if (view.status === "completed") {
    box.replaceChildren(renderReport(view.result ?? {}));
  } else if (view.status === "failed") {
    box.replaceChildren(
      h(
        "div",
        { class: "outcome outcome-failed", role: "alert" },
        h("strong", {}, "The analysis failed."),
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
        view.error === "cancelled by user" ? "You stopped this analysis." : view.error ?? "",
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
