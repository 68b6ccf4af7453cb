// One job watched live: its text, reasoning, tool calls and events, status,
// counters, viewers and connection.
//
// The event stream is the truth for what the job wrote and for its end; the job
// state (GET /v1/jobs/<id>, polled) adds what the stream does not carry: when
// the job started and finished, and how many people watch it. Everything from
// the server is inserted as text, never as HTML.

import { JOB_GONE, apiUrl, describeError, describeFailure, request } from "./api.js";
import { copyText, formatSeconds, h } from "./page.js";
import { EventList, Reasoning, ToolCalls } from "./parts.js";
import { EventStream } from "./sse.js";

const POLL_MS = 2000; // viewer count and start time; cheap for the server
const TICK_MS = 250; // elapsed time and tokens per second
const REOPEN_MS = [500, 1000, 2000, 4000, 8000]; // after a refused (non-200) stream
const STICK_PX = 80; // "at the bottom" slack for following the text
const FINISHED = new Set(["completed", "failed", "cancelled"]);
const MERGED = new Set(["token", "reasoning", "tool_call"]); // may cover first_id..id

/** Whether `result` is the state of a finished job whose only events were start, tokens, done. */
function finishedPlain(result) {
  const state = result.body;
  return result.ok && FINISHED.has(state.status) && Number(state.last_event_id) <= state.tokens + 2;
}

export class Viewer {
  /** Builds the viewer inside `container`; `token` is the viewer token of the URL, if any. */
  constructor(container, jobId, { token = null } = {}) {
    this.jobId = jobId;
    this.token = token;
    this.status = null;
    this.lastId = 0;
    this.tokens = 0;
    this.startedAt = null; // server clock, ms
    this.finishedAt = null;
    this.clockOffset = 0; // server clock minus ours
    this.source = null;
    this.reopens = 0;
    this.timers = new Set();
    this.build(container);
  }

  build(container) {
    this.statusEl = h("span", { class: "status", "data-testid": "status" });
    this.tokensEl = h("span", { class: "num", "data-testid": "tokens" }, "0");
    this.elapsedEl = h("span", { class: "num", "data-testid": "elapsed" }, "–");
    this.rateEl = h("span", { class: "num", "data-testid": "rate" }, "–");
    this.viewersEl = h("span", { class: "num", "data-testid": "viewers" });
    this.viewersBox = h("span", { class: "viewers", hidden: "" }, this.viewersEl, " watching");
    this.connectionEl = h("span", { class: "connection", "data-testid": "connection" });
    this.messageEl = h("p", { class: "message", "data-testid": "message", role: "status" });
    this.textNode = document.createTextNode("");
    this.textEl = h("span", { class: "text", "data-testid": "text" }, this.textNode);
    this.placeholderEl = h("span", { class: "placeholder" }, "Waiting for a worker to start…");
    this.reasoning = new Reasoning();
    this.toolCalls = new ToolCalls();
    this.events = new EventList();
    this.copyButton = h("button", { type: "button", "data-testid": "copy" }, "Copy text");
    this.cancelButton = h("button", { type: "button", "data-testid": "cancel" }, "Cancel");
    this.noteEl = h("span", { class: "note", "data-testid": "note", "aria-live": "polite" });
    this.root = h(
      "section",
      { class: "viewer card", "aria-label": "Generation" },
      h(
        "div",
        { class: "bar" },
        this.statusEl,
        h(
          "span",
          { class: "stats" },
          h("span", { class: "stat tokens" }, this.tokensEl, " tokens"),
          h("span", { class: "stat elapsed", title: "Time spent generating" }, this.elapsedEl),
          h("span", { class: "stat rate" }, this.rateEl, " tok/s"),
        ),
        this.viewersBox,
        this.connectionEl,
      ),
      this.messageEl,
      this.reasoning.el,
      h(
        "div",
        { class: "output" },
        this.placeholderEl,
        this.textEl,
        h("span", { class: "caret", "aria-hidden": "true" }),
      ),
      this.toolCalls.el,
      this.events.el,
      h("div", { class: "actions" }, this.copyButton, this.cancelButton, this.noteEl),
    );
    this.messageEl.hidden = true;
    this.copyButton.addEventListener("click", () => this.copy());
    this.cancelButton.addEventListener("click", () => this.cancel());
    container.replaceChildren(this.root);
  }

  /** Shows what is known at once, then follows the job live. */
  async start() {
    this.setConnection("connecting");
    this.setStatus("queued");
    const result = await request("GET", this.url(`/v1/jobs/${this.jobId}`));
    if (result.ok) {
      this.applyState(result);
      if (finishedPlain(result)) {
        this.showFinished(result.body);
        return;
      }
    } else if ([401, 403, 404].includes(result.status)) {
      this.refused(result);
      return;
    }
    // Anything else (the server restarting, say) is the stream's to retry. A finished
    // job that wrote more than text replays its stream (merged: a few events).
    this.open();
    this.every(POLL_MS, () => this.poll());
    this.every(TICK_MS, () => this.renderCounters());
  }

