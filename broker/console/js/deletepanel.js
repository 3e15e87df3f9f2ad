// deletepanel.js: deleting messages with a typed confirmation. The panel
// first asks the broker for a dry-run count of what the selector covers,
// then enables the delete button only once the user has typed the topic
// name exactly.

import { post, seg } from "./api.js";
import { busy, field, h, showError } from "./dom.js";

/**
 * A panel deleting the messages of `topic` that `selector` matches
 * ({id} | {key} | {from_ms, to_ms} | {partition, from_offset, to_offset}).
 * `describe` says in words what is selected; `onDone(matched)` runs after a
 * deletion, `onCancel()` when the user gives up.
 */
export function deletePanel({ topic, selector, describe, onDone, onCancel }) {
  const path = `/api/topics/${seg(topic)}/messages/delete`;
  const count = h("p", { id: "delete-count", text: "Counting the messages this covers…" });
  const confirm = h("input", {
    id: "delete-confirm",
    type: "text",
    autocomplete: "off",
    spellcheck: "false",
    placeholder: topic,
    disabled: true,
  });
  const submit = h("button", { type: "button", id: "delete-submit", class: "danger", disabled: true, text: "Delete" });
  const cancel = h("button", { type: "button", id: "delete-cancel", class: "secondary", text: "Cancel" });
  const errors = h("div", { id: "delete-error-slot" });
  const result = h("div", { id: "delete-result" });
  let matched = 0;

  const refresh = () => {
    submit.disabled = !(matched > 0 && confirm.value === topic);
  };
  confirm.addEventListener("input", refresh);
  cancel.addEventListener("click", () => onCancel && onCancel());
  submit.addEventListener("click", () =>
    busy(submit, errors, async () => {
      const answer = await post(path, { ...selector, dry_run: false });
      const deleted = Number(answer && answer.matched) || 0;
      result.replaceChildren(
        h("div", { class: "success", testid: "delete-done", text: `Deleted ${deleted} message${deleted === 1 ? "" : "s"}.` }),
      );
      confirm.disabled = true;
      matched = 0;
      refresh();
      if (onDone) {
        onDone(deleted);
      }
    }).then(refresh),
  );

  const panel = h(
    "section",
    { class: "card", id: "delete-panel" },
    h("h2", { text: "Delete messages" }),
    h("p", {}, "Topic ", h("code", { text: topic }), ", ", describe, "."),
    count,
    field(`Type the topic name (${topic}) to confirm`, confirm),
    h("div", { class: "actions" }, submit, cancel),
    errors,
    result,
  );

  post(path, { ...selector, dry_run: true })
    .then((answer) => {
      matched = Number(answer && answer.matched) || 0;
      count.dataset.matched = String(matched);
      count.textContent = matched === 0
        ? "No message matches: nothing to delete."
        : `${matched} message${matched === 1 ? "" : "s"} will be deleted. This cannot be undone.`;
      confirm.disabled = matched === 0;
      refresh();
    })
    .catch((error) => {
      count.textContent = "";
      showError(errors, error);
    });
  return panel;
}
