// api.js: every call to the admin JSON API (docs/admin-api.md) goes through
// here. It adds the bearer token kept in sessionStorage, parses the JSON
// answer and turns every failure (HTTP error, network error, bad JSON) into
// an ApiError carrying the broker's own error message.

const TOKEN_KEY = "dmq.admin-token";

/** A failed API call: `status` is the HTTP status (0: no answer at all). */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

let unauthorizedHandler = null;

/** Registers what to do when any call answers 401 (show the login form). */
export function onUnauthorized(handler) {
  unauthorizedHandler = handler;
}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  sessionStorage.setItem(TOKEN_KEY, token);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

/** Encodes one path segment (topic names, message ids). */
export function seg(value) {
  return encodeURIComponent(String(value));
}

/** A query string from an object, leaving out null, undefined and "". */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") {
      search.set(name, String(value));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/**
 * Calls the API. Resolves to the parsed JSON body (null for 204), rejects
 * with an ApiError. `options.token` overrides the stored token (login check).
 */
export async function call(method, path, body, options = {}) {
  const headers = { Accept: "application/json" };
  const token = options.token ?? getToken();
  if (token) {
    headers.Authorization = `Bearer ${token}`;
  }
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, "network", `Cannot reach the broker (${error.message}).`);
  }
  const text = await response.text().catch(() => "");
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      if (response.ok) {
        throw new ApiError(response.status, "bad_response", `${method} ${path}: the answer is not JSON.`);
      }
    }
  }
  if (!response.ok) {
    const error = data && typeof data === "object" && data.error ? data.error : null;
    const code = error && error.code ? String(error.code) : `http_${response.status}`;
    const message = error && error.message
      ? String(error.message)
      : `${method} ${path} failed: HTTP ${response.status} ${response.statusText}`.trim();
    if (response.status === 401 && !options.token && unauthorizedHandler) {
      unauthorizedHandler();
    }
    throw new ApiError(response.status, code, message);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body = {}) => call("POST", path, body);
export const patch = (path, body) => call("PATCH", path, body);
export const del = (path) => call("DELETE", path);
