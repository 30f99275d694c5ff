/**
 * Words and numbers for the page: status and step names, task titles, times, figures, and
 * the rate and time left ("about 2 min left · 1.8 %/s"). Pure functions.
 *
 * @module format
 */

export const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** The built-in multi-code analysis: a parent with a `stock_analysis` child per code. */
export const BATCH_KIND = "stock_analysis_batch";

/** Human names for the built-in job's steps. */
const STEP_LABELS = {
  load_prices: "Load prices",
  moving_averages: "Moving averages",
  rsi: "RSI (14)",
  macd: "MACD",
  signal: "Signal",
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

/** "600519, AAPL, MSFT" for up to three codes, "600519, AAPL, MSFT +2" beyond. */
export function codeList(codes) {
  const list = Array.isArray(codes) ? codes.map(String) : [];
  return list.length <= 3 ? list.join(", ") : `${list.slice(0, 3).join(", ")} +${list.length - 3}`;
}

/** A title for a task: "600519 · Stock analysis", "600519, AAPL · Multi-stock analysis". */
export function taskTitle(view) {
  if (view.kind === BATCH_KIND) {
    const codes = codeList(view.params?.codes);
    return codes ? `${codes} · Multi-stock analysis` : "Multi-stock analysis";
  }
  const code = view.params?.code;
  const kind = view.kind === "stock_analysis" ? "Stock analysis" : view.kind || "Task";
  return code ? `${code} · ${kind}` : kind;
}

/** A child's short name in its parent's list: its code, else its kind and id's start. */
export function childName(child) {
  const code = child?.params?.code;
  if (code) return String(code);
  return `${child?.kind || "Task"} ${String(child?.id ?? "").slice(0, 6)}`.trim();
}

/** @param {string | number | null} ts ISO time or epoch ms @returns {string} "14:03:07" */
export function clockTime(ts) {
  if (ts === null || ts === undefined || ts === "") return "";
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
export function elapsed(from, to) {
  if (!from || !to) return "";
  const ms = new Date(to).getTime() - new Date(from).getTime();
  if (!Number.isFinite(ms) || ms < 0) return "";
  return `+${(ms / 1000).toFixed(1)} s`;
}

/** A number with `digits` decimals in the user's locale, "—" when there is none. */
export const num = (value, digits = 2) =>
  typeof value === "number" && Number.isFinite(value)
    ? value.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits })
    : "—";

/** As `num`, with a "+" before positive values. */
export const signed = (value, digits = 2) =>
  typeof value === "number" && Number.isFinite(value) ? `${value > 0 ? "+" : ""}${num(value, digits)}` : "—";

/**
 * Time left in human units: "about 12 s left", "about 2 min left", "about 1.5 h left",
 * "about 3 days left"; "almost done" under a second.
 *
 * @param {number} seconds
 * @returns {string}
 */
export function etaText(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "";
  if (seconds < 1) return "almost done";
  if (seconds < 59.5) return `about ${Math.round(seconds)} s left`;
  const minutes = seconds / 60;
  if (minutes < 59.5) return `about ${Math.round(minutes)} min left`;
  const hours = minutes / 60;
  if (hours < 9.95) {
    const tenths = Math.round(hours * 10) / 10; // "1.5 h", and "2 h" rather than "2.0 h"
    return `about ${tenths.toLocaleString(undefined, { maximumFractionDigits: 1 })} h left`;
  }
  if (hours < 47.5) return `about ${Math.round(hours)} h left`;
  return `about ${Math.round(hours / 24)} days left`;
}

/**
 * A rate in percent per second, "1.8 %/s": no decimal from 10 up, one from 0.1, else two
 * significant digits (a slow task's 0.012 %/s is not "0.0").
 *
 * @param {number} rate
 * @returns {string}
 */
export function rateText(rate) {
  if (!Number.isFinite(rate) || rate < 0) return "";
  const digits =
    rate >= 10
      ? { maximumFractionDigits: 0 }
      : rate >= 0.1 || rate === 0
        ? { minimumFractionDigits: 1, maximumFractionDigits: 1 }
        : { maximumSignificantDigits: 2 };
  return `${rate.toLocaleString(undefined, digits)} %/s`;
}
