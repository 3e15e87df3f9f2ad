// app.js: the console's entry point. Asks the broker which mode it runs in
// (GET /api/info), shows the login form when a token is needed (production
// mode without a stored token, or any call answering 401), and hands every
// other location to the router.

import { clearToken, get, getToken, onUnauthorized } from "./api.js";
import { current, link, navigate, start } from "./router.js";
import * as login from "./pages/login.js";
import * as topics from "./pages/topics.js";
import * as topic from "./pages/topic.js";
import * as messages from "./pages/messages.js";
import * as message from "./pages/message.js";
import * as dlq from "./pages/dlq.js";
import * as transactions from "./pages/transactions.js";
import * as trace from "./pages/trace.js";
import * as stats from "./pages/stats.js";
import * as cluster from "./pages/cluster.js";

const view = document.getElementById("view");
const flash = document.getElementById("flash");
const modeBadge = document.getElementById("mode-badge");
const brokerInfo = document.getElementById("broker-info");
const logout = document.getElementById("logout");

/** The broker's /api/info, once known. */
let info = null;

function showFlash(message) {
  flash.textContent = message;
  flash.hidden = false;
}

function loginHash() {
  const here = location.hash && !location.hash.startsWith("#/login") ? location.hash : link("topics");
  return link("login", null, { next: here });
}

/** Loads /api/info into the header. Rejects (after the 401 handler ran) when a token is needed. */
async function loadInfo() {
  info = await get("/api/info");
  modeBadge.textContent = info.mode;
  modeBadge.className = `badge ${info.mode === "production" ? "production" : "development"}`;
  modeBadge.dataset.testid = "mode";
  modeBadge.hidden = false;
  brokerInfo.textContent = `dmqd ${info.version}`;
  logout.hidden = !getToken();
}

function needsLogin() {
  return info !== null && info.mode === "production" && !getToken();
}

/** Whether the router runs (before that, moving to the login form only rewrites the location). */
let routing = false;

onUnauthorized(() => {
  clearToken();
  logout.hidden = true;
  if (current().route === "login") {
    return;
  }
  if (routing) {
    navigate(loginHash());
  } else {
    history.replaceState(null, "", loginHash());
  }
});

logout.addEventListener("click", () => {
  clearToken();
  logout.hidden = true;
  navigate(link("login"));
});

// The last line of defence: an error nobody caught is still shown.
window.addEventListener("unhandledrejection", (event) => {
  showFlash(event.reason && event.reason.message ? event.reason.message : String(event.reason));
});
window.addEventListener("error", (event) => {
  showFlash(event.message || "Unexpected error.");
});

const routes = {
  login: (root, ctx) => login.render(root, ctx, loadInfo),
  topics: topics.render,
  topic: topic.render,
  messages: messages.render,
  message: message.render,
  dlq: dlq.render,
  transactions: transactions.render,
  trace: trace.render,
  stats: stats.render,
  cluster: cluster.render,
};

function markNav(route) {
  flash.hidden = true;
  const section = { topic: "topics", message: "messages" }[route] ?? route;
  for (const anchor of document.querySelectorAll("#nav a")) {
    anchor.classList.toggle("active", anchor.dataset.route === section);
  }
}

async function boot() {
  let failure = null;
  try {
    await loadInfo();
    if (needsLogin() && current().route !== "login") {
      history.replaceState(null, "", loginHash());
    }
  } catch (error) {
    // 401: the handler has already moved to the login form.
    failure = error.status === 401 ? null : error;
  }
  routing = true;
  await start(view, routes, "topics", markNav);
  if (failure) {
    showFlash(`Cannot load the broker's information: ${failure.message}`);
  }
}

boot();
