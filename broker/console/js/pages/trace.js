// pages/trace.js: the life of one message as a vertical timeline
// (GET /api/trace/{id}): when, what happened (produced, stored, delivered,
// acked, ...), in which group, and the broker's detail.

import { get, seg } from "../api.js";
import { formatDuration, formatTime, h, showError } from "../dom.js";
import { link, navigate } from "../router.js";

/** Renders the trace of message `ctx.arg` (or only the id form) into `root`. */
export async function render(root, ctx) {
  const id = ctx.arg || "";
  const input = h("input", { id: "trace-id", type: "text", value: id, placeholder: "message id", spellcheck: "false", size: 36 });
  const go = h("button", { type: "submit", id: "trace-go", text: "Show trace" });
  const form = h("form", { id: "trace-form", class: "card row" }, h("label", {}, "Message id", input), go);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const wanted = input.value.trim();
    if (wanted !== "") {
      navigate(link("trace", wanted));
    }
  });
  const errors = h("div", { id: "trace-error-slot" });
  root.append(h("h1", { text: "Trace" }), form, errors);
  if (!id) {
    root.appendChild(h("p", { class: "muted", text: "Enter a message id to see everything that happened to it." }));
    return;
  }

  let trace;
  try {
    trace = await get(`/api/trace/${seg(id)}`);
  } catch (error) {
    showError(errors, error);
    return;
  }
  const events = trace.events || [];
  const first = events.length > 0 ? events[0].time_ms : 0;
  root.append(
    h("p", {},
      h("a", { href: link("message", id), id: "trace-message-link", text: "Open the message" }),
      ` · ${events.length} event${events.length === 1 ? "" : "s"}`),
    h("ol", { id: "trace-timeline", class: "timeline" },
      events.map((event) =>
        h("li", { class: `kind-${String(event.kind).replace(/[^a-z_]/g, "")}`, testid: "trace-event", dataset: { kind: event.kind } },
          h("div", { class: "when" },
            formatTime(event.time_ms),
            event.time_ms !== first ? ` (+${formatDuration(event.time_ms - first)})` : ""),
          h("div", { class: "what" },
            h("strong", { class: "trace-kind", text: event.kind }),
            event.group ? h("span", {}, "group ", h("code", { class: "trace-group", text: event.group })) : null,
            h("span", { class: "muted", text: where(event) })),
          event.detail ? h("div", { class: "trace-detail", text: event.detail }) : null)),
    ),
  );
  if (events.length === 0) {
    root.appendChild(h("p", { class: "muted", text: "No events recorded." }));
  }
}

/** "topic · partition 0 · offset 42", leaving out what the event does not know. */
function where(event) {
  const parts = [];
  if (event.topic) parts.push(event.topic);
  if (event.partition !== null && event.partition !== undefined) parts.push(`partition ${event.partition}`);
  if (event.offset !== null && event.offset !== undefined) parts.push(`offset ${event.offset}`);
  return parts.join(" · ");
}
