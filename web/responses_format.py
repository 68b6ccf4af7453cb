"""A job as an OpenAI Response (API.md, "OpenAI Responses API"): its stream events and its object.

``ResponseEncoder`` folds a job's events, in id order, into the Responses
stream: ``start`` → ``response.created`` and ``response.in_progress``; each
``reasoning``, ``token`` and ``tool_call`` → a delta of its output item,
opened (``output_item.added``, and a content part for text) when the kind of
output changes and closed (the ``.done`` events) when the next item opens or
the job ends; ``done`` → ``response.completed``, ``response.incomplete``
(``length``, or a cancelled job) or ``response.failed``.

Sequence numbers are a pure function of the log, so any node, any replay and
any resume number every output alike: the outputs of the event with id ``b``
(merged from ``a``, its ``first_id``, to ``b``) are numbered ``10·a + 0, 1, …``
and the last of them ``10·b + 9``. An event expands to at most 8 outputs, so
numbers never collide; a merged delta stands for several events, and leaves
the gaps their own numbers would have taken. The delta is always an event's
last output, which is what makes a resume from any number exact
(``resume_base``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.events import CANCELLED, COMPLETED, DONE, FAILED, START, TOKEN, Event, dumps
from web.sse import COMMENT_KEEPALIVE_FRAME, Encoding

STRIDE = 10  # sequence numbers per event id
LAST = STRIDE - 1  # the slot of an event's last output
FRAME_KEY = "responses"

# Event kinds of the log this format maps (API.md, "The event stream").
REASONING = "reasoning"
TOOL_CALL = "tool_call"

QUEUED = "queued"
IN_PROGRESS = "in_progress"
INCOMPLETE = "incomplete"

MESSAGE_ITEM = "message"
REASONING_ITEM = "reasoning"
CALL_ITEM = "function_call"

CREATED_EVENT = "response.created"
IN_PROGRESS_EVENT = "response.in_progress"
ADDED_EVENT = "response.output_item.added"
ITEM_DONE_EVENT = "response.output_item.done"
PART_ADDED_EVENT = "response.content_part.added"
PART_DONE_EVENT = "response.content_part.done"
# Per kind of item: its delta event, and the event that gives its whole text.
DELTA_EVENTS = {
    MESSAGE_ITEM: "response.output_text.delta",
    REASONING_ITEM: "response.reasoning_text.delta",
    CALL_ITEM: "response.function_call_arguments.delta",
}
TEXT_DONE_EVENTS = {
    MESSAGE_ITEM: "response.output_text.done",
    REASONING_ITEM: "response.reasoning_text.done",
    CALL_ITEM: "response.function_call_arguments.done",
}
ENDING_EVENTS = {
    COMPLETED: "response.completed",
    INCOMPLETE: "response.incomplete",
    CANCELLED: "response.incomplete",  # the SDK has no response.cancelled event
    FAILED: "response.failed",
}


def response_id(job_id: str) -> str:
    return f"resp_{job_id}"


def resume_base(after: int) -> int:
    """The event id to replay the log from for a resume after sequence number ``after``.

    When ``after`` is an event's last output, the client has all of that
    event: replay after it. Otherwise it lacks the event's last output, its
    delta, so replay from the event itself (merged with the ones after it,
    if the log merges them: the client had none of their text) and drop the
    outputs numbered up to ``after``.
    """
    event_id, slot = divmod(after, STRIDE)
    return event_id if slot == LAST else max(event_id - 1, 0)


@dataclass(frozen=True)
class ResponseHead:
    """What the response object says that the log does not: the job and its request."""

    job_id: str
    model: str
    created_at: int  # seconds since the epoch
    instructions: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)  # Responses-style
    tool_choice: str | dict[str, Any] = "auto"
    temperature: float | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def body(self, status: str, output: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        """The ``response`` object; ``fields`` sets ``error``, ``incomplete_details``, ``usage``."""
        body: dict[str, Any] = {
            "id": response_id(self.job_id),
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "temperature": self.temperature,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "top_p": None,
            "usage": None,
        }
        body.update(fields)
        return body


@dataclass
class Item:
    """One output item: the reasoning, the answer, or one function call."""

    kind: str
    id: str
    output_index: int
    pieces: list[str] = field(default_factory=list)  # its text (a call's arguments) so far
    call_id: str = ""
    name: str = ""
    status: str = IN_PROGRESS

    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    def part(self, text: str) -> dict[str, Any]:
        if self.kind == REASONING_ITEM:
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": []}

    def body(self, added: bool = False) -> dict[str, Any]:
        """The item as ``output`` lists it; ``added``: as it is when it opens."""
        status = IN_PROGRESS if added else self.status
        if self.kind == CALL_ITEM:
            return {
                "type": CALL_ITEM,
                "id": self.id,
                "call_id": self.call_id,
                "name": self.name,
                "arguments": "" if added else self.text(),
                "status": status,
            }
        content = [] if added else [self.part(self.text())]
        if self.kind == REASONING_ITEM:
            return {
                "type": REASONING_ITEM,
                "id": self.id,
                "summary": [],
                "content": content,
                "status": status,
            }
        return {
            "type": MESSAGE_ITEM,
            "id": self.id,
            "status": status,
            "role": "assistant",
            "content": content,
        }


# One output of an event, before it is numbered and rendered:
# (its type, the item it concerns or None, a delta's text).
Step = tuple[str, Item | None, str]


class StatefulEncoding(Encoding):
    """An encoding whose frames depend on the events before them: every event
    goes through ``frame``, so a joined batch is never taken from the cache."""

    __slots__ = ()

    def frames(self, batch: list[Event], after: int) -> bytes:
        return b"".join(self.frame(event) for event in batch)


class ResponseEncoder:
    """One stream's (or one request's) view of a job as a Response, built by folding its events.

    ``apply`` must see every event of the log in order, from the first
    (merged ones are fine). A frame is a pure function of the log up to its
    event, so it is cached on the event and shared by every viewer of the
    job on this node; ``after`` drops the first event's outputs numbered up
    to it (a resume inside that event's outputs).
    """

    def __init__(self, head: ResponseHead, after: int | None = None):
        self.head = head
        self.after = after
        self.status = QUEUED
        self.items: list[Item] = []
        self.open: Item | None = None
        self.calls: dict[int, Item] = {}
        self.reasoning_events = 0
        self.first_id = 0
        self.ending: dict[str, Any] = {}  # error, incomplete_details, usage once done

    @property
    def finished(self) -> bool:
        return self.status not in (QUEUED, IN_PROGRESS)

    def encoding(self) -> Encoding:
        return StatefulEncoding(FRAME_KEY, self.frame, COMMENT_KEEPALIVE_FRAME)

    def frame(self, event: Event) -> bytes:
        steps = self.apply(event)
        after, self.after = self.after, None
        cached = event.frames.get(FRAME_KEY)
        if cached is not None and after is None:
            return cached
        numbered = self._numbered(event, steps)
        if after is not None:
            return b"".join(self._sse(seq, step) for seq, step in numbered if seq > after)
        frame = event.frames[FRAME_KEY] = b"".join(self._sse(seq, step) for seq, step in numbered)
        return frame

    def apply(self, event: Event) -> list[Step]:
        """Fold ``event`` in; its outputs, in order."""
        name = event.name
        if name not in (START, TOKEN, REASONING, TOOL_CALL, DONE):
            return []  # custom events have no place in a Response
        data = event.payload()
        self.first_id = int(data.get("first_id", event.id))
        steps: list[Step] = []
        if self.status == QUEUED:
            self.status = IN_PROGRESS
            steps += [(CREATED_EVENT, None, ""), (IN_PROGRESS_EVENT, None, "")]
        if name == TOKEN:
            self._delta(steps, MESSAGE_ITEM, data["text"])
        elif name == REASONING:
            self.reasoning_events += event.id - self.first_id + 1  # a merged one stands for several
            self._delta(steps, REASONING_ITEM, data["text"])
        elif name == TOOL_CALL:
            self._call(steps, data)
        elif name == DONE:
            self._finish(steps, data)
        return steps

    def snapshot(self, status: str | None = None) -> dict[str, Any]:
        """The response object as the events so far make it (``status`` overrides theirs)."""
        output = [item.body() for item in self.items]
        return self.head.body(status or self.status, output, **self.ending)

    def _delta(self, steps: list[Step], kind: str, text: str) -> None:
        item = self.open
        if item is None or item.kind != kind:
            self._close(steps, COMPLETED)
            item = self._add(steps, kind)
            steps.append((PART_ADDED_EVENT, item, ""))
        item.pieces.append(text)
        steps.append((DELTA_EVENTS[kind], item, text))

    def _call(self, steps: list[Step], data: dict[str, Any]) -> None:
        index = int(data.get("index", 0))
        item = self.calls.get(index)
        if item is None:
            self._close(steps, COMPLETED)
            item = self.calls[index] = self._add(steps, CALL_ITEM, suffix=f"_{index}")
            item.call_id = data.get("id") or ""
            item.name = data.get("name") or ""
        # A fragment of a call whose item was closed (its producer interleaved
        # calls) still goes to that item: nothing of the arguments is lost.
        text = data.get("arguments") or ""
        item.pieces.append(text)
        steps.append((DELTA_EVENTS[CALL_ITEM], item, text))

    def _add(self, steps: list[Step], kind: str, suffix: str = "") -> Item:
        prefix = {MESSAGE_ITEM: "msg", REASONING_ITEM: "rs", CALL_ITEM: "fc"}[kind]
        if not suffix and any(item.kind == kind for item in self.items):
            suffix = f"_{len(self.items)}"  # a second item of its kind needs an id of its own
        item = Item(kind, f"{prefix}_{self.head.job_id}{suffix}", len(self.items))
        self.items.append(item)
        self.open = item
        steps.append((ADDED_EVENT, item, ""))
        return item

    def _close(self, steps: list[Step], status: str) -> None:
        item, self.open = self.open, None
        if item is None:
            return
        item.status = status
        steps.append((TEXT_DONE_EVENTS[item.kind], item, ""))
        if item.kind != CALL_ITEM:
            steps.append((PART_DONE_EVENT, item, ""))
        steps.append((ITEM_DONE_EVENT, item, ""))

    def _finish(self, steps: list[Step], data: dict[str, Any]) -> None:
        status, reason = data["status"], data.get("finish_reason")
        if status == COMPLETED and reason == "length":
            status = INCOMPLETE
            self.ending["incomplete_details"] = {"reason": "max_output_tokens"}
        elif status == FAILED:
            error = data.get("error") or {}
            self.ending["error"] = {
                "code": error.get("code", "backend_error"),
                "message": error.get("message", "the job failed"),
            }
        self._close(steps, COMPLETED if status == COMPLETED else INCOMPLETE)
        tokens = int(data.get("tokens", 0))
        reasoning = int(data.get("reasoning_tokens", self.reasoning_events))
        self.ending["usage"] = {
            "input_tokens": 0,  # jobs do not count prompt tokens
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens + reasoning,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": tokens + reasoning,
        }
        self.status = status
        steps.append((ENDING_EVENTS[status], None, ""))

    def _numbered(self, event: Event, steps: list[Step]) -> list[tuple[int, Step]]:
        if not steps:
            return []
        first = self.first_id  # as ``apply`` found it in the event just folded
        numbered = [(first * STRIDE + slot, step) for slot, step in enumerate(steps[:-1])]
        numbered.append((event.id * STRIDE + LAST, steps[-1]))
        return numbered

    def _sse(self, seq: int, step: Step) -> bytes:
        kind, item, delta = step
        body = self._render(seq, kind, item, delta)
        return f"id: {seq}\nevent: {kind}\ndata: {dumps(body)}\n\n".encode()

    def _render(self, seq: int, kind: str, item: Item | None, delta: str) -> dict[str, Any]:
        body: dict[str, Any] = {"type": kind, "sequence_number": seq}
        if item is None:  # the response's own events
            if kind in (CREATED_EVENT, IN_PROGRESS_EVENT):
                body["response"] = self.head.body(IN_PROGRESS, [])
            else:
                body["response"] = self.snapshot()
            return body
        body["output_index"] = item.output_index
        if kind == ADDED_EVENT or kind == ITEM_DONE_EVENT:
            body["item"] = item.body(added=kind == ADDED_EVENT)
            return body
        body["item_id"] = item.id
        if item.kind != CALL_ITEM:
            body["content_index"] = 0
        if kind == PART_ADDED_EVENT or kind == PART_DONE_EVENT:
            body["part"] = item.part("" if kind == PART_ADDED_EVENT else item.text())
            return body
        if kind == DELTA_EVENTS[item.kind]:
            body["delta"] = delta
        elif item.kind == CALL_ITEM:
            body["arguments"] = item.text()
        else:
            body["text"] = item.text()
        if item.kind == MESSAGE_ITEM:
            body["logprobs"] = []  # the SDK's text events require the list
        return body
