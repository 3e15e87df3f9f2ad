// topicactions.js: the Approve / Disable buttons of a topic, shared by the
// topic list and the topic page.

import { post, seg } from "./api.js";
import { busy, h } from "./dom.js";

/**
 * Buttons that move `topic` (a Topic) between statuses; `onChange(topic)`
 * gets the updated Topic, errors go to `slot`. Only the transitions the
 * admin API allows are offered (docs/admin-api.md, "Status transitions"):
 * Approve for a pending or disabled topic, Disable for an approved one.
 */
export function topicActions(topic, slot, onChange) {
  const action = (verb, label, cls) => {
    const button = h("button", {
      type: "button",
      class: cls,
      testid: `${verb}-${topic.name}`,
      text: label,
    });
    button.addEventListener("click", () =>
      busy(button, slot, async () => {
        const updated = await post(`/api/topics/${seg(topic.name)}/${verb}`);
        onChange(updated);
      }),
    );
    return button;
  };
  return h(
    "span",
    { class: "actions" },
    topic.status === "pending" || topic.status === "disabled"
      ? action("approve", "Approve", null)
      : null,
    topic.status === "approved" ? action("disable", "Disable", "secondary") : null,
  );
}
