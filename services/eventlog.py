"""A job's event log: one Redis Stream per job, and its single writer.

Each event is appended to the stream under the explicit entry id
``<event id>-0`` and published on the job's channel in the same Lua script,
so live order is log order and a stale writer cannot interleave: the script
refuses a writer that is not the job's owner (fencing), and Redis itself
refuses an entry id that is not above the last one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import NoScriptError

from services import metrics
from services.errors import BrokerUnavailable
from services.events import DONE, START, TOKEN, Event, JobStatus, done_data, start_data, token_data
from services.items import Item, Text
from services.keys import Keys
from services.logscripts import (
    APPEND_BODY,
    CANCEL_BODY,
    AppendResult,
    CancelOutcome,
    append_args,
    cancel_args,
    decode_append,
    decode_cancel,
    log_script,
)
from services.redisconn import Redis, broker_errors, is_cluster

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0


class EventLog:
    """Reads a job's log. Reading is open to anyone; writing goes through ``JobWriter``."""

    def __init__(self, redis: Redis, keys: Keys):
        self.redis = redis
        self.keys = keys

    async def read(self, job_id: str, after: int, limit: int | None = None) -> list[Event]:
        """Events with ids above ``after``, in order, at most ``limit`` of them."""
        with broker_errors():
            entries: Any = await self.redis.xrange(
                self.keys.log(job_id), min=f"{after + 1}-0", max="+", count=limit
            )
        return [_entry_to_event(entry_id, fields) for entry_id, fields in entries]


def _entry_to_event(entry_id: str | bytes, fields: dict) -> Event:
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
        fields = {k.decode(): v.decode() for k, v in fields.items()}
    return Event(int(entry_id.partition("-")[0]), fields["e"], fields["d"])


# At most this many appends go in one pipeline, bounding a round trip's size.
MAX_PIPELINE = 256

# An append waiting to be sent: the script's keys, its arguments, and where its reply goes.
_Queued = tuple[list[str], list[str | int], asyncio.Future]


class LogAppender:
    """The writer side of the logs of every job this process writes: it runs
    each script that writes a log (``services.logscripts``), the appends
    several per round trip.

    An append waits while a pipeline is in flight and goes out with every
    other append queued meanwhile: with one job it is sent at once, with
    hundreds of jobs each round trip carries many. redis-py's own CPU per
    command dominates a worker's; in make bench S2 (200 jobs at 30 tokens/s)
    sharing round trips took the writer from 49 % to 33 % of a core and the
    viewers' p99 from 104 to 63 ms.
    On a Redis Cluster each append is its own call.
    """

    def __init__(self, redis: Redis):
        self.redis = redis
        self._cluster = is_cluster(redis)
        self._append_script = redis.register_script(log_script(APPEND_BODY, cluster=self._cluster))
        self._cancel_script = redis.register_script(log_script(CANCEL_BODY, cluster=self._cluster))
        self._queued: list[_Queued] = []
        self._sender: asyncio.Task | None = None

    async def append(self, keys: list[str], args: list[str | int]) -> AppendResult:
        """Append to the log of the job ``keys`` (``Keys.job_keys``) what
        ``args`` (``append_args``) hold. Raises ``Fenced`` or ``JobFinished``
        when refused, and connection failures as redis-py raises them."""
        if self._cluster:  # redis-py refuses scripts in a cluster's pipelines
            return decode_append(await self._append_script(keys=keys, args=args))
        future = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_queued())
        return decode_append(await future)

    async def cancel(
        self, keys: list[str], *, canceller: str, finished_at: str, expire_ms: int
    ) -> CancelOutcome:
        """Cancel the job ``keys`` (``Keys.job_keys``): a queued one ends now,
        owned by ``canceller``, its keys expiring after ``expire_ms``."""
        args = cancel_args(canceller, finished_at, expire_ms)
        return decode_cancel(await self._cancel_script(keys=keys, args=args))

    async def _send_queued(self) -> None:
        batch: list[_Queued] = []
        try:
            while self._queued:
                batch, self._queued = self._queued[:MAX_PIPELINE], self._queued[MAX_PIPELINE:]
                try:
                    replies = await self._pipeline(batch)
                except Exception as exc:  # each caller gets it and decides
                    replies = [exc] * len(batch)
                for (_, _, future), reply in zip(batch, replies, strict=True):
                    if future.done():  # its caller was cancelled; the append went out anyway
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        finally:
            self._sender = None
            # Only if this task was cancelled (the loop is closing): nobody will
            # send these, so their callers must not wait for ever.
            for _, _, future in batch + self._queued:
                future.cancel()
            self._queued = []

    async def _pipeline(self, batch: list[_Queued]) -> list:
        """One round trip; the replies in order, error replies as exceptions.
        A script Redis does not know (a new or restarted server) is loaded and
        its calls sent again."""
        sha = self._append_script.sha
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args, _ in batch:
                pipe.evalsha(sha, len(keys), *keys, *args)
            replies: list = await pipe.execute(raise_on_error=False)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            await self.redis.script_load(self._append_script.script)
            retried = await self._pipeline([batch[i] for i in unknown])
            for i, reply in zip(unknown, retried, strict=True):
                replies[i] = reply
        return replies