  /** Closes the stream and stops every timer (the start page replaces its viewer). */
  stop() {
    this.closeSource();
    for (const timer of this.timers) clearInterval(timer);
    this.timers.clear();
  }

  url(path, extra = {}) {
    return apiUrl(path, { token: this.token, ...extra });
  }

  every(ms, fn) {
    this.timers.add(setInterval(fn, ms));
  }

  // The event stream.

  /** Opens the stream after the last id shown (sent as Last-Event-ID). */
  open() {
    const url = this.url(`/v1/jobs/${this.jobId}/events`);
    const source = new EventStream(url, this.lastId, {
      open: () => this.source === source && this.onOpen(),
      event: (event) => this.source === source && this.onEvent(event),
      end: (status) => this.source === source && this.onEnd(source, status),
    });
    this.source = source;
  }

  closeSource() {
    if (this.source) this.source.close();
    this.source = null;
  }

  onOpen() {
    this.reopens = 0;
    this.setConnection("live");
    // Count again once this node has reported the new stream (it does every second).
    this.later(1200, () => this.poll());
  }

  /** The stream ended before `done`: connection trouble, never a job failure. */
  onEnd(source, status) {
    this.source = null;
    this.setConnection("reconnecting");
    if (status === 0) {
      // The connection dropped (its node went away, say): resume as EventSource would.
      this.later(source.retryMs, () => this.open());
      return;
    }
    // Refused (503 from a node that is starting, say): back off, and check the job is there.
    const delay = REOPEN_MS[Math.min(this.reopens, REOPEN_MS.length - 1)];
    this.reopens += 1;
    this.later(delay, () => this.recheck());
  }

  /** After a refused stream: is the job still there? Then reopen after the last id. */
  async recheck() {
    const result = await request("GET", this.url(`/v1/jobs/${this.jobId}`));
    if ([401, 403, 404].includes(result.status)) {
      this.refused(result);
    } else if (this.lastId === 0 && finishedPlain(result)) {
      this.showFinished(result.body);
    } else {
      this.open();
    }
  }

