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
from collections import deque
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any, TypeVar

from redis.exceptions import NoScriptError

from services import metrics
from services.errors import BrokerUnavailable, Fenced, LogBehind
from services.events import (
    DONE,
    REASONING,
    START,
    TOKEN,
    TOOL_CALL,
    Event,
    JobStatus,
    done_data,
    dumps,
    kind_of,
    start_data,
    token_data,
    tool_call_data,
)
from services.items import (
    CustomEvent,
    InvalidItem,
    Text,
    ToolCallFragment,
    is_custom_name,
)
from services.keys import Keys
from services.logscripts import (
    APPEND_BODY,
    CANCEL_BODY,
    RESTORE_BODY,
    AppendResult,
    CancelOutcome,
    append_args,
    cancel_args,
    decode_append,
    decode_cancel,
    decode_restore,
    log_script,
    restore_args,
)
from services.redisconn import Redis, broker_errors, is_cluster
from services.retry import Backoff

log = logging.getLogger(__name__)

_Reply = TypeVar("_Reply")

RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0

# A writer keeps its last this many events, to put back what a promoted
# replica lacks. Replication normally lags by milliseconds; this covers
# seconds of the fastest generations (25 s at 200 tokens/s) for about
# 200 KB per running job. A log that lost more cannot be restored: the
# writer stops as if fenced, and the job ends when its lease runs out.
RESTORE_WINDOW = 5000


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

