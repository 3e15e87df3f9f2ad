// pages/message.js: one message. Its fields, headers and a payload preview,
// its state in every consumer group, links to its trace and its topic, and
// deleting it (dry-run count, then the typed topic name).

import { get, query, seg } from "../api.js";
import { deletePanel } from "../deletepanel.js";
import { badge, fill, formatBytes, formatTime, h, show, showError, table } from "../dom.js";
import { link, navigate } from "../router.js";

/** Pretty-prints JSON text when it parses whole; otherwise returns it as is. */
function pretty(preview) {
  if (preview.format !== "json" || preview.truncated) {
    return preview.text;
  }
  try {
    return JSON.stringify(JSON.parse(preview.text), null, 2);
  } catch {
    return preview.text;
  }
}

/** Renders message `ctx.arg` into `root`; `ctx.params.format` forces a preview format. */
export async function render(root, ctx) {
  const id = ctx.arg;
  if (!id) {
    root.appendChild(h("p", {}, "No message chosen: find one in the ", h("a", { href: link("messages"), text: "message browser" }), "."));
    return;
  }
  const errors = h("div", { id: "message-error-slot" });
  root.append(h("h1", {}, "Message ", h("span", { class: "mono", id: "msg-detail-id", text: id })), errors);

  let detail;
  try {
    detail = await get(`/api/messages/${seg(id)}${query({ format: ctx.params.format })}`);
  } catch (error) {
    showError(errors, error);
    root.appendChild(h("p", {}, h("a", { href: link("trace", id), id: "msg-trace-link", text: "Its trace may still be known." })));
    return;
  }
  const message = detail.message;
  const deleteSlot = h("div", { id: "msg-delete-slot" });
  const format = h(
    "select",
    { id: "msg-format" },
    [["", "automatic"], ["json", "JSON"], ["text", "text"], ["hex", "hex"]].map(([value, text]) =>
      h("option", { value, text, selected: (ctx.params.format || "") === value })),
  );
  format.addEventListener("change", () => navigate(link("message", id, { format: format.value })));
  const deletedBadge = badge("deleted", "msg-detail-deleted");
  deletedBadge.hidden = !message.deleted;
  const remove = h("button", { type: "button", id: "msg-delete-open", class: "danger", text: "Delete…", disabled: message.deleted });
  remove.addEventListener("click", () => {
    fill(deleteSlot, deletePanel({
      topic: message.topic,
      selector: { id: message.message_id },
      describe: `the message with id ${message.message_id}`,
      onDone: () => {
        remove.disabled = true;
        deletedBadge.hidden = false;
      },
      onCancel: () => fill(deleteSlot),
    }));
  });

  const fields = [
    ["Topic", h("a", { href: link("topic", message.topic), id: "msg-topic-link", text: message.topic })],
    ["Partition", message.partition],
    ["Offset", message.offset],
    ["Stored", formatTime(message.timestamp_ms)],
    ["Key", message.key],
    ["Key (hex)", message.key_hex],
    ["Size", formatBytes(message.size_bytes)],
    ["Deliver at", message.deliver_at_ms === null ? null : formatTime(message.deliver_at_ms)],
    ["Expires at", message.expires_at_ms === null ? null : formatTime(message.expires_at_ms)],
    ["Deleted", message.deleted ? "yes" : "no"],
  ];
  const headers = Object.entries(message.headers || {});
  root.append(
    h("div", { class: "actions" },
      deletedBadge,
      h("a", { href: link("trace", id), id: "msg-trace-link", text: "Trace" }),
      h("a", { href: link("messages", null, { topic: message.topic, by: "id", id }), id: "msg-browse-link", text: "In the browser" }),
      remove),
    deleteSlot,
    h("section", { class: "card" },
      h("dl", { class: "fields", id: "msg-fields" },
        fields.map(([label, value]) => [h("dt", { text: label }), h("dd", {}, value instanceof Node ? value : show(value))]))),
    h("h2", { text: "Headers" }),
    table("msg-headers", ["Name", "Value"], headers.map(([name, value]) => [name, String(value)]), "No headers."),
    h("h2", {}, "Payload ", h("span", { class: "hint" }, "format ", format)),
    message.preview
      ? h("div", {},
        h("pre", { id: "msg-payload", dataset: { format: message.preview.format }, text: pretty(message.preview) }),
        message.preview.truncated ? h("p", { class: "hint", text: "Only the first 4096 bytes are shown." }) : null)
      : h("p", { class: "muted", text: "No payload preview." }),
    h("h2", { text: "State in each consumer group" }),
    table(
      "msg-groups",
      ["Group", "Member", "Acked", ["Attempts", "num"], "In flight", "Next delivery", "Dead-lettered"],
      (detail.groups || []).map((state) =>
        h("tr", { testid: `msg-group-${state.group}${state.member === null || state.member === undefined ? "" : `-${state.member}`}` },
          h("td", { text: state.group }),
          h("td", { text: show(state.member) }),
          h("td", {}, state.acked ? badge("acked") : "no"),
          h("td", { class: "num", text: state.attempts }),
          h("td", { text: state.in_flight ? "yes" : "no" }),
          h("td", { text: state.next_delivery_ms === null ? "—" : formatTime(state.next_delivery_ms) }),
          h("td", {}, state.dead_lettered ? badge("dead_lettered") : "no"))),
      "No consumer group has subscribed to this topic.",
    ),
  );
}
