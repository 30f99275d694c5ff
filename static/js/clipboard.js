/**
 * Copying to the clipboard, with the fallback the page shows when the browser refuses.
 *
 * `navigator.clipboard` exists only in a secure context (https, or http://127.0.0.1 and
 * localhost), and a browser may still refuse a write (no permission, the document not
 * focused). The callers then show the text selected in a read-only input instead.
 *
 * @module clipboard
 */

/**
 * Copy text that may still be on its way (a link the server is making).
 *
 * Safari only lets a page write to the clipboard from a write that starts within the click
 * itself, so when the text is a promise the write starts at once with a ClipboardItem
 * holding that promise; browsers without ClipboardItem get `writeText` once it arrives.
 *
 * @param {string | Promise<string>} text
 * @returns {Promise<boolean>} Whether the clipboard now holds the text.
 */
export async function copyText(text) {
  const clipboard = globalThis.navigator?.clipboard;
  if (!clipboard) {
    await text;
    return false;
  }
  if (typeof text !== "string" && typeof globalThis.ClipboardItem === "function" && clipboard.write) {
    const blob = Promise.resolve(text).then((t) => new Blob([t], { type: "text/plain" }));
    try {
      await clipboard.write([new ClipboardItem({ "text/plain": blob })]);
      return true;
    } catch {
      await text; // a failure of the text itself is the caller's to report
      // Refused as a ClipboardItem (or ClipboardItem promises unsupported): writeText below.
    }
  }
  const value = await text;
  if (!clipboard.writeText) return false;
  try {
    await clipboard.writeText(value);
    return true;
  } catch {
    return false;
  }
}

/**
 * Show `value` in a read-only input, focused and selected, so that Ctrl+C (⌘C) copies it.
 *
 * @param {HTMLInputElement} input
 * @param {string} value
 */
export function selectForCopy(input, value) {
  input.value = value;
  input.focus();
  input.select();
  input.setSelectionRange(0, value.length); // iOS selects nothing with select() alone
}
