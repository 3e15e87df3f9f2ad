// pages/topic.js: one topic. Its registry fields, its partitions (start and
// end offsets), its consumer groups (lag, unacked, oldest unacked age,
// delayed), a rate chart of the last hour, and the form that sends a test
// message.

import { get, post, query, seg } from "../api.js";
import { badge, busy, field, fill, formatBytes, formatDuration, formatTime, h, show, showError, table } from "../dom.js";
import { minuteChart } from "../chart.js";
import { link } from "../router.js";
import { topicActions } from "../topicactions.js";

/** Renders the page for topic `ctx.arg` into `root`. */
export async function render(root, ctx) {
  const name = ctx.arg;
  if (!name) {
    root.appendChild(h("p", {}, "No topic chosen: pick one on the ", h("a", { href: link("topics"), text: "topics page" }), "."));
    return;
  }
  const header = h("div", { id: "topic-header" });
  const errors = h("div", { id: "topic-error-slot" });
  const body = h("div", { id: "topic-body" }, h("p", { class: "muted", text: "Loading…" }));
  const chartSlot = h("div", { id: "topic-chart", class: "chart" });
  const chartErrors = h("div", { id: "topic-chart-error-slot" });
  root.append(
    header,
    errors,
    body,
    h("section", { class: "card" }, h("h2", { text: "Rates, last 60 minutes" }), chartErrors, chartSlot),
    testMessageForm(name, () => load()),
  );

  const load = async () => {
    let detail;
    try {
      detail = await get(`/api/topics/${seg(name)}`);
    } catch (error) {
      fill(body);
      showError(errors, error);
      return;
    }
    const topic = detail.topic;
    fill(
      header,
      h("h1", {}, topic.name, " ", badge(topic.status, "topic-status")),
      h(
        "div",
        { class: "actions" },
        topicActions(topic, errors, () => load()),
        h("a", { href: link("messages", null, { topic: topic.name }), id: "topic-browse", text: "Browse messages" }),
        h("a", { href: link("stats", null, { topic: topic.name }), id: "topic-stats", text: "Statistics" }),
      ),
    );
    fill(
      body,
      registryFields(topic),
      h("h2", { text: "Partitions" }),
      table(
        "partitions-table",
        [
          ["Partition", "num"],
          ["Start offset", "num"],
          ["End offset", "num"],
          ["Messages", "num"],
          ["Stored", "num"],
          ["Disk", "num"],
        ],
        detail.partitions.map((p) => [
          p.partition,
          p.start_offset,
          p.end_offset,
          p.end_offset - p.start_offset,
          formatBytes(p.size_bytes),
          formatBytes(p.disk_bytes),
        ]),
      ),
      h("p", {
        id: "topic-disk",
        class: "muted",
        text: `Disk use: ${formatBytes(detail.partitions.reduce((sum, p) => sum + p.disk_bytes, 0))}`,
      }),
      h("h2", { text: "Consumer groups" }),
      groupTable(detail.groups),
    );
  };

  let chart = null;
  ctx.onLeave(() => chart && chart.destroy());
  const loadChart = async () => {
    try {
      const stats = await get(`/api/stats${query({ topic: name, minutes: 60 })}`);
      if (!root.isConnected) {
        return;
      }
      chart = minuteChart(chartSlot, "messages per minute", ["produced", "delivered", "acked", "retried", "dead_lettered"], stats.minutes);
    } catch (error) {
      showError(chartErrors, error);
    }
  };
  await Promise.all([load(), loadChart()]);
}

function registryFields(topic) {
  const entries = [
    ["Environment", topic.environment],
    ["Department", topic.department],
    ["Short name", topic.short_name],
    ["Owner", topic.owner],
    ["Description", topic.description],
    ["Business use", topic.business_use],
    ["Partitions", topic.partitions],
    ["Ordered", topic.ordered ? "yes" : "no"],
    ["Retention", topic.retention_hours === null ? "keep forever" : `${topic.retention_hours} h`],
    ["Default TTL", topic.default_ttl_ms === null ? "none" : formatDuration(topic.default_ttl_ms)],
    ["Max attempts", topic.max_attempts],
    ["Ack timeout", formatDuration(topic.ack_timeout_ms)],
    ["Producers", (topic.producers || []).join(", ")],
    ["Consumers", (topic.consumers || []).join(", ")],
    ["Created", formatTime(topic.created_ms)],
    ["Updated", formatTime(topic.updated_ms)],
  ];
  return h(
    "section",
    { class: "card" },
    h("dl", { class: "fields", id: "topic-fields" }, entries.map(([label, value]) => [h("dt", { text: label }), h("dd", { text: show(value) })])),
  );
}

