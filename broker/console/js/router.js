// router.js: hash routing. A location like `#/topic/prod.pay.x?tab=1` is the
// route "topic", the argument "prod.pay.x" and the parameters {tab: "1"}.
// Each route renders into a fresh element; what a page registers with
// ctx.onLeave runs when the user navigates away (timers, charts).

import { errorBox, h } from "./dom.js";

/** Builds a hash for `route`, an optional argument and parameters. */
export function link(route, arg = null, params = {}) {
  let hash = `#/${route}`;
  if (arg !== null && arg !== undefined && arg !== "") {
    hash += `/${encodeURIComponent(arg)}`;
  }
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") {
      search.set(name, String(value));
    }
  }
  const text = search.toString();
  return text ? `${hash}?${text}` : hash;
}

/** The current location as {route, arg, params}. */
export function current() {
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, search = ""] = hash.split("?", 2);
  const slash = path.indexOf("/");
  const route = slash < 0 ? path : path.slice(0, slash);
  let arg = null;
  if (slash >= 0) {
    try {
      arg = decodeURIComponent(path.slice(slash + 1));
    } catch {
      arg = path.slice(slash + 1);
    }
  }
  return { route, arg, params: Object.fromEntries(new URLSearchParams(search)) };
}

/** Goes to a hash (a new history entry). */
export function navigate(hash) {
  if (location.hash === hash) {
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  } else {
    location.hash = hash;
  }
}

/** Changes the hash without rendering again (keeps a page's state linkable). */
export function replaceQuiet(hash) {
  history.replaceState(null, "", hash);
}

/**
 * Starts routing: `routes` maps a route name to `render(root, ctx)`;
 * `fallback` is the route for an empty or unknown hash.
 */
export function start(view, routes, fallback, onRoute) {
  let leaving = [];
  let generation = 0;
  const render = async () => {
    generation += 1;
    const mine = generation;
    for (const cleanup of leaving.splice(0)) {
      runCleanup(cleanup);
    }
    const where = current();
    const page = routes[where.route];
    if (!page) {
      navigate(link(fallback));
      return;
    }
    onRoute(where.route);
    const root = h("div", { id: `page-${where.route}`, class: "page" });
    view.replaceChildren(root);
    // A page that registers a cleanup after the user already left (it was
    // still awaiting an answer) has it run at once.
    const onLeave = (cleanup) => (mine === generation ? leaving.push(cleanup) : runCleanup(cleanup));
    try {
      await page(root, { ...where, onLeave });
    } catch (error) {
      root.appendChild(errorBox(error, "page-error"));
    }
  };
  window.addEventListener("hashchange", render);
  return render();
}

function runCleanup(cleanup) {
  try {
    cleanup();
  } catch (error) {
    console.warn("cleanup failed", error);
  }
}
