"""The events of a job's log: what they hold and how they travel.

An event is ``(id, name, data)``: ids are 1, 2, 3 … per job, ``name`` is
``start``, ``token`` or ``done``, and ``data`` is one line of compact JSON.
On the pub/sub channel an event travels as ``"<id> <appended ms> <name> <data>"``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

START = "start"
TOKEN = "token"
DONE = "done"


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
    if first_id is None:
        return dumps({"text": text})
    return dumps({"text": text, "first_id": first_id})


def done_data(
    status: JobStatus,
    finish_reason: str | None,
    tokens: int,
    error: dict[str, str] | None = None,
) -> str:
    body: dict[str, Any] = {"status": status, "finish_reason": finish_reason, "tokens": tokens}
    if error is not None:
        body["error"] = error
    return dumps(body)
