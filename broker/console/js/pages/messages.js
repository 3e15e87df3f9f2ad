// pages/messages.js: the message browser. Pick a topic and one selector (id,
// key, time range or partition + offset range), page through the results
// with the broker's cursor, open a message, or delete what the selector
// matches (dry-run count first, then the typed topic name).

import { get, query, seg } from "../api.js";
import { deletePanel } from "../deletepanel.js";
import { badge, busy, field, fill, formatBytes, formatTime, h, show, showError, table } from "../dom.js";
import { link, replaceQuiet } from "../router.js";

const PAGE_SIZES = [20, 50, 100, 500];
const PREVIEW_CHARS = 80;

/** "2025-11-27T14:03:05" (a datetime-local value) for a time in ms. */
function localInput(ms) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** A datetime-local value as ms since the epoch (local time), or an Error. */
function inputMs(input, name) {
  const ms = input.value ? new Date(input.value).getTime() : NaN;
  if (Number.isNaN(ms)) {
    throw new Error(`${name}: pick a date and time.`);
  }
  return ms;
}

function wholeNumber(input, name) {
  const value = Number(input.value.trim());
  if (input.value.trim() === "" || !Number.isSafeInteger(value) || value < 0) {
    throw new Error(`${name} must be a whole number of at least 0.`);
  }
  return value;
}

/** Renders the browser into `root`; `ctx.params` may preset the search and run it. */
export async function render(root, ctx) {
  const params = ctx.params;
  const topicSelect = h("select", { id: "msg-topic" });
  const by = h(
    "select",
    { id: "msg-by" },
    [["id", "Message id"], ["key", "Key"], ["time", "Time range"], ["offset", "Partition and offsets"]].map(([value, text]) =>
      h("option", { value, text, selected: (params.by || "id") === value })),
  );
  const now = Date.now();
  const id = h("input", { id: "msg-id", type: "text", value: params.id || "", placeholder: "0000019ac3d1e2f0000000000000002a", spellcheck: "false", size: 36 });
  const key = h("input", { id: "msg-key", type: "text", value: params.key || "", placeholder: "order-17" });
  const from = h("input", { id: "msg-from", type: "datetime-local", step: 1, value: params.from || localInput(now - 3_600_000) });
  const to = h("input", { id: "msg-to", type: "datetime-local", step: 1, value: params.to || localInput(now + 60_000) });
  const partition = h("input", { id: "msg-partition", type: "number", min: 0, step: 1, value: params.partition || "0" });
  const fromOffset = h("input", { id: "msg-from-offset", type: "number", min: 0, step: 1, value: params.from_offset || "0" });
  const toOffset = h("input", { id: "msg-to-offset", type: "number", min: 0, step: 1, value: params.to_offset || "100" });
  const limit = h("select", { id: "msg-limit" }, PAGE_SIZES.map((size) =>
    h("option", { value: size, text: `${size} per page`, selected: String(size) === (params.limit || "50") })));
  const search = h("button", { type: "submit", id: "msg-search", text: "Search" });

  const groups = {
    id: h("div", { class: "row", dataset: { by: "id" } }, field("Message id", id)),
    key: h("div", { class: "row", dataset: { by: "key" } }, field("Key (text)", key)),
    time: h("div", { class: "row", dataset: { by: "time" } }, field("From (inclusive)", from), field("To (exclusive)", to)),
    offset: h("div", { class: "row", dataset: { by: "offset" } },
      field("Partition", partition), field("From offset (inclusive)", fromOffset), field("To offset (exclusive)", toOffset)),
  };
  const showGroup = () => {
    for (const [name, group] of Object.entries(groups)) {
      group.hidden = name !== by.value;
    }
  };
  by.addEventListener("change", showGroup);
  showGroup();

  const errors = h("div", { id: "msg-error-slot" });
  const results = h("div", { id: "msg-results" });
  const deleteSlot = h("div", { id: "msg-delete-slot" });
  const form = h(
    "form",
    { id: "msg-form", class: "card" },
    h("div", { class: "row" }, field("Topic", topicSelect), field("Find by", by), Object.values(groups), field("Page size", limit), search),
    h("p", { class: "hint", text: "Times are in this browser's time zone. Deleted messages are listed, struck through." }),
  );
  root.append(h("h1", { text: "Messages" }), form, errors, deleteSlot, results);

  // The selector of the last search, its topic, and the cursors of the pages shown so far.
  let state = null;

  const selector = () => {
    switch (by.value) {
      case "id":
        if (id.value.trim() === "") throw new Error("Enter a message id.");
        return { selector: { id: id.value.trim() }, words: `the message with id ${id.value.trim()}`, hash: { id: id.value.trim() } };
      case "key":
        if (key.value === "") throw new Error("Enter a key.");
        return { selector: { key: key.value }, words: `every message with key “${key.value}”`, hash: { key: key.value } };
      case "time": {
        const fromMs = inputMs(from, "From");
        const toMs = inputMs(to, "To");
        return {
          selector: { from_ms: fromMs, to_ms: toMs },
          words: `every message stored from ${formatTime(fromMs)} to ${formatTime(toMs)}`,
          hash: { from: from.value, to: to.value },
        };
      }
      default: {
        const p = wholeNumber(partition, "Partition");
        const start = wholeNumber(fromOffset, "From offset");
        const end = wholeNumber(toOffset, "To offset");
        return {
          selector: { partition: p, from_offset: start, to_offset: end },
          words: `every message of partition ${p} from offset ${start} to ${end}`,
          hash: { partition: p, from_offset: start, to_offset: end },
        };
      }
    }
  };

  const showPage = async () => {
    const cursor = state.cursors[state.cursors.length - 1];
    const answer = await get(`/api/topics/${seg(state.topic)}/messages${query({ ...state.selector, limit: limit.value, cursor })}`);
    fill(results, resultTable(answer.messages), pager(answer.next_cursor));
  };

  const pager = (nextCursor) => {
    const prev = h("button", { type: "button", id: "msg-prev", class: "secondary", text: "Previous page", disabled: state.cursors.length <= 1 });
    const next = h("button", { type: "button", id: "msg-next", class: "secondary", text: "Next page", disabled: !nextCursor });
    const remove = h("button", { type: "button", id: "msg-delete-open", class: "danger", text: "Delete matching…" });
    prev.addEventListener("click", () => busy(prev, errors, async () => {
      state.cursors.pop();
      await showPage();
    }));
    next.addEventListener("click", () => busy(next, errors, async () => {
      state.cursors.push(nextCursor);
      await showPage();
    }));
    remove.addEventListener("click", () => {
      const { topic, selector: chosen, words } = state;
      fill(deleteSlot, deletePanel({
        topic,
        selector: chosen,
        describe: words,
        onDone: () => {
          state.cursors = [null];
          showPage().catch((error) => showError(errors, error));
        },
        onCancel: () => fill(deleteSlot),
      }));
      deleteSlot.scrollIntoView({ block: "nearest" });
    });
    return h("div", { class: "actions" },
      prev,
      h("span", { id: "msg-page", class: "muted", text: `page ${state.cursors.length}` }),
      next,
      h("span", { class: "spacer" }),
      remove);
  };

  const run = () => busy(search, errors, async () => {
    fill(deleteSlot);
    fill(results);
    if (!topicSelect.value) {
      throw new Error("Pick a topic.");
    }
    const chosen = selector();
    state = { topic: topicSelect.value, selector: chosen.selector, words: chosen.words, cursors: [null] };
    replaceQuiet(link("messages", null, { topic: state.topic, by: by.value, ...chosen.hash, limit: limit.value }));
    await showPage();
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });

  try {
    const topics = await get("/api/topics");
    const names = topics.map((topic) => topic.name);
    if (params.topic && !names.includes(params.topic)) {
      names.unshift(params.topic);
    }
    fill(topicSelect, names.map((name) => h("option", { value: name, text: name, selected: name === params.topic })));
    if (names.length === 0) {
      showError(errors, new Error("There are no topics yet."));
    }
  } catch (error) {
    showError(errors, error);
    return;
  }
  if (params.topic && (params.id || params.key || params.from || params.partition)) {
    await run();
  }
}

