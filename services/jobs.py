"""Jobs: what a job asks for, its state, and the operations on it.

A job's state lives in one Redis hash (``Keys.job``); its text and its
reasoning in strings the writer appends to, its tool-call fragments in a
list; its events in the log (``services.eventlog``).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from services import metrics
from services.errors import JobFinished, JobNotFound, QueueFull
from services.eventlog import LogAppender
from services.events import JobStatus
from services.keys import Keys
from services.logscripts import CancelOutcome
from services.producers import EXTERNAL, ExternalJobs, external_fields, is_external
from services.queue import JobQueue
from services.redisconn import Redis, broker_errors
from services.viewers import ViewerCounts

# 22 URL-safe characters. The first is never "-", so an id typed on a command
# line (`tokencast watch <id>`) is never taken for an option: 21 characters of
# 6 random bits and one of log2(63) make 131.9 random bits.
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
URL_SAFE = string.ascii_letters + string.digits + "_-"


def new_job_id() -> str:
    first = secrets.choice(URL_SAFE[:-1])
    return first + "".join(secrets.choice(URL_SAFE) for _ in range(21))


def is_job_id(value: str) -> bool:
    return JOB_ID_PATTERN.fullmatch(value) is not None


def now_iso() -> str:
    """UTC time as ``2026-11-24T10:00:00.000Z``."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class JobSpec:
    """What a job asks for: already validated by the web tier.

    Exactly one of ``prompt`` and ``messages`` is set; ``messages``, ``tools``
    and ``tool_choice`` are OpenAI's chat fields, as the client sent them.
    """

    prompt: str | None
    model: str
    max_tokens: int = 256
    temperature: float | None = None
    seed: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # "external": its events come over HTTP (services.producers), never from the queue.
    producer: str = "worker"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> JobSpec:
        return cls(**json.loads(raw))


class Submitted(NamedTuple):
    """A job as its worker starts it."""

    spec: JobSpec
    created_at: str
    reasoning_tokens: int


@dataclass(frozen=True)
class JobState:
    """A job as ``GET /v1/jobs/<id>`` shows it."""

    id: str
    status: JobStatus
    model: str
    created_at: str
    started_at: str | None
    finished_at: str | None
    tokens: int
    last_event_id: int
    text: str
    reasoning: str
    # OpenAI's shape: [{"id", "type": "function", "function": {"name", "arguments"}}]
    tool_calls: list[dict[str, Any]]
    error: dict[str, str] | None
    finish_reason: str | None
    viewers: int
    metadata: dict[str, str]
    producer: str = "worker"

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def to_api(self) -> dict[str, Any]:
        body = asdict(self)
        body["last_event_id"] = str(self.last_event_id)
        return body


def assemble_tool_calls(fragments: list[str]) -> list[dict[str, Any]]:
    """The calls that ``tool_call`` fragments (their events' data, in log order)
    add up to, in order of their index's first fragment: OpenAI's
    ``[{"id", "type": "function", "function": {"name", "arguments"}}]``."""
    calls: dict[int, dict[str, Any]] = {}
    arguments: dict[int, list[str]] = {}
    for raw in fragments:
        fragment = json.loads(raw)
        index = fragment["index"]
        if index not in calls:  # the writer made sure the first one has id and name
            function = {"name": fragment["name"], "arguments": ""}
            calls[index] = {"id": fragment["id"], "type": "function", "function": function}
            arguments[index] = []
        arguments[index].append(fragment["arguments"])
    for index, call in calls.items():
        call["function"]["arguments"] = "".join(arguments[index])
    return list(calls.values())


@dataclass(frozen=True, slots=True)
class JobHead:
    """What every OpenAI chunk of a job repeats: its id, model and creation time."""

    id: str
    model: str
    created_at: str


@dataclass(frozen=True)
class StreamPosition:
    """What a new stream needs to know before it starts."""

    last_event_id: int
    finished: bool


# The job hash's fields a job's state shows (``JobStore.get``).
STATE_FIELDS = [
    "status",
    "model",
    "created_at",
    "started_at",
    "finished_at",
    "tokens",
    "last_event_id",
    "error_code",
    "error_message",
    "finish_reason",
    "metadata",
    "producer",
]