# Round trips of appends start at least this long apart: the first after a
# quiet spell goes at once, and under load each carries all that queued
# meanwhile. Redis spends about as much on a round trip (reading, replying, a
# write to each subscriber) as on a script: at bench S2's pace (6000 appends/s,
# one event each) a gap of 0 / 1 / 2 / 5 ms cost Redis 41-44 / 30-33 / 24-26 /
# 21-23 us per append (tests/benchmarks/append_cost.py --rate 6000), for at
# most that much more per append.
MIN_ROUND_TRIP_GAP_S = 0.002

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
    viewers' p99 from 104 to 63 ms. Round trips start at least
    ``MIN_ROUND_TRIP_GAP_S`` apart, so that under load each carries more.
    On a Redis Cluster each append is its own call.
    """

    def __init__(self, redis: Redis):
        self.redis = redis
        self._cluster = is_cluster(redis)
        self._append_script = redis.register_script(log_script(APPEND_BODY, cluster=self._cluster))
        self._cancel_script = redis.register_script(log_script(CANCEL_BODY, cluster=self._cluster))
        self._restore_script = redis.register_script(
            log_script(RESTORE_BODY, cluster=self._cluster)
        )
        self._queued: list[_Queued] = []
        self._sender: asyncio.Task | None = None
        self._sent_at = float("-inf")  # when the last round trip started (loop time)

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

    async def restore(self, keys: list[str], args: list[str | int]) -> int:
        """Put back, in the log of the job ``keys``, the events ``args``
        (``restore_args``) hold; returns the log's last id. Raises ``Fenced``
        or ``JobFinished`` when refused. Rare (after a failover): not pipelined."""
        return decode_restore(await self._restore_script(keys=keys, args=args))

    async def _send_queued(self) -> None:
        batch: list[_Queued] = []
        loop = asyncio.get_running_loop()
        try:
            while self._queued:
                wait_s = self._sent_at + MIN_ROUND_TRIP_GAP_S - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                self._sent_at = loop.time()
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


# What a writer appends: the items that become events (``Finish`` and
# ``Failure`` end the job through ``JobWriter.finish`` instead).
EventItem = Text | ToolCallFragment | CustomEvent


class JobWriter:
    """The single writer of one job's log, valid while ``owner`` holds the job.

    Raises ``Fenced`` once another writer has taken the job over, and
    ``JobFinished`` after the terminal event: both mean "stop writing".
    A broker outage is retried for up to ``retry_s`` (appends are idempotent),
    then raised as ``BrokerUnavailable``. ``tokens`` and ``reasoning_tokens``
    count the job's ``token`` and ``reasoning`` events, for its ``done``.

    A log that ends before this writer's last event (a promoted replica
    lacked the last writes) gets those events back, the same ids and data,
    before the next append goes on (``_restore``): within ``RESTORE_WINDOW``
    events; past it the writer raises ``Fenced``.
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
        reasoning_tokens: int = 0,
        tool_calls: dict[int, tuple[str, str]] | None = None,
        retry_s: float = 0.0,
    ):
        self.appender = appender
        self.keys = keys
        self.job_id = job_id
        self.owner = owner
        self.retention_ms = int(retention_s * 1000)
        self.last_id = last_id
        self.tokens = tokens
        self.reasoning_tokens = reasoning_tokens
        self.retry_s = retry_s
        # Each tool call's id and name, by index: given by its first fragment only
        # (``tool_calls``: those an earlier writer of the job already appended).
        self._tool_calls: dict[int, tuple[str, str]] = dict(tool_calls or {})
        # The events this writer appended lately, the last one of id last_id.
        self._recent: deque[tuple[str, str, str]] = deque(maxlen=RESTORE_WINDOW)

    async def start(self, model: str, created_at: str) -> AppendResult:
        return await self._append([(START, start_data(self.job_id, model, created_at), "")])

    async def append(self, items: list[EventItem]) -> AppendResult:
        """Append one event per item, in one atomic step.

        A tool call's first fragment (of its ``index``) must carry ``id`` and
        ``name``, and later ones may not change them (they are left out of
        the log). At a bad item, the items before it are appended and
        ``InvalidItem`` is raised, naming the field.
        """
        events: list[tuple[str, str, str]] = []
        counts: dict[str, int] = {}
        invalid: InvalidItem | None = None
        for item in items:
            try:
                event = self._event_of(item)
            except InvalidItem as exc:
                invalid = exc
                break
            events.append(event)
            name = kind_of(event[0]).name
            counts[name] = counts.get(name, 0) + 1
        if events or invalid is None:
            result = await self._append(events)
            self.tokens += counts.get(TOKEN, 0)
            self.reasoning_tokens += counts.get(REASONING, 0)
            for name, count in counts.items():
                metrics.EVENTS_APPENDED.labels(name).inc(count)
        if invalid is not None:
            raise invalid
        return result

    def _event_of(self, item: EventItem) -> tuple[str, str, str]:
        """(name, data, text piece) of the event ``item`` stands for."""
        if isinstance(item, Text):
            return item.kind, token_data(item.text), item.text
        if isinstance(item, ToolCallFragment):
            return TOOL_CALL, self._tool_call_data(item), ""
        if isinstance(item, CustomEvent):
            if not is_custom_name(item.name):
                # parse_item refuses these; an item built directly must not pass either
                raise InvalidItem("name", f"a custom event may not be named {item.name[:80]!r}")
            return item.name, dumps(item.data), ""
        raise TypeError(f"a job's log takes text, tool calls and custom events, not {item!r}")

    def _tool_call_data(self, item: ToolCallFragment) -> str:
        known = self._tool_calls.get(item.index)
        if known is None:
            if item.id is None or item.name is None:
                raise InvalidItem(
                    "id" if item.id is None else "name",
                    f"the first tool_call fragment of index {item.index} must carry id and name",
                )
            self._tool_calls[item.index] = (item.id, item.name)
            return tool_call_data(item.index, item.arguments, item.id, item.name)
        for field, given, kept in (("id", item.id, known[0]), ("name", item.name, known[1])):
            if given is not None and given != kept:
                raise InvalidItem(
                    field,
                    f"tool call {item.index} has the {field} {kept!r}; a later fragment"
                    f" may not change it (got {given!r})",
                )
        return tool_call_data(item.index, item.arguments)

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
        data = done_data(status, finish_reason, self.tokens, error, self.reasoning_tokens)
        event = (DONE, data, "")
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
        while True:
            try:
                result = await self._call_with_retry(self.appender.append, args)
                break
            except LogBehind as behind:
                await self._restore(behind.last_id)
        self.last_id = result.last_id
        self._recent.extend(events)
        return result

    async def _restore(self, log_last_id: int) -> None:
        """Put back the events after ``log_last_id`` that this writer appended
        and the log lost; raises ``Fenced`` when they are not all kept."""
        first, last, kept = log_last_id + 1, self.last_id, len(self._recent)
        if last - log_last_id > kept:
            lost = f"the broker lost events {first} to {last}; this writer kept only {kept}"
            log.error("job %s: %s", self.job_id, lost)
            raise Fenced(lost)
        log.warning(
            "job %s: the broker lost events %d to %d; restoring them", self.job_id, first, last
        )
        events = list(islice(self._recent, kept - (last - log_last_id), None))
        await self._call_with_retry(self.appender.restore, restore_args(self.owner, first, events))

    async def _call_with_retry(
        self,
        call: Callable[[list[str], list[str | int]], Awaitable[_Reply]],
        args: list[str | int],
    ) -> _Reply:
        deadline = time.monotonic() + self.retry_s
        backoff = None  # made on the first failure only: appends are the hot path
        while True:
            try:
                with broker_errors():
                    return await call(self.keys.job_keys(self.job_id), args)
            except BrokerUnavailable:
                backoff = backoff or Backoff(RETRY_MIN_S, RETRY_MAX_S, deadline=deadline)
                if backoff.past_deadline():
                    raise
                log.warning("job %s: broker unreachable, retrying the append", self.job_id)
                await backoff.wait()
