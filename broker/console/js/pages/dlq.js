// pages/dlq.js: dead letters. Lists every dead-letter topic (GET /api/dlq)
// with its source topic, group and message count; "Resend all" produces
// them again to their source topic, "Show messages" lists one dead-letter
// topic's messages with checkboxes to resend only the selected ones.

import { get, post, query, seg } from "../api.js";
import { busy, fill, formatTime, h, showError, table } from "../dom.js";
import { link } from "../router.js";

/** Messages listed per dead-letter topic. */
const LIST_LIMIT = 200;

/** Renders the page into `root`. */
export async function render(root) {
  const errors = h("div", { id: "dlq-error-slot" });
  const result = h("div", { id: "dlq-result" });
  const list = h("div", { id: "dlq-list" }, h("p", { class: "muted", text: "Loading…" }));
  const detail = h("div", { id: "dlq-messages" });
  const refresh = h("button", { type: "button", id: "dlq-refresh", class: "secondary", text: "Refresh" });
  root.append(
    h("div", { class: "row" }, h("h1", { text: "Dead letters" }), refresh),
    errors,
    result,
    list,
    detail,
  );

  const done = (answer) => {
    const resent = Number(answer && answer.resent) || 0;
    fill(result, h("div", { class: "success", testid: "dlq-resent", text: `Resent ${resent} message${resent === 1 ? "" : "s"} to the source topic.` }));
  };

  const reload = async () => {
    let entries;
    try {
      entries = await get("/api/dlq");
    } catch (error) {
      fill(list);
      showError(errors, error);
      return;
    }
    const rows = entries.map((entry) => {
      const resend = h("button", { type: "button", testid: `dlq-resend-all-${entry.topic}`, text: "Resend all", disabled: entry.messages === 0 });
      resend.addEventListener("click", () => busy(resend, errors, async () => {
        done(await post(`/api/dlq/${seg(entry.topic)}/resend`, {}));
        fill(detail);
        await reload();
      }));
      const open = h("button", { type: "button", class: "secondary", testid: `dlq-show-${entry.topic}`, text: "Show messages" });
      open.addEventListener("click", () => busy(open, errors, () => showMessages(entry, detail, errors, async (answer) => {
        done(answer);
        await reload();
      })));
      return h("tr", { testid: `dlq-row-${entry.topic}` },
        h("td", { class: "mono", text: entry.topic }),
        h("td", {}, h("a", { href: link("topic", entry.source_topic), text: entry.source_topic })),
        h("td", { text: entry.group }),
        h("td", { class: "num", text: entry.messages }),
        h("td", {}, h("span", { class: "actions" }, open, resend)));
    });
    fill(list, table("dlq-table", ["Dead-letter topic", "Source topic", "Group", ["Messages", "num"], ""], rows, "No dead letters."));
  };
  refresh.addEventListener("click", () => busy(refresh, errors, reload));
  await reload();
}

/** Lists the messages of one dead-letter topic with checkboxes and "Resend selected". */
async function showMessages(entry, slot, errors, onResent) {
  const answer = await get(`/api/topics/${seg(entry.topic)}/messages${query({ from_ms: 0, to_ms: Date.now() + 60_000, limit: LIST_LIMIT })}`);
  const live = answer.messages.filter((message) => !message.deleted);
  const boxes = live.map((message) => h("input", { type: "checkbox", value: message.message_id, testid: `dlq-pick-${message.message_id}` }));
  const resend = h("button", { type: "button", id: "dlq-resend-selected", text: "Resend selected" });
  resend.addEventListener("click", () => busy(resend, errors, async () => {
    const ids = boxes.filter((box) => box.checked).map((box) => box.value);
    if (ids.length === 0) {
      throw new Error("Select at least one message.");
    }
    const result = await post(`/api/dlq/${seg(entry.topic)}/resend`, { message_ids: ids });
    fill(slot);
    await onResent(result);
  }));
  fill(
    slot,
    h("h2", {}, "Messages of ", h("code", { text: entry.topic })),
    table(
      "dlq-messages-table",
      ["", "Message id", "Stored", "Key", "Reason"],
      live.map((message, index) => [
        boxes[index],
        h("a", { class: "mono", href: link("message", message.message_id), text: message.message_id }),
        formatTime(message.timestamp_ms),
        message.key ?? "—",
        Object.entries(message.headers || {})
          .filter(([name]) => name.startsWith("dmq.dlq."))
          .map(([name, value]) => `${name.slice(8)}: ${value}`)
          .join("; ") || "—",
      ]),
      "No messages left.",
    ),
    answer.next_cursor ? h("p", { class: "hint", text: `Only the first ${LIST_LIMIT} are listed.` }) : null,
    h("div", { class: "actions" }, resend),
  );
}