class JobStore:
    """Creates, reads and cancels jobs."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue: JobQueue,
        viewers: ViewerCounts,
        appender: LogAppender,  # for cancels: they end a queued job's log
        producers: ExternalJobs,
        *,
        retention_s: float,
        max_queued_jobs: int,
    ):
        self.redis = redis
        self.keys = keys
        self.retention_s = retention_s
        self.max_queued_jobs = max_queued_jobs
        self.queue = queue
        self.viewers = viewers
        self.appender = appender
        self.producers = producers

    async def create(self, spec: JobSpec, producer_token: str | None = None) -> JobState:
        """Store a new job and queue it. Raises ``QueueFull`` past the queue limit.

        An external job (``spec.producer``) is not queued: it takes
        ``producer_token`` and its lease starts now."""
        job_id = new_job_id()
        created_at = now_iso()
        fields: dict[str, str | int] = {
            "status": JobStatus.QUEUED,
            "model": spec.model,
            "created_at": created_at,
            "spec": spec.to_json(),
            # Apart from the spec (up to 1 MiB with a conversation), so
            # reading a job's state never parses the spec.
            "metadata": json.dumps(spec.metadata),
            "last_event_id": 0,
            "tokens": 0,
            "attempts": 0,
        }
        external = spec.producer == EXTERNAL
        if external:
            if producer_token is None:
                raise ValueError("an external job needs its producer token")
            fields.update(external_fields(producer_token))
        with broker_errors():
            await self.redis.hset(self.keys.job(job_id), mapping=fields)  # type: ignore[arg-type]
            if external:
                await self.producers.open(job_id, str(fields["owner"]))
            elif not await self.queue.enqueue(job_id, limit=self.max_queued_jobs):
                await self.redis.delete(self.keys.job(job_id))
                raise QueueFull(
                    f"{self.max_queued_jobs} jobs are already waiting for a worker"
                    " (TOKENCAST_MAX_QUEUED_JOBS)"
                )
        metrics.JOBS_CREATED.inc()
        return JobState(
            id=job_id,
            status=JobStatus.QUEUED,
            model=spec.model,
            created_at=created_at,
            started_at=None,
            finished_at=None,
            tokens=0,
            last_event_id=0,
            text="",
            reasoning="",
            tool_calls=[],
            error=None,
            finish_reason=None,
            viewers=0,
            metadata=spec.metadata,
            producer=spec.producer,
        )

    async def get(self, job_id: str) -> JobState:
        """The job's state; raises ``JobNotFound`` for an unknown or expired job."""
        with broker_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hmget(self.keys.job(job_id), STATE_FIELDS)
                pipe.get(self.keys.text(job_id))
                pipe.get(self.keys.reasoning(job_id))
                pipe.lrange(self.keys.tool_calls(job_id), 0, -1)
                values, text, reasoning, fragments = await pipe.execute()
            fields = zip(STATE_FIELDS, values, strict=True)
            raw = {name: value for name, value in fields if value is not None}
            if "status" not in raw:
                raise JobNotFound(f"no job with id {job_id!r} (unknown, or expired)")
            viewers = await self.viewers.total(job_id)
            if "metadata" not in raw:  # a job stored before its metadata had a field
                raw["metadata"] = json.dumps((await self.spec(job_id)).metadata)
        error = None
        if raw.get("error_code"):
            error = {"code": raw["error_code"], "message": raw.get("error_message", "")}
        return JobState(
            id=job_id,
            status=JobStatus(raw["status"]),
            model=raw["model"],
            created_at=raw["created_at"],
            started_at=raw.get("started_at"),
            finished_at=raw.get("finished_at"),
            tokens=int(raw.get("tokens", 0)),
            last_event_id=int(raw.get("last_event_id", 0)),
            text=text or "",
            reasoning=reasoning or "",
            tool_calls=assemble_tool_calls(fragments),
            error=error,
            finish_reason=raw.get("finish_reason"),
            viewers=viewers,
            metadata=json.loads(raw["metadata"]),
            producer=raw.get("producer", "worker"),
        )

    async def spec(self, job_id: str) -> JobSpec:
        """What the job asked for; raises ``JobNotFound``."""
        return (await self.submitted(job_id)).spec

    async def submitted(self, job_id: str) -> Submitted:
        """What the job asked for, when, and how far its writers got with the
        reasoning count (a retried job goes on from it); raises ``JobNotFound``."""
        with broker_errors():
            fields: list[str | None] = await self.redis.hmget(  # type: ignore[assignment]
                self.keys.job(job_id), ["spec", "created_at", "reasoning_tokens"]
            )
        raw, created_at, reasoning_tokens = fields
        if raw is None or created_at is None:
            raise JobNotFound(f"no job with id {job_id!r} (unknown, or expired)")
        return Submitted(JobSpec.from_json(raw), created_at, int(reasoning_tokens or 0))

    async def exists(self, job_id: str) -> bool:
        with broker_errors():
            return bool(await self.redis.exists(self.keys.job(job_id)))

    async def head(self, job_id: str) -> JobHead:
        """The job's id, model and creation time; raises ``JobNotFound``."""
        with broker_errors():
            fields: list[str | None] = await self.redis.hmget(  # type: ignore[assignment]
                self.keys.job(job_id), ["model", "created_at"]
            )
        model, created_at = fields
        if model is None or created_at is None:
            raise JobNotFound(f"no job with id {job_id!r} (unknown, or expired)")
        return JobHead(job_id, model, created_at)

    async def position(self, job_id: str) -> StreamPosition:
        """Where the job's log ends; raises ``JobNotFound``."""
        with broker_errors():
            last, finished_at = await self.redis.hmget(
                self.keys.job(job_id), ["last_event_id", "finished_at"]
            )
        if last is None:
            raise JobNotFound(f"no job with id {job_id!r} (unknown, or expired)")
        return StreamPosition(int(last), finished_at is not None)

    async def cancel(self, job_id: str) -> JobState:
        """Cancel a job. A queued one ends at once; a running one within 250 ms.

        Raises ``JobNotFound`` or ``JobFinished``.
        """
        with broker_errors():
            outcome = await self.appender.cancel(
                self.keys.job_keys(job_id),
                canceller=f"cancel:{new_job_id()}",
                finished_at=now_iso(),
                expire_ms=int(self.retention_s * 1000),
            )
            if outcome is CancelOutcome.ENDED:
                await self.queue.forget_waiting(job_id)
                metrics.JOBS_FINISHED.labels(JobStatus.CANCELLED).inc()
        if outcome is CancelOutcome.GONE:
            raise JobNotFound(f"no job with id {job_id!r} (unknown, or expired)")
        if outcome is CancelOutcome.FINISHED:
            raise JobFinished(f"job {job_id} has already finished")
        if outcome is CancelOutcome.FLAGGED and await is_external(self.redis, self.keys, job_id):
            # No worker watches for the flag: end it now; its producer's next publish gets 409.
            await self.producers.end(job_id, now_iso(), cancel=True)
        return await self.get(job_id)
