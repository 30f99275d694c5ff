"""Checks that a page is readable: text contrast (WCAG 2) and nothing wider than the screen."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: WCAG 2 AA for normal text.
MIN_CONTRAST = 4.5

#: For each selector, the contrast ratio of every visible match: its text colour against
#: the background it is drawn on (its own and its ancestors', blended by their alpha).
CONTRASTS_JS = """
(selectors) => {
  const parse = (text) => {
    let m = text.match(/^rgba?\\(([^)]+)\\)$/);
    if (m) {
      const p = m[1].split(/[\\s,/]+/).filter(Boolean).map(Number);
      return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
    }
    m = text.match(/^color\\(srgb ([^)]+)\\)$/);
    if (m) {
      const p = m[1].split(/[\\s/]+/).filter(Boolean).map(Number);
      return [p[0] * 255, p[1] * 255, p[2] * 255, p.length > 3 ? p[3] : 1];
    }
    throw new Error(`cannot read the colour ${text}`);
  };
  const over = (top, bottom) =>
    [0, 1, 2].map((i) => top[i] * top[3] + bottom[i] * (1 - top[3])).concat(1);
  const backdrop = (el) => {
    const layers = [];
    for (let node = el; node; node = node.parentElement) {
      const colour = parse(getComputedStyle(node).backgroundColor);
      if (colour[3] > 0) layers.push(colour);
      if (colour[3] >= 1) break;
    }
    let colour = [255, 255, 255, 1];
    for (const layer of layers.reverse()) colour = over(layer, colour);
    return colour;
  };
  const luminance = ([r, g, b]) => {
    const f = (v) => ((v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const out = [];
  for (const selector of selectors) {
    const found = [...document.querySelectorAll(selector)].filter(
      (el) => el.getClientRects().length > 0 &&
        (el instanceof HTMLInputElement ? el.value : el.textContent).trim() !== "");
    if (found.length === 0) out.push({ selector, ratio: null });
    for (const el of found) {
      const bg = backdrop(el);
      const fg = over(parse(getComputedStyle(el).color), bg);
      const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
      out.push({ selector, ratio: Math.round(((hi + 0.05) / (lo + 0.05)) * 100) / 100 });
    }
  }
  return out;
}
"""


def unreadable(page: Page, selectors: list[str], wait_s: float = 5.0) -> list[str]:
    """The selectors with a visible match below MIN_CONTRAST, or with no visible text at all.

    A selector with nothing shown yet is looked at again for up to `wait_s` seconds: a page
    draws some parts (a replayed step log) a moment after others.
    """
    deadline = time.monotonic() + wait_s
    while True:
        found = page.evaluate(CONTRASTS_JS, selectors)
        if all(item["ratio"] is not None for item in found) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(100)
    return [
        f"{item['selector']}: {'not shown' if item['ratio'] is None else item['ratio']}"
        for item in found
        if item["ratio"] is None or item["ratio"] < MIN_CONTRAST
    ]


def overflow_px(page: Page) -> int:
    """How far the page is wider than the viewport (0 or less: it fits)."""
    return int(page.evaluate("() => document.documentElement.scrollWidth - innerWidth"))


#: WCAG 2.1 (1.4.11) for graphical objects such as a chart's lines.
MIN_GRAPHIC_CONTRAST = 3.0

#: For each visible SVG shape matching the selector: its stroke colour's contrast against the
#: background it is drawn on (the nearest ancestor with one), and its `data-line`.
STROKES_JS = CONTRASTS_JS.replace(
    "const out = [];\n  for (const selector of selectors) {",
    """const out = [];
  for (const selector of selectors.strokes ?? []) {
    for (const el of document.querySelectorAll(selector)) {
      if (el.getClientRects().length === 0) continue;
      const host = el.ownerSVGElement ?? el;
      const bg = backdrop(host.parentElement);
      const fg = over(parse(getComputedStyle(el).stroke), bg);
      const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
      out.push({ selector: `${selector}[${el.dataset.line ?? ""}]`,
                 ratio: Math.round(((hi + 0.05) / (lo + 0.05)) * 100) / 100 });
    }
  }
  for (const selector of selectors.texts ?? []) {""",
)

assert STROKES_JS != CONTRASTS_JS, "CONTRASTS_JS changed: STROKES_JS no longer extends it"


def faint_lines(page: Page, selector: str) -> list[str]:
    """The shapes matching `selector` whose stroke is below MIN_GRAPHIC_CONTRAST against
    their background, or ["<selector>: not shown"] when none is visible."""
    found = page.evaluate(STROKES_JS, {"strokes": [selector]})
    if not found:
        return [f"{selector}: not shown"]
    return [
        f"{item['selector']}: {item['ratio']}"
        for item in found
        if item["ratio"] < MIN_GRAPHIC_CONTRAST
    ]
