// pages/stats.js: statistics. Per-minute charts of produced, delivered,
// acked, retried, expired and dead-lettered messages, filtered by topic and
// group over a chosen window, with the window's totals; refreshes itself
// every 15 seconds while open.

import { get, query } from "../api.js";
import { fill, h, showError } from "../dom.js";
import { minuteChart, SERIES } from "../chart.js";
import { link, replaceQuiet } from "../router.js";

const WINDOWS = [[15, "15 minutes"], [60, "1 hour"], [360, "6 hours"], [1440, "24 hours"], [2880, "48 hours"]];
const REFRESH_MS = 15_000;

/** Renders the page into `root`; `ctx.params` may preset topic, group and minutes. */
export async function render(root, ctx) {
  const params = ctx.params;
  const topic = h("select", { id: "stats-topic" }, h("option", { value: "", text: "all topics" }));
  const group = h("input", { id: "stats-group", type: "text", value: params.group || "", placeholder: "all groups" });
  const minutes = h("select", { id: "stats-minutes" }, WINDOWS.map(([value, text]) =>
    h("option", { value, text, selected: String(value) === (params.minutes || "60") })));
  const auto = h("input", { id: "stats-auto", type: "checkbox", checked: true });
  const refresh = h("button", { type: "submit", id: "stats-refresh", text: "Show" });
  const form = h("form", { id: "stats-form", class: "card row" },
    h("label", {}, "Topic", topic),
    h("label", {}, "Group", group),
    h("label", {}, "Window", minutes),
    h("label", { class: "check" }, auto, "refresh every 15 s"),
    refresh);
  const errors = h("div", { id: "stats-error-slot" });
  const totals = h("div", { id: "stats-totals", class: "card totals" });
  const flowSlot = h("div", { id: "stats-chart-flow", class: "chart" });
  const troubleSlot = h("div", { id: "stats-chart-trouble", class: "chart" });
  root.append(h("h1", { text: "Statistics" }), form, errors, totals,
    h("section", { class: "card" }, flowSlot),
    h("section", { class: "card" }, troubleSlot));

  let charts = [];
  const destroy = () => {
    charts.forEach((chart) => chart.destroy());
    charts = [];
  };
  const load = async () => {
    errors.replaceChildren();
    const filter = { topic: topic.value, group: group.value.trim(), minutes: minutes.value };
    replaceQuiet(link("stats", null, filter));
    let stats;
    try {
      stats = await get(`/api/stats${query(filter)}`);
    } catch (error) {
      showError(errors, error);
      return;
    }
    if (!root.isConnected) {
      return;
    }
    fill(totals, Object.entries(SERIES).map(([key, { label }]) =>
      h("div", { testid: `stats-total-${key}` }, h("span", { class: "muted", text: label }), h("strong", { text: stats.totals[key] ?? 0 }))));
    destroy();
    charts = [
      minuteChart(flowSlot, "produced, delivered, acked per minute", ["produced", "delivered", "acked"], stats.minutes),
      minuteChart(troubleSlot, "retried, expired, dead-lettered per minute", ["retried", "expired", "dead_lettered"], stats.minutes),
    ];
  };

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  topic.addEventListener("change", load);
  minutes.addEventListener("change", load);
  const timer = setInterval(() => {
    if (auto.checked && !document.hidden) {
      load();
    }
  }, REFRESH_MS);
  ctx.onLeave(() => {
    clearInterval(timer);
    destroy();
  });

  try {
    const topics = await get("/api/topics");
    const names = topics.map((entry) => entry.name);
    if (params.topic && !names.includes(params.topic)) {
      names.unshift(params.topic);
    }
    topic.append(...names.map((name) => h("option", { value: name, text: name, selected: name === params.topic })));
  } catch (error) {
    showError(errors, error);
  }
  await load();
}
