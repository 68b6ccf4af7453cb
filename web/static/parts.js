// What a job streams besides its answer: the model's reasoning, its tool
// calls and its producer's own events. Each part is built empty and hidden,
// and shows once its first event arrives. Everything from the server is
// inserted as text, never as HTML.

import { h } from "./page.js";

const FOLLOW_PX = 24; // "at the bottom" slack for following the reasoning

/** The reasoning, apart from the answer: open while it streams, folded once the answer starts. */
export class Reasoning {
  constructor() {
    this.textNode = document.createTextNode("");
    this.textEl = h("div", { class: "reasoning-text", "data-testid": "reasoning" }, this.textNode);
    this.countEl = h("span", { class: "reasoning-count" });
    this.el = h(
      "details",
      { class: "reasoning", open: "", hidden: "" },
      h("summary", {}, "Reasoning", this.countEl),
      this.textEl,
    );
    this.count = 0;
    this.folded = false;
  }

  /**
   * More reasoning (`tokens` of it, when known); its box (of bounded height)
   * follows it unless the reader scrolled up.
   */
  append(text, tokens = 0) {
    const box = this.textEl;
    const following = box.scrollTop + box.clientHeight >= box.scrollHeight - FOLLOW_PX;
    this.textNode.appendData(text);
    this.el.hidden = false;
    this.count += tokens;
    const words = this.count === 1 ? "1 token" : `${this.count} tokens`;
    if (this.count > 0) this.countEl.textContent = ` · ${words}`;
    if (following) box.scrollTop = box.scrollHeight;
  }

  /** The answer has started: fold the reasoning away, once (the reader may open it again). */
  fold() {
    if (this.folded) return;
    this.folded = true;
    this.el.open = false;
  }
}

/** One tool call: its name, and its arguments as they grow. */
class ToolCard {
  constructor(id, name) {
    this.raw = "";
    this.pretty = false;
    this.argumentsNode = document.createTextNode("");
    this.el = h(
      "article",
      { class: "tool-call", "data-testid": "tool-call", "data-state": "streaming" },
      h(
        "header",
        {},
        h("span", { class: "tool-label" }, "Tool call"),
        h("span", { class: "tool-name", "data-testid": "tool-name" }, name || "?"),
        h("span", { class: "tool-id" }, id || ""),
      ),
      h("pre", { class: "tool-arguments", "data-testid": "tool-arguments" }, this.argumentsNode),
    );
  }

  /** Adds a fragment of the arguments: pretty-printed once they are whole JSON, else as sent. */
  extend(text) {
    this.raw += text;
    const whole = parseWhole(this.raw);
    if (whole !== null) {
      this.argumentsNode.data = JSON.stringify(whole, null, 2);
      this.el.dataset.state = "complete";
    } else if (this.pretty) {
      this.argumentsNode.data = this.raw;
    } else {
      this.argumentsNode.appendData(text);
    }
    this.pretty = whole !== null;
  }

  end() {
    this.el.dataset.state = "complete";
  }
}

/** `text` parsed when it is a whole JSON object or array, else null (cheap for a partial one). */
function parseWhole(text) {
  const trimmed = text.trimEnd();
  if (!trimmed.endsWith("}") && !trimmed.endsWith("]")) return null;
  try {
    return JSON.parse(trimmed);
  } catch {
    return null;
  }
}

/** The tool calls, one card per `index`, in the order they began. */
export class ToolCalls {
  constructor() {
    this.cards = new Map();
    this.el = h("div", { class: "tool-calls", hidden: "" });
  }

  /** A `tool_call` event: a call's first fragment (with `id` and `name`) or a later one. */
  add(fragment) {
    let card = this.cards.get(fragment.index);
    if (!card) {
      card = new ToolCard(fragment.id, fragment.name);
      this.cards.set(fragment.index, card);
      this.el.append(card.el);
      this.el.hidden = false;
    }
    card.extend(fragment.arguments || "");
  }

  /** The assembled calls of a job's state (`tool_calls`), shown when nothing streamed them. */
  show(calls) {
    if (this.cards.size > 0) return;
    calls.forEach((call, index) => {
      const { name, arguments: args } = call.function;
      this.add({ index, id: call.id, name, arguments: args });
    });
    this.end();
  }

  /** The job has ended: no call grows any more. */
  end() {
    for (const card of this.cards.values()) card.end();
  }
}

/** A producer's own events, each with its name and its data on one line. */
export class EventList {
  constructor() {
    this.list = h("ol", { class: "event-list" });
    this.el = h(
      "section",
      { class: "events", "aria-label": "Events", hidden: "" },
      h("h2", {}, "Events"),
      this.list,
    );
  }

  add(name, id, data) {
    const item = h(
      "li",
      { class: "event", "data-testid": "event", "data-name": name, "data-id": String(id) },
      h("span", { class: "event-name" }, name),
      h("code", { class: "event-data" }, JSON.stringify(data)),
    );
    this.list.append(item);
    this.el.hidden = false;
  }
}
