// The public API as the pages use it, and its errors in words a person understands.

/** The URL of `path` with `params` (entries whose value is null are left out). */
export function apiUrl(path, params = {}) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  return url.pathname + url.search;
}

/**
 * One JSON request. Never throws: resolves to {ok, status, body, serverNow, retryAfter}.
 * status 0 means the server could not be reached; serverNow is the server's clock
 * (ms, from the Date header) or null.
 */
export async function request(method, url, payload) {
  const init = { method, headers: { Accept: "application/json" }, cache: "no-store" };
  if (payload !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(payload);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch {
    return { ok: false, status: 0, body: null, serverNow: null, retryAfter: null };
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // A proxy's HTML error page, say: the status alone says what happened.
  }
  const date = Date.parse(response.headers.get("Date") || "");
  return {
    ok: response.ok,
    status: response.status,
    body,
    serverNow: Number.isNaN(date) ? null : date,
    retryAfter: response.headers.get("Retry-After"),
  };
}

export const JOB_GONE = "This job does not exist or has expired.";

/** What went wrong with a `request` result, in words; `action` is e.g. "start a generation". */
export function describeError(result, action) {
  const error = (result.body && result.body.error) || {};
  const detail = error.message ? ` (${error.message})` : "";
  switch (result.status) {
    case 0:
      return `Could not reach the server to ${action}. Check your connection and try again.`;
    case 400:
      return `The server did not accept that: ${error.message || "the request was malformed"}.`;
    case 401:
      return `This server needs an API key to ${action}, and this page has none.`;
    case 403:
      return `You are not allowed to ${action}${detail}.`;
    case 404:
      return error.code === "job_not_found" ? JOB_GONE : `Not found${detail}.`;
    case 409:
      return "This job has already finished.";
    case 413:
      return "The prompt is too long: the request may be at most 1 MiB.";
    case 429: {
      const wait = result.retryAfter ? ` in ${result.retryAfter} seconds` : " in a moment";
      return `Too many jobs are waiting for a worker. Try again${wait}.`;
    }
    case 503:
      return "The server is busy or restarting. Try again in a moment.";
    default:
      return `Something went wrong on the server (HTTP ${result.status}). Try again.`;
  }
}

const FAILURES = {
  backend_error: "The model failed while writing this text.",
  worker_lost: "The worker writing this text stopped unexpectedly.",
  log_lost: "The server lost this job's text (its storage was restarted).",
  upstream_timeout: "The model server took too long to answer.",
};

/** A failed job's error object (`{code, message}`) in words. */
export function describeFailure(error) {
  const known = error && FAILURES[error.code];
  return known || "The generation failed.";
}
