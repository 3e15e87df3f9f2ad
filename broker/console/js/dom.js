// dom.js: small helpers to build the page safely. Every value reaches the
// DOM as a text node or an attribute set through the DOM API, never through
// innerHTML, so broker data cannot inject markup.

/**
 * Creates an element. `attrs`: `class`, `text`, `testid` (data-testid),
 * `on` ({event: handler}), `dataset`, boolean properties (`disabled`,
 * `checked`, `hidden`, `selected`, `required`), anything else becomes an
 * attribute. Children: nodes, strings (as text), null/false (skipped),
 * arrays of these.
 */
export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) {
      continue;
    }
    if (name === "class") {
      element.className = value;
    } else if (name === "text") {
      element.textContent = String(value);
    } else if (name === "testid") {
      element.dataset.testid = value;
    } else if (name === "on") {
      for (const [event, handler] of Object.entries(value)) {
        element.addEventListener(event, handler);
      }
    } else if (name === "dataset") {
      Object.assign(element.dataset, value);
    } else if (["disabled", "checked", "hidden", "selected", "required", "multiple"].includes(name)) {
      element[name] = Boolean(value);
    } else if (name === "value") {
      element.value = String(value);
    } else {
      element.setAttribute(name, String(value));
    }
  }
  append(element, children);
  return element;
}

function append(parent, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    if (Array.isArray(child)) {
      append(parent, child);
    } else if (child instanceof Node) {
      parent.appendChild(child);
    } else {
      parent.appendChild(document.createTextNode(String(child)));
    }
  }
}

/** Replaces an element's children. */
export function fill(element, ...children) {
  element.replaceChildren();
  append(element, children);
  return element;
}

/** A visible error box holding the error's message (ApiError or other). */
export function errorBox(error, testid = "error") {
  const message = error && error.message ? error.message : String(error);
  return h("div", { class: "error", role: "alert", testid, text: message });
}

/** Shows `error` inside `slot` (replacing what was there). */
export function showError(slot, error) {
  fill(slot, errorBox(error, slot.id ? `${slot.id}-error` : "error"));
}

/** A status badge; the value doubles as its CSS class. */
export function badge(value, testid) {
  const text = String(value);
  return h("span", { class: `badge ${text.replace(/[^a-z_]/g, "")}`, text, testid });
}

const pad = (n, width = 2) => String(n).padStart(width, "0");

/** Local date and time with milliseconds: 2025-11-27 14:03:05.123. */
export function formatTime(ms) {
  if (ms === null || ms === undefined) {
    return "—";
  }
  const d = new Date(ms);
  if (Number.isNaN(d.getTime())) {
    return String(ms);
  }
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
    + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

/** A duration in ms as text: 850 ms, 12.3 s, 4.0 min, 2.5 h, 3.1 d. */
export function formatDuration(ms) {
  if (ms === null || ms === undefined) {
    return "—";
  }
  const abs = Math.abs(ms);
  if (abs < 1000) return `${ms} ms`;
  if (abs < 60_000) return `${(ms / 1000).toFixed(1)} s`;
  if (abs < 3_600_000) return `${(ms / 60_000).toFixed(1)} min`;
  if (abs < 86_400_000) return `${(ms / 3_600_000).toFixed(1)} h`;
  return `${(ms / 86_400_000).toFixed(1)} d`;
}

/** A byte count as text. */
export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

/** A value for a table cell: null shows as a dash. */
export function show(value) {
  return value === null || value === undefined || value === "" ? "—" : String(value);
}

/**
 * A table with a header row. A header is a text or [text, class] (the class
 * also goes to that column's cells); `rows` are <tr> nodes or arrays of
 * cells (nodes or text).
 */
export function table(id, headers, rows, emptyText = "Nothing here.") {
  const columns = headers.map((header) => (Array.isArray(header) ? header : [header, null]));
  const head = h("tr", {}, columns.map(([text, cls]) => h("th", { class: cls, text })));
  const body = h("tbody");
  for (const row of rows) {
    body.appendChild(row instanceof Node
      ? row
      : h("tr", {}, row.map((cell, index) => h("td", { class: columns[index] ? columns[index][1] : null }, cell))));
  }
  if (rows.length === 0) {
    body.appendChild(h("tr", {}, h("td", { colspan: headers.length, class: "muted", text: emptyText })));
  }
  return h("div", { class: "table-wrap" }, h("table", { id }, h("thead", {}, head), body));
}

/** A labelled form control. */
export function field(labelText, control, hint) {
  return h("label", {}, labelText, control, hint ? h("span", { class: "hint", text: hint }) : null);
}

/** Splits "a, b,,c" into ["a", "b", "c"]. */
export function commaList(text) {
  return text.split(",").map((part) => part.trim()).filter((part) => part !== "");
}

/** Parses an optional integer input: "" → null; else an integer or an Error. */
export function optionalInt(input, name) {
  const text = input.value.trim();
  if (text === "") {
    return null;
  }
  const value = Number(text);
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new Error(`${name} must be a whole number of at least 0.`);
  }
  return value;
}

/** Runs `action` with `button` disabled, showing any error in `slot`. */
export async function busy(button, slot, action) {
  button.disabled = true;
  if (slot) {
    slot.replaceChildren();
  }
  try {
    return await action();
  } catch (error) {
    if (slot) {
      showError(slot, error);
    }
    return undefined;
  } finally {
    button.disabled = false;
  }
}