function preview(message) {
  if (!message.preview) {
    return "—";
  }
  const text = message.preview.text;
  return text.length > PREVIEW_CHARS ? `${text.slice(0, PREVIEW_CHARS)}…` : text;
}

function resultTable(messages) {
  const rows = messages.map((message) =>
    h(
      "tr",
      { testid: `msg-row-${message.message_id}`, class: message.deleted ? "deleted" : null, dataset: { deleted: String(message.deleted) } },
      h("td", {}, h("a", { class: "mono", href: link("message", message.message_id), testid: `msg-link-${message.message_id}`, text: message.message_id })),
      h("td", { class: "num", text: message.partition }),
      h("td", { class: "num", text: message.offset }),
      h("td", { text: formatTime(message.timestamp_ms) }),
      h("td", { text: message.key !== null && message.key !== undefined ? message.key : (message.key_hex ? `0x${message.key_hex}` : "—") }),
      h("td", { class: "num", text: formatBytes(message.size_bytes) }),
      h("td", { class: "mono", text: preview(message) }),
      h("td", {}, message.deleted ? badge("deleted", `msg-deleted-${message.message_id}`) : show(null)),
      h("td", {}, h("a", { href: link("trace", message.message_id), text: "trace" })),
    ),
  );
  return table(
    "msg-table",
    ["Message id", ["Partition", "num"], ["Offset", "num"], "Time", "Key", ["Size", "num"], "Payload", "State", ""],
    rows,
    "No message matches.",
  );
}