  later(ms, fn) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, ms);
    this.timers.add(timer);
  }

  /** Every event, of any kind, is shown once: through `accept`, in id order. */
  onEvent(event) {
    const data = JSON.parse(event.data);
    const id = Number(event.lastEventId);
    // Only the merging kinds have a first_id; a custom event's data is the producer's own.
    const first = MERGED.has(event.type) ? (data.first_id ?? id) : id;
    if (!this.accept(id, first)) return;
    if (event.type === "done") {
      this.onDone(data);
      return;
    }
    if (this.status === "queued") this.setStatus("running");
    if (event.type === "start") this.startedAt ??= Date.now() + this.clockOffset;
    else if (event.type === "token") this.onToken(data, id - first + 1);
    else if (event.type === "reasoning") this.reasoning.append(data.text, id - first + 1);
    else if (event.type === "tool_call") this.toolCalls.add(data);
    else this.events.add(event.type, id, data);
  }

  /**
   * Takes an event's id range [first, id] if it is the next one. An id already
   * shown is skipped (each part is shown once); a gap reopens the stream after
   * the last id shown, which the server then fills exactly.
   */
  accept(id, first) {
    if (id <= this.lastId) {
      this.root.dataset.repeats = String(Number(this.root.dataset.repeats || 0) + 1);
      return false;
    }
    if (first !== this.lastId + 1) {
      this.root.dataset.gaps = String(Number(this.root.dataset.gaps || 0) + 1);
      this.closeSource();
      this.setConnection("reconnecting");
      this.later(REOPEN_MS[0], () => this.open());
      return false;
    }
    this.lastId = id;
    this.root.dataset.lastEventId = String(id);
    return true;
  }

  onToken(data, count) {
    this.tokens += count;
    this.tokensEl.textContent = String(this.tokens);
    this.reasoning.fold();
    this.appendText(data.text);
  }

  onDone(data) {
    this.closeSource(); // the server closes the stream too; the page must not reopen it
    this.tokens = data.tokens ?? this.tokens;
    this.finishedAt = Date.now() + this.clockOffset;
    this.finish(data.status, data.error);
    this.renderCounters();
    // One last look for the exact start and end times.
    request("GET", this.url(`/v1/jobs/${this.jobId}`)).then((result) => {
      if (result.ok) this.applyState(result);
      this.renderCounters();
    });
  }

  appendText(text) {
    const page = document.documentElement;
    const following = window.innerHeight + window.scrollY >= page.scrollHeight - STICK_PX;
    this.textNode.appendData(text);
    this.placeholderEl.hidden = true;
    if (following && page.scrollHeight > window.innerHeight) {
      window.scrollTo({ top: page.scrollHeight });
    }
  }

  // The job state.

  async poll() {
    if (FINISHED.has(this.status)) return;
    const result = await request("GET", this.url(`/v1/jobs/${this.jobId}`));
    if (FINISHED.has(this.status)) return;
    if (result.ok) this.applyState(result);
    else if (result.status === 404) this.refused(result);
  }

  applyState(result) {
    const state = result.body;
    if (result.serverNow !== null) {
      // The Date header has whole seconds: only a clock off by more is corrected.
      const offset = result.serverNow - Date.now();
      this.clockOffset = Math.abs(offset) > 2000 ? offset : 0;
    }
    if (state.started_at) this.startedAt = Date.parse(state.started_at);
    if (state.finished_at) this.finishedAt = Date.parse(state.finished_at);
    if (state.status === "running" && this.status === "queued") this.setStatus("running");
    if (this.root.dataset.connection === "live" && !FINISHED.has(this.status)) {
      // This page's own stream is one of them, even before its node reports it.
      this.viewersEl.textContent = String(Math.max(state.viewers, 1));
      this.viewersBox.hidden = false;
    }
    this.renderCounters();
  }

  /** A job that ended before the page opened: its whole text at once. */
  showFinished(state) {
    this.closeSource();
    this.textNode.data = state.text;
    this.placeholderEl.hidden = state.text !== "";
    if (state.reasoning) this.reasoning.append(state.reasoning);
    if (state.text) this.reasoning.fold();
    this.toolCalls.show(state.tool_calls || []);
    this.tokens = state.tokens;
    this.lastId = Number(state.last_event_id);
    this.finish(state.status, state.error);
    this.renderCounters();
  }

  finish(status, error) {
    this.stop();
    this.toolCalls.end();
    this.setStatus(status);
    this.setConnection("closed");
    this.viewersBox.hidden = true;
    this.cancelButton.hidden = true;
    if (status === "failed") {
      this.showMessage(describeFailure(error), error && error.message);
    } else if (status === "cancelled") {
      this.showMessage("This generation was cancelled.");
    }
    if (this.textNode.data === "") this.placeholderEl.textContent = "No text was generated.";
  }

  /** The job cannot be watched: unknown, expired, or the token does not allow it. */
  refused(result) {
    this.stop();
    this.root.classList.add("gone");
    this.statusEl.textContent = "";
    this.setConnection("closed");
    const words =
      result.status === 404
        ? JOB_GONE
        : "This link does not allow watching this job: its viewer token is missing or wrong.";
    this.showMessage(words);
  }

  // Rendering.

  setStatus(status) {
    this.status = status;
    this.statusEl.textContent = status;
    this.root.dataset.status = status;
    document.title = `${status} · tokencast`;
  }

  setConnection(word) {
    this.connectionEl.textContent = word;
    this.root.dataset.connection = word;
    const titles = {
      connecting: "Connecting to the stream",
      live: "Receiving tokens live",
      reconnecting: "The connection dropped; resuming where it stopped",
      closed: "The stream has ended",
    };
    this.connectionEl.title = titles[word];
  }

  showMessage(words, detail) {
    this.messageEl.replaceChildren(words);
    if (detail) this.messageEl.append(h("span", { class: "detail" }, detail));
    this.messageEl.hidden = false;
  }

  renderCounters() {
    this.tokensEl.textContent = String(this.tokens);
    if (this.startedAt === null) return;
    const end = this.finishedAt ?? Date.now() + this.clockOffset;
    const ms = end - this.startedAt;
    this.elapsedEl.textContent = formatSeconds(ms);
    // Under a tenth of a second the rate says more about clocks than about the model.
    const rate = this.tokens / (ms / 1000);
    this.rateEl.textContent = ms < 100 ? "–" : rate.toFixed(rate < 100 ? 1 : 0);
  }

  // Actions.

  async copy() {
    const copied = await copyText(this.textNode.data);
    this.note(copied ? "Copied." : "Could not copy; select the text and copy it by hand.");
  }

  async cancel() {
    this.cancelButton.disabled = true;
    this.note("Cancelling…");
    const result = await request("DELETE", this.url(`/v1/jobs/${this.jobId}`));
    if (result.ok) {
      this.note("Cancel requested; the generation stops in a moment.");
      return;
    }
    if (result.status === 401 || result.status === 403) {
      this.note("Only whoever started this job can cancel it; watching does not allow it.");
      return;
    }
    this.cancelButton.disabled = result.status === 409;
    this.note(describeError(result, "cancel"));
  }

  note(words) {
    this.noteEl.textContent = words;
  }
}
