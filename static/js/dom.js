/**
 * Tiny element builders for the page: HTML (`h`) and SVG (`svg`). Text is never parsed as
 * markup, and style goes through the CSSOM, never a style="" attribute, which the page's
 * Content-Security-Policy refuses.
 *
 * @module dom
 */

const SVG_NS = "http://www.w3.org/2000/svg";

/** @private Set attributes, listeners and children on a new element. */
function fill(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.setAttribute("class", value);
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

/**
 * `h("p", {class: "x"}, "text", child)`: an HTML element.
 *
 * @param {string} tag
 * @param {Record<string, any>} [attrs] `class`, `style` (an object), `on<event>` (a
 *   listener) or any attribute; null, undefined and false leave it out, true sets it empty.
 * @param {...(Node | string | number | null | false | Array<any>)} children
 * @returns {HTMLElement}
 */
export function h(tag, attrs = {}, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/**
 * `svg("path", {d: "M0 0L1 1", class: "line"})`: an SVG element, attributes as for `h`.
 *
 * @param {string} tag
 * @param {Record<string, any>} [attrs]
 * @param {...(Node | string | number | null | false | Array<any>)} children
 * @returns {SVGElement}
 */
export function svg(tag, attrs = {}, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}
