// One connection to a job's event stream, read with fetch.
//
// EventSource delivers only the event names it listens for by name, and
// producers name their own events: so the page reads the stream itself, as
// the Server-Sent Events standard says. One EventStream is one connection;
// the viewer decides when to open the next, after the last id it showed
// (sent as Last-Event-ID, as EventSource does when it reconnects).

const DEFAULT_RETRY_MS = 1000; // until the stream's `retry:` line says otherwise

export class EventStream {
  /**
   * Opens `url` at once. Then, unless `close()` comes first: `handlers.open()`
   * when the server accepts the stream (200); `handlers.event({type,
   * lastEventId, data})` for each event, in order; and `handlers.end(status)`
   * once: the HTTP status of a refused stream, or 0 when the connection failed
   * or the stream ended.
   */
  constructor(url, lastId, handlers) {
    this.handlers = handlers;
    this.retryMs = DEFAULT_RETRY_MS;
    this.controller = new AbortController();
    this.type = "";
    this.data = [];
    this.lastEventId = "";
    this.run(url, lastId);
  }

  /** Ends the connection; no handler is called after this. */
  close() {
    this.controller.abort();
  }

  get closed() {
    return this.controller.signal.aborted;
  }

  async run(url, lastId) {
    const headers = { Accept: "text/event-stream" };
    if (lastId > 0) headers["Last-Event-ID"] = String(lastId);
    let status = 0;
    try {
      const init = { headers, cache: "no-store", signal: this.controller.signal };
      const response = await fetch(url, init);
      if (response.status === 200) {
        if (!this.closed) this.handlers.open();
        await this.read(response.body);
      } else {
        status = response.status;
      }
    } catch {
      // A network error or a dropped connection (or close()): this connection is over.
    }
    if (!this.closed) this.handlers.end(status);
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let pending = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      pending += value;
      let start = 0;
      let end;
      while ((end = pending.indexOf("\n", start)) !== -1) {
        const stop = end > start && pending[end - 1] === "\r" ? end - 1 : end;
        this.line(pending.slice(start, stop));
        start = end + 1;
      }
      pending = pending.slice(start);
    }
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the keepalive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.type = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    else if (field === "retry" && /^[0-9]+$/.test(value)) this.retryMs = Number(value);
  }

  dispatch() {
    const { type, data } = this;
    this.type = "";
    this.data = [];
    if (data.length === 0 || this.closed) return;
    const event = { type: type || "message", lastEventId: this.lastEventId, data: data.join("\n") };
    try {
      this.handlers.event(event);
    } catch (error) {
      // A fault in showing one event must not end the stream; it still reaches the console.
      queueMicrotask(() => {
        throw error;
      });
    }
  }
}
