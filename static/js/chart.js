/**
 * The stock report's line chart: the closing price and its MA5, MA10 and MA20 over the
 * report's `series` (docs/protocol.md), as an SVG built with DOM calls — no library.
 *
 * The SVG is drawn at the width it is given on screen (a ResizeObserver redraws it when that
 * changes), so its labels keep their size on a phone instead of shrinking with a scaled
 * viewBox. Colours come from CSS custom properties (light and dark); the lines also differ
 * by dash pattern, so they tell apart without colour. A legend names them; the SVG has a
 * text alternative that sums the series up.
 *
 * @module chart
 */

import { h, svg } from "./dom.js";
import { num } from "./format.js";

/** The lines, in drawing order (the close last, on top). */
export const LINES = [
  { key: "ma20", label: "MA20" },
  { key: "ma10", label: "MA10" },
  { key: "ma5", label: "MA5" },
  { key: "close", label: "Close" },
];

/** Space for the axis labels, in CSS pixels. */
const MARGIN = { top: 10, right: 10, bottom: 26, left: 52 };
/** Drawn before the figure has a width (never on screen for long). */
const FALLBACK_WIDTH = 640;

/** A float without its binary noise: 0.9500000000000001 → 0.95. */
const clean = (v) => Number(v.toPrecision(12));

/** Decimals a tick step needs: 5 → 0, 2.5 → 1, 0.05 → 2. */
export const stepDigits = (step) => (String(clean(step)).split(".")[1] ?? "").length;

/**
 * "Nice" tick values within [lo, hi]: a step of 1, 2, 2.5 or 5 × 10^k, the one giving the
 * number of ticks nearest to `count` (fewer on a tie).
 *
 * @param {number} lo
 * @param {number} hi
 * @param {number} count
 * @returns {number[]}
 */
export function niceTicks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const power = 10 ** Math.floor(Math.log10((hi - lo) / Math.max(1, count)));
  const within = (s) => Math.floor(hi / s) - Math.ceil(lo / s) + 1;
  const steps = [1, 2, 2.5, 5, 10, 20].map((m) => clean(m * power));
  const step = steps.reduce((best, s) =>
    Math.abs(within(s) - count) < Math.abs(within(best) - count) ? s : best,
  );
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(clean(Math.round(v / step) * step));
  }
  return ticks;
}

/** @param {string} iso "2026-01-02" @param {boolean} withYear @returns {string} "2 Jan" */
function dayLabel(iso, withYear = false) {
  const d = new Date(`${iso}T00:00:00Z`);
  if (Number.isNaN(d.getTime())) return String(iso ?? "");
  const options = { day: "numeric", month: "short", timeZone: "UTC" };
  if (withYear) options.year = "numeric";
  return d.toLocaleDateString(undefined, options);
}

/** Whether the series has what the chart needs: dates and closes of the same length. */
export function hasSeries(series) {
  return (
    Array.isArray(series?.dates) &&
    Array.isArray(series?.close) &&
    series.close.length >= 2 &&
    series.dates.length === series.close.length
  );
}

/** @private The numbers of one line (null where it has none). */
function values(series, key) {
  const column = Array.isArray(series[key]) ? series[key] : [];
  return series.close.map((_, i) => (Number.isFinite(column[i]) ? column[i] : null));
}

/** @private The text alternative: first and last close, low and high, the last averages. */
function describe(series, code) {
  const closes = values(series, "close").filter((v) => v !== null);
  const n = series.close.length;
  const last = (key) => values(series, key).at(-1);
  const averages = ["ma5", "ma10", "ma20"]
    .filter((key) => last(key) !== null)
    .map((key) => `${key.toUpperCase()} ${num(last(key))}`);
  return (
    `Closing price${code ? ` of ${code}` : ""} over ${n} trading days, from ` +
    `${num(series.close[0])} on ${dayLabel(series.dates[0], true)} to ${num(series.close.at(-1))} ` +
    `on ${dayLabel(series.dates.at(-1), true)}; low ${num(Math.min(...closes))}, high ` +
    `${num(Math.max(...closes))}.` +
    (averages.length ? ` On the last day: ${averages.join(", ")}.` : "")
  );
}

/** @private An SVG path through the points, broken where a value is missing. */
function linePath(points) {
  let d = "";
  let open = false;
  for (const p of points) {
    if (p === null) {
      open = false;
      continue;
    }
    d += `${open ? "L" : "M"}${p[0].toFixed(1)} ${p[1].toFixed(1)}`;
    open = true;
  }
  return d;
}

/**
 * @private Draw the chart into `el` (the SVG) at `width` CSS pixels.
 * @param {SVGSVGElement} el
 * @param {object} series
 * @param {number} width
 */