function groupTable(groups) {
  const rows = [];
  for (const group of groups) {
    for (const p of group.partitions) {
      rows.push(
        h(
          "tr",
          { testid: `group-row-${group.name}-${p.partition}` },
          h("td", { text: group.name }),
          h("td", { text: group.mode }),
          h("td", { class: "num", text: p.partition }),
          h("td", { class: "num", text: p.ack_floor }),
          h("td", { class: "num", text: p.cursor }),
          h("td", { class: "num", text: p.lag }),
          h("td", { class: "num", text: p.unacked }),
          h("td", { class: "num", text: p.in_flight }),
          h("td", { class: "num", text: formatDuration(p.oldest_unacked_age_ms) }),
          h("td", { class: "num", text: p.delayed }),
          h("td", {}, group.dead_letter_topic ? h("code", { text: group.dead_letter_topic }) : "—"),
        ),
      );
    }
  }
  return table(
    "groups-table",
    ["Group", "Mode", ["Partition", "num"], ["Ack floor", "num"], ["Cursor", "num"], ["Lag", "num"], ["Unacked", "num"],
      ["In flight", "num"], ["Oldest unacked", "num"], ["Delayed", "num"], "Dead-letter topic"],
    rows,
    "No consumer group has subscribed yet.",
  );
}

/** Parses "name: value" lines into a headers object. */
function parseHeaders(text) {
  const headers = {};
  for (const [index, line] of text.split("\n").entries()) {
    if (line.trim() === "") {
      continue;
    }
    const colon = line.indexOf(":");
    if (colon <= 0) {
      throw new Error(`Header line ${index + 1} must look like "name: value".`);
    }
    headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
  }
  return headers;
}

/** The test-message form; `onSent` runs after a message was produced. */
function testMessageForm(topic, onSent) {
  const value = h("textarea", { id: "test-value", placeholder: '{"order": 17}' });
  const key = h("input", { id: "test-key", type: "text", placeholder: "none" });
  const headers = h("textarea", { id: "test-headers", placeholder: "trace-id: abc" });
  const delay = h("input", { id: "test-delay-ms", type: "number", min: 0, step: 1, placeholder: "deliver now" });
  const submit = h("button", { type: "submit", id: "test-send", text: "Send test message" });
  const errors = h("div", { id: "test-error-slot" });
  const result = h("div", { id: "test-result" });
  const form = h(
    "form",
    { id: "test-form", class: "card" },
    h("h2", { text: "Send a test message" }),
    h("p", { class: "hint", text: "Produced as client id “admin”, whatever the topic's producer list." }),
    h("div", { class: "grid" },
      field("Value", value),
      field("Headers", headers, "one “name: value” per line"),
      field("Key", key, "empty: no key"),
      field("Delay (ms)", delay, "empty: deliver now")),
    h("div", { class: "actions" }, submit),
    errors,
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    result.replaceChildren();
    busy(submit, errors, async () => {
      const delayText = delay.value.trim();
      const delayMs = delayText === "" ? null : Number(delayText);
      if (delayMs !== null && (!Number.isSafeInteger(delayMs) || delayMs < 0)) {
        throw new Error("Delay must be a whole number of milliseconds.");
      }
      const answer = await post(`/api/topics/${seg(topic)}/test-message`, {
        value: value.value,
        key: key.value === "" ? null : key.value,
        headers: parseHeaders(headers.value),
        delay_ms: delayMs,
      });
      result.replaceChildren(
        h("div", { class: "success" },
          "Sent: message ",
          h("a", { id: "test-result-link", href: link("message", answer.message_id), text: answer.message_id }),
          ` at partition ${answer.partition}, offset ${answer.offset}`,
          answer.deliver_at_ms ? `, delivered from ${formatTime(answer.deliver_at_ms)}` : "",
          "."),
      );
      Object.assign(result.dataset, {
        messageId: answer.message_id,
        partition: String(answer.partition),
        offset: String(answer.offset),
      });
      await onSent();
    });
  });
  return form;
}
