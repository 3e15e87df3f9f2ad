// pages/login.js: the admin token form. The token is checked with
// POST /api/login and, if the broker accepts it, kept in sessionStorage (it
// is gone when the tab closes) and sent with every later call.

import { call, setToken } from "../api.js";
import { busy, h } from "../dom.js";
import { link, navigate } from "../router.js";

/** Renders the login form; `ctx.params.next` is where to go afterwards. */
export function render(root, ctx, afterLogin) {
  const token = h("input", {
    id: "login-token",
    type: "password",
    autocomplete: "current-password",
    required: true,
    placeholder: "admin token",
  });
  const submit = h("button", { type: "submit", id: "login-submit", text: "Log in" });
  const errors = h("div", { id: "login-error-slot" });
  const form = h(
    "form",
    { id: "login-form", class: "card login" },
    h("h1", { text: "Log in to DMQ" }),
    h("p", { class: "muted", text: "This broker runs in production mode: the console needs an admin token." }),
    h("label", {}, "Admin token", token),
    h("div", { class: "actions" }, submit),
    errors,
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const value = token.value.trim();
    busy(submit, errors, async () => {
      if (value === "") {
        throw new Error("Enter an admin token.");
      }
      try {
        await call("POST", "/api/login", { token: value }, { token: value });
      } catch (error) {
        if (error.status === 401) {
          throw new Error("That token is not valid.");
        }
        throw error;
      }
      setToken(value);
      await afterLogin();
      const next = ctx.params.next && ctx.params.next.startsWith("#/") && !ctx.params.next.startsWith("#/login")
        ? ctx.params.next
        : link("topics");
      navigate(next);
    });
  });
  root.appendChild(form);
  token.focus();
}
