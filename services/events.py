"""The events of a job's log: what they hold and how they travel.

An event is ``(id, name, data)``: ids are 1, 2, 3 … per job, ``name`` is one
of ``KINDS`` or a producer's custom event name, and ``data`` is one line of
compact JSON. On the pub/sub channel an event travels as
``"<id> <appended ms> <name> <data>"``.

``KINDS`` is the one list of event kinds: what each counts in the job's
state, and what merges with what (``services.resume.coalesce``). The log's
Lua, the merge, the job state and every output format read it; a new kind is
added here first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

START = "start"
TOKEN = "token"
REASONING = "reasoning"
TOOL_CALL = "tool_call"
DONE = "done"
CUSTOM = "event"  # the kind of every custom event, whatever its name


class Merge(Enum):
    """Which consecutive events of a kind merge into one for a viewer that is behind."""

    NEVER = "never"
    RUN = "run"  # every consecutive event of the kind: their texts concatenate
    SAME_INDEX = "same_index"  # consecutive fragments of one ``index``: arguments concatenate


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of event: its name, how it merges, what it counts.

    ``counter`` is the job hash field counting its events (``done`` reports
    it); ``None`` when they are not counted.
    """

    name: str
    merge: Merge = Merge.NEVER
    counter: str | None = None


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(START),
        Kind(TOKEN, Merge.RUN, "tokens"),
        Kind(REASONING, Merge.RUN, "reasoning_tokens"),
        Kind(TOOL_CALL, Merge.SAME_INDEX),
        Kind(DONE),
        Kind(CUSTOM),  # stands for every custom event name
    )
}


def kind_of(name: str) -> Kind:
    """The kind of an event named ``name``: any name not in ``KINDS`` is a custom event."""
    return KINDS.get(name) or KINDS[CUSTOM]


# Event names as Lua locals (``local TOKEN = 'token'`` …), for the log's scripts.
LUA_KINDS = "".join(f"local {name.upper()} = '{name}'\n" for name in (TOKEN, REASONING, TOOL_CALL))


class JobStatus(StrEnum):
    """A job's status, as its hash, ``GET /v1/jobs/<id>`` and the ``done`` event spell it."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """The job has its ``done`` event: it never changes status again."""
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


# The statuses a ``done`` event carries, by their short names.
COMPLETED, FAILED, CANCELLED = JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED

# Every status as a Lua local (``local QUEUED = 'queued'`` …): the scripts that
# read or set a status start with this, so Lua never spells one itself.
LUA_STATUSES = "".join(f"local {status.name} = '{status.value}'\n" for status in JobStatus)


def dumps(value: Any) -> str:
    """Compact JSON on one line (control characters and newlines are escaped)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Event:
    """One event of a job's log.

    ``frames`` caches the encoded frame per output format, so a live event is
    encoded once per node however many viewers receive it.
    """

    __slots__ = ("appended_ms", "data", "frames", "id", "name")

    def __init__(self, id: int, name: str, data: str, appended_ms: int = 0):
        self.id = id
        self.name = name
        self.data = data
        # When the writer appended it (Redis clock, ms); 0 when read from the log.
        self.appended_ms = appended_ms
        self.frames: dict[str, bytes] = {}

    def payload(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.data)
        return result

    @classmethod
    def from_message(cls, message: str) -> Event:
        """Parse a pub/sub message ``<id> <appended ms> <name> <data>``;
        raises ``ValueError`` if it is not one."""
        event_id, appended_ms, name, data = message.split(" ", 3)
        return cls(int(event_id), name, data, int(appended_ms))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.id, self.name, self.data) == (other.id, other.name, other.data)

    def __repr__(self) -> str:
        return f"Event({self.id}, {self.name!r}, {self.data!r})"


def start_data(job_id: str, model: str, created_at: str) -> str:
    return dumps({"job_id": job_id, "model": model, "created_at": created_at})


def token_data(text: str, first_id: int | None = None) -> str:
    """The data of a ``token`` or ``reasoning`` event (``first_id`` when merged)."""
    if first_id is None:
        return dumps({"text": text})
    return dumps({"text": text, "first_id": first_id})


def tool_call_data(
    index: int,
    arguments: str,
    call_id: str | None = None,
    name: str | None = None,
    first_id: int | None = None,
) -> str:
    """The data of a ``tool_call`` fragment: ``id`` and ``name`` on a call's first one only."""
    body: dict[str, Any] = {"index": index}
    if call_id is not None:
        body["id"] = call_id
    if name is not None:
        body["name"] = name
    body["arguments"] = arguments
    if first_id is not None:
        body["first_id"] = first_id
    return dumps(body)


def done_data(
    status: JobStatus,
    finish_reason: str | None,
    tokens: int,
    error: dict[str, str] | None = None,
    reasoning_tokens: int = 0,
) -> str:
    body: dict[str, Any] = {
        "status": status,
        "finish_reason": finish_reason,
        "tokens": tokens,
        "reasoning_tokens": reasoning_tokens,
    }
    if error is not None:
        body["error"] = error
    return dumps(body)
