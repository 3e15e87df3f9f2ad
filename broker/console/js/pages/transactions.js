// pages/transactions.js: transactions not settled yet (GET
// /api/transactions): open ones, those past their timeout (overdue) and
// those whose check-backs ran out (unresolved), with their producer group,
// id, handle, age and records. "Commit" and "Roll back" end one as an
// operator (POST /api/transactions/{group}/{id}/commit|rollback with its
// handle), after a second click on a confirmation that says what happens
// to its messages.

import { get, post, seg } from "../api.js";
import { busy, fill, formatTime, h, showError, table } from "../dom.js";

/** Renders the page into `root`. */
export async function render(root) {
  const errors = h("div", { id: "tx-error-slot" });
  const result = h("div", { id: "tx-result" });
  const list = h("div", { id: "tx-list" }, h("p", { class: "muted", text: "Loading…" }));
  const refresh = h("button", { type: "button", id: "tx-refresh", class: "secondary", text: "Refresh" });
  root.append(
    h("div", { class: "row" }, h("h1", { text: "Transactions" }), refresh),
    h("p", {
      class: "hint",
      text: "Half messages wait here until their transaction commits (then every group gets them) or rolls back (then none does). "
        + "A transaction open past its timeout is checked back with its producer group; one whose checks ran out is unresolved and waits for you.",
    }),
    errors,
    result,
    list,
  );

  const reload = async () => {
    let answer;
    try {
      answer = await get("/api/transactions");
    } catch (error) {
      fill(list);
      showError(errors, error);
      return;
    }
    const rows = answer.transactions.map((txn) => {
      const name = `${txn.producer_group}/${txn.transaction_id}`;
      const state = txn.unresolved ? "unresolved" : txn.overdue ? `${txn.stage} (overdue)` : txn.stage;
      const actions = h("span", { class: "actions" });
      if (txn.stage === "open") {
        for (const [action, label, consequence] of [
          ["commit", "Commit", "deliver its messages to every group"],
          ["rollback", "Roll back", "discard its messages for good"],
        ]) {
          const button = h("button", {
            type: "button",
            class: action === "commit" ? "" : "danger",
            testid: `tx-${action}-${txn.handle}`,
            text: label,
          });
          // A second, explicit click: ending a transaction cannot be undone.
          button.addEventListener("click", () => {
            const confirm = h("button", {
              type: "button",
              class: action === "commit" ? "" : "danger",
              testid: `tx-confirm-${action}-${txn.handle}`,
              text: `Yes, ${label.toLowerCase()}`,
            });
            confirm.addEventListener("click", () => busy(confirm, errors, async () => {
              const ended = await post(
                `/api/transactions/${seg(txn.producer_group)}/${seg(txn.transaction_id)}/${action}`,
                { handle: txn.handle },
              );
              fill(result, h("div", {
                class: "success",
                testid: "tx-ended",
                text: `Transaction ${name}: ${ended.outcome === "commit" ? "committed" : "rolled back"}.`,
              }));
              await reload();
            }));
            fill(result, h("div", { class: "row" },
              h("span", { text: `${label} transaction ${name} (handle ${txn.handle})? This will ${consequence}.` }),
              confirm));
          });
          actions.append(button);
        }
      }
      return h("tr", { testid: `tx-row-${txn.handle}`, class: txn.unresolved ? "warn" : "" },
        h("td", { text: txn.producer_group }),
        h("td", { class: "mono", text: txn.transaction_id }),
        h("td", { class: "num", text: txn.handle }),
        h("td", { testid: `tx-state-${txn.handle}`, text: state }),
        h("td", { class: "num", text: txn.records }),
        h("td", { class: "num", text: txn.acks ?? 0 }),
        h("td", { class: "num", text: txn.checks }),
        h("td", { text: formatTime(txn.opened_ms) }),
        h("td", {}, actions));
    });
    fill(list, table(
      "tx-table",
      ["Producer group", "Transaction id", ["Handle", "num"], "State", ["Records", "num"], ["Acks", "num"], ["Checks", "num"], "Began", ""],
      rows,
      "No open transactions.",
    ));
  };
  refresh.addEventListener("click", () => busy(refresh, errors, reload));
  await reload();
}