function draw(el, series, width) {
  const height = Math.round(Math.min(300, Math.max(190, width * 0.45)));
  const inner = { w: width - MARGIN.left - MARGIN.right, h: height - MARGIN.top - MARGIN.bottom };
  const columns = Object.fromEntries(LINES.map(({ key }) => [key, values(series, key)]));
  const all = Object.values(columns).flat().filter((v) => v !== null);
  let lo = Math.min(...all);
  let hi = Math.max(...all);
  const pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.05 || 1;
  lo -= pad;
  hi += pad;
  const n = series.close.length;
  const x = (i) => MARGIN.left + (inner.w * i) / (n - 1);
  const y = (v) => MARGIN.top + inner.h * (1 - (v - lo) / (hi - lo));

  const ticks = niceTicks(lo, hi, inner.h < 170 ? 4 : 5).filter((v) => v >= lo && v <= hi);
  const digits = ticks.length > 1 ? stepDigits(ticks[1] - ticks[0]) : 2;
  const grid = ticks.map((v) =>
    svg(
      "g",
      { class: "chart-tick" },
      svg("line", { x1: MARGIN.left, x2: width - MARGIN.right, y1: y(v), y2: y(v) }),
      svg("text", { x: MARGIN.left - 6, y: y(v), dy: "0.32em", "text-anchor": "end" }, num(v, digits)),
    ),
  );
  // Three dates on a phone, five on a wider screen; the outer ones anchored inwards.
  const labels = width < 480 ? 3 : 5;
  const dates = [];
  for (let k = 0; k < labels; k++) {
    const i = Math.round(((n - 1) * k) / (labels - 1));
    const anchor = k === 0 ? "start" : k === labels - 1 ? "end" : "middle";
    dates.push(
      svg(
        "text",
        { class: "chart-date", x: x(i), y: height - 6, "text-anchor": anchor },
        dayLabel(series.dates[i]),
      ),
    );
  }
  const lines = LINES.map(({ key }) =>
    svg("path", {
      class: `chart-line chart-${key}`,
      "data-line": key,
      d: linePath(columns[key].map((v, i) => (v === null ? null : [x(i), y(v)]))),
    }),
  );
  const lastClose = columns.close.at(-1);
  el.setAttribute("viewBox", `0 0 ${width} ${height}`);
  el.setAttribute("width", String(width));
  el.setAttribute("height", String(height));
  el.replaceChildren(
    svg("g", { class: "chart-grid" }, grid),
    svg(
      "line",
      {
        class: "chart-axis",
        x1: MARGIN.left,
        x2: width - MARGIN.right,
        y1: MARGIN.top + inner.h,
        y2: MARGIN.top + inner.h,
      },
    ),
    svg("g", { class: "chart-dates" }, dates),
    svg("g", { class: "chart-lines" }, lines),
    lastClose === null ? null : svg("circle", { class: "chart-last", cx: x(n - 1), cy: y(lastClose), r: 3.5 }),
  );
}

/**
 * The chart of a report's series, with its legend: a `<figure>` that draws itself once it
 * is on screen and again when its width changes.
 *
 * @param {{dates: string[], close: number[], ma5?: (number|null)[], ma10?: (number|null)[], ma20?: (number|null)[]}} series
 * @param {string} [code] The stock code, for the text alternative.
 * @returns {HTMLElement}
 */
export function priceChart(series, code = "") {
  // aria-label, not a <title>: the same words, without a tooltip over the whole chart.
  const plot = svg("svg", {
    class: "chart-svg",
    role: "img",
    "aria-label": describe(series, code),
    focusable: "false",
  });
  const legend = h(
    "ul",
    { class: "chart-legend" },
    [...LINES].reverse().map(({ key, label }) =>
      h(
        "li",
        { "data-line": key },
        svg(
          "svg",
          { class: "chart-swatch", viewBox: "0 0 28 10", width: 28, height: 10, "aria-hidden": "true" },
          svg("line", { class: `chart-line chart-${key}`, x1: 1, x2: 27, y1: 5, y2: 5 }),
        ),
        h("span", {}, label),
      ),
    ),
  );
  const figure = h(
    "figure",
    { class: "chart", "data-days": series.close.length },
    h("figcaption", { class: "chart-caption" }, `Price and moving averages, last ${series.close.length} trading days`),
    legend,
    h("div", { class: "chart-plot" }, plot),
  );
  let drawn = 0;
  const redraw = (width) => {
    const w = Math.floor(width);
    if (w <= 0 || w === drawn) return;
    drawn = w;
    draw(plot, series, w);
  };
  draw(plot, series, FALLBACK_WIDTH);
  if (typeof ResizeObserver === "function") {
    const watcher = new ResizeObserver((entries) => {
      // Gone from the page (the report was redrawn): nothing more to watch.
      if (!figure.isConnected) return watcher.disconnect();
      redraw(entries.at(-1).contentRect.width);
    });
    watcher.observe(figure.querySelector(".chart-plot"));
  }
  return figure;
}
