// pages/topics.js: the topic registry. A table of every topic with its
// status and the Approve / Disable actions, and the form that creates a
// topic (its full name `<environment>.<department>.<name>` is previewed as
// you type).

import { get, post } from "../api.js";
import { badge, busy, commaList, field, fill, h, optionalInt, showError, table } from "../dom.js";
import { link } from "../router.js";
import { topicActions } from "../topicactions.js";

const NAME_PART = /^[a-z0-9_-]{1,40}$/;

/** Renders the page into `root`. */
export async function render(root) {
  const listSlot = h("div", { id: "topics-list" }, h("p", { class: "muted", text: "Loading topics…" }));
  const listErrors = h("div", { id: "topics-error-slot" });
  const reload = async () => {
    try {
      const topics = await get("/api/topics");
      fill(listSlot, topicTable(topics, listErrors, reload));
    } catch (error) {
      fill(listSlot);
      showError(listErrors, error);
    }
  };
  root.append(
    h("h1", { text: "Topics" }),
    listErrors,
    listSlot,
    createForm(reload),
  );
  await reload();
}

function topicTable(topics, errors, reload) {
  const rows = topics.map((topic) =>
    h(
      "tr",
      { testid: `topic-row-${topic.name}` },
      h("td", {}, h("a", { href: link("topic", topic.name), testid: `topic-link-${topic.name}`, text: topic.name })),
      h("td", { text: topic.department }),
      h("td", { text: topic.owner }),
      h("td", { text: topic.environment }),
      h("td", {}, badge(topic.status, `topic-status-${topic.name}`)),
      h("td", { class: "num", text: topic.partitions }),
      h("td", {}, topicActions(topic, errors, () => reload())),
    ),
  );
  return table(
    "topics-table",
    ["Name", "Department", "Owner", "Environment", "Status", ["Partitions", "num"], "Actions"],
    rows,
    "No topics yet: create one below.",
  );
}

function createForm(reload) {
  const input = (id, attrs = {}) => h("input", { id, type: "text", autocomplete: "off", ...attrs });
  const number = (id, attrs = {}) => h("input", { id, type: "number", min: 0, step: 1, ...attrs });
  const nameAttrs = { pattern: "[a-z0-9_\\-]{1,40}", maxlength: 40, required: true, spellcheck: "false" };
  const environment = input("topic-env", { ...nameAttrs, list: "topic-env-choices", placeholder: "prod" });
  const department = input("topic-department", { ...nameAttrs, placeholder: "payments" });
  const name = input("topic-name", { ...nameAttrs, placeholder: "order-paid" });
  const owner = input("topic-owner", { required: true, placeholder: "alice" });
  const description = h("textarea", { id: "topic-description", placeholder: "What happened (one event per message)" });
  const businessUse = h("textarea", { id: "topic-business-use", placeholder: "Who consumes it and why" });
  const partitions = number("topic-partitions", { min: 1, value: 1 });
  const ordered = h("input", { id: "topic-ordered", type: "checkbox" });
  const retention = number("topic-retention-hours", { value: 168, placeholder: "keep forever" });
  const ttl = number("topic-ttl-ms", { placeholder: "no TTL" });
  const maxAttempts = number("topic-max-attempts", { min: 1, value: 16 });
  const ackTimeout = number("topic-ack-timeout-ms", { min: 1, value: 30000 });
  const producers = input("topic-producers", { placeholder: "orders-service, billing" });
  const consumers = input("topic-consumers", { placeholder: "shipping-service" });
  const preview = h("code", { id: "topic-name-preview", text: "…" });
  const submit = h("button", { type: "submit", id: "topic-create", text: "Create topic" });
  const errors = h("div", { id: "topic-create-error-slot" });
  const result = h("div", { id: "topic-create-result" });

  const parts = [environment, department, name];
  const updatePreview = () => {
    const values = parts.map((part) => part.value.trim());
    preview.textContent = values.map((value) => value || "…").join(".");
    const bad = values.some((value) => value !== "" && !NAME_PART.test(value));
    preview.classList.toggle("invalid", bad);
    preview.title = bad ? "each part: 1 to 40 of a-z 0-9 _ -" : "";
  };
  for (const part of parts) {
    part.addEventListener("input", updatePreview);
  }

  const form = h(
    "form",
    { id: "topic-create-form", class: "card", novalidate: true },
    h("h2", { text: "Create a topic" }),
    h("datalist", { id: "topic-env-choices" }, ["prod", "staging", "test", "dev"].map((value) => h("option", { value }))),
    h("div", { class: "grid" },
      field("Environment", environment),
      field("Department", department),
      field("Name", name),
      field("Owner", owner)),
    h("p", {}, "Full name: ", preview, h("span", { class: "hint", text: "  (each part 1 to 40 of a-z 0-9 _ -)" })),
    h("div", { class: "grid" },
      field("Description", description),
      field("Business use", businessUse)),
    h("div", { class: "grid" },
      field("Partitions", partitions),
      h("label", { class: "check" }, ordered, "Ordered (same key, same partition, one at a time)"),
      field("Retention (hours)", retention, "empty: keep forever"),
      field("Default TTL (ms)", ttl, "empty: messages never expire"),
      field("Max attempts", maxAttempts, "before dead-lettering"),
      field("Ack timeout (ms)", ackTimeout),
      field("Producer client ids", producers, "comma separated"),
      field("Consumer client ids", consumers, "comma separated")),
    h("div", { class: "actions" }, submit),
    errors,
    result,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    result.replaceChildren();
    busy(submit, errors, async () => {
      const values = parts.map((part) => part.value.trim());
      const labels = ["Environment", "Department", "Name"];
      values.forEach((value, index) => {
        if (!NAME_PART.test(value)) {
          throw new Error(`${labels[index]} must be 1 to 40 of a-z 0-9 _ - (got "${value}").`);
        }
      });
      if (owner.value.trim() === "") {
        throw new Error("Owner is required.");
      }
      const body = {
        environment: values[0],
        department: values[1],
        name: values[2],
        owner: owner.value.trim(),
        description: description.value.trim(),
        business_use: businessUse.value.trim(),
        partitions: optionalInt(partitions, "Partitions") ?? 1,
        ordered: ordered.checked,
        retention_hours: optionalInt(retention, "Retention"),
        default_ttl_ms: optionalInt(ttl, "Default TTL"),
        max_attempts: optionalInt(maxAttempts, "Max attempts") ?? undefined,
        ack_timeout_ms: optionalInt(ackTimeout, "Ack timeout") ?? undefined,
        producers: commaList(producers.value),
        consumers: commaList(consumers.value),
      };
      const topic = await post("/api/topics", body);
      result.replaceChildren(
        h("div", { class: "success", testid: "topic-created" },
          "Created ",
          h("a", { href: link("topic", topic.name), text: topic.name }),
          ` (${topic.status}).`),
      );
      name.value = "";
      updatePreview();
      await reload();
    });
  });
  updatePreview();
  return form;
}