class JobWriter:
    """The single writer of one job's log, valid while ``owner`` holds the job.

    Raises ``Fenced`` once another writer has taken the job over, and
    ``JobFinished`` after the terminal event: both mean "stop writing".
    A broker outage is retried for up to ``retry_s`` (appends are idempotent),
    then raised as ``BrokerUnavailable``.
    """

    def __init__(
        self,
        appender: LogAppender,
        keys: Keys,
        job_id: str,
        owner: str,
        *,
        retention_s: float,
        last_id: int = 0,
        tokens: int = 0,
        retry_s: float = 0.0,
    ):
        self.appender = appender
        self.keys = keys
        self.job_id = job_id
        self.owner = owner
        self.retention_ms = int(retention_s * 1000)
        self.last_id = last_id
        self.tokens = tokens
        self.retry_s = retry_s

    async def start(self, model: str, created_at: str) -> AppendResult:
        return await self._append([(START, start_data(self.job_id, model, created_at), "")])

    async def append_tokens(self, texts: list[str]) -> AppendResult:
        """Append one ``token`` event per text, in one atomic step."""
        result = await self._append([(TOKEN, token_data(text), text) for text in texts])
        self.tokens += len(texts)
        return result

    # TEMPORARY, until the writer takes every event kind: answer text only.
    async def append(self, items: list[Item]) -> AppendResult:
        """Append one event per item, in one atomic step (``token`` items only, for now)."""
        texts = []
        for item in items:
            if not (isinstance(item, Text) and item.kind == TOKEN):
                raise TypeError(f"this writer appends token text only, not {item!r}")
            texts.append(item.text)
        return await self.append_tokens(texts)

    async def finish(
        self,
        status: JobStatus,
        finish_reason: str | None,
        error: dict[str, str] | None = None,
        *,
        finished_at: str,
    ) -> AppendResult:
        """Append the terminal ``done`` event; the job's keys then expire after retention."""
        fields = {"status": status, "finished_at": finished_at}
        if finish_reason:
            fields["finish_reason"] = finish_reason
        if error:
            fields["error_code"] = error["code"]
            fields["error_message"] = error["message"]
        event = (DONE, done_data(status, finish_reason, self.tokens, error), "")
        result = await self._append([event], fields, expire_ms=self.retention_ms)
        metrics.JOBS_FINISHED.labels(status).inc()
        return result

    async def _append(
        self,
        events: list[tuple[str, str, str]],
        fields: dict[str, str] | None = None,
        expire_ms: int = 0,
    ) -> AppendResult:
        args = append_args(self.owner, self.last_id, events, fields or {}, expire_ms)
        result = await self._call_with_retry(args)
        self.last_id = result.last_id
        return result

    async def _call_with_retry(self, args: list[str | int]) -> AppendResult:
        deadline = time.monotonic() + self.retry_s
        delay = RETRY_MIN_S
        while True:
            try:
                with broker_errors():
                    return await self.appender.append(self.keys.job_keys(self.job_id), args)
            except BrokerUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: broker unreachable, retrying the append", self.job_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
