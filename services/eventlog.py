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
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from services import metrics
from services.errors import BrokerUnavailable, Fenced, JobFinished
from services.events import DONE, START, TOKEN, Event, done_data, start_data, token_data
from services.keys import Keys
from services.redisconn import Redis, broker_errors, register_log_script

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0

# Lua helpers shared by every script that writes a job's log.
# KEYS of such a script: job, log, text, channel, viewers (``Keys.job_keys``).
# Each published message carries the append time (the Redis clock, ms), so
# web nodes can measure publish-to-send latency.
LUA_LOG_LIB = """
local clock = redis.call('TIME')
local appended_ms = clock[1] .. string.format('%03d', math.floor(clock[2] / 1000))

local function append_event(name, data, piece)
  local last = redis.call('HINCRBY', KEYS[1], 'last_event_id', 1)
  redis.call('XADD', KEYS[2], last .. '-0', 'e', name, 'd', data)
  redis.call('PUBLISH_COMMAND', KEYS[4], last .. ' ' .. appended_ms .. ' ' .. name .. ' ' .. data)
  if name == 'token' then
    redis.call('HINCRBY', KEYS[1], 'tokens', 1)
    redis.call('APPEND', KEYS[3], piece)
  end
  return last
end

local function expire_job(ms)
  for k = 1, #KEYS do
    if k ~= 4 then redis.call('PEXPIRE', KEYS[k], ms) end
  end
end
"""

# ARGV: owner, expected last id, n, (name, data, text piece) * n, m, (field, value) * m,
# expire ms.  Returns {last event id, cancel requested ("1" or "")}.
# Idempotent: a retried call whose first attempt landed (its reply was lost to
# a dropped connection) finds the log already n events further and does nothing.
APPEND_SCRIPT = (
    LUA_LOG_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('GONE job does not exist') end
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then
  return redis.error_reply('FENCED another writer owns this job')
end
local n = tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', KEYS[1], 'last_event_id') or '0')
if n > 0 and current == tonumber(ARGV[2]) + n then
  return {current, redis.call('HGET', KEYS[1], 'cancel') or ''}
end
if current ~= tonumber(ARGV[2]) then
  return redis.error_reply('FENCED the log moved on without this writer')
end
if redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return redis.error_reply('FINISHED the job has ended')
end
local last = current
local i = 4
for _ = 1, n do
  last = append_event(ARGV[i], ARGV[i + 1], ARGV[i + 2])
  i = i + 3
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
local expire_ms = tonumber(ARGV[i])
if expire_ms > 0 then expire_job(expire_ms) end
return {last, redis.call('HGET', KEYS[1], 'cancel') or ''}
"""
)


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


@dataclass
class AppendResult:
    last_id: int
    cancel_requested: bool


class JobWriter:
    """The single writer of one job's log, valid while ``owner`` holds the job.

    Raises ``Fenced`` once another writer has taken the job over, and
    ``JobFinished`` after the terminal event: both mean "stop writing".
    A broker outage is retried for up to ``retry_s`` (appends are idempotent),
    then raised as ``BrokerUnavailable``.
    """

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        job_id: str,
        owner: str,
        *,
        retention_s: float,
        last_id: int = 0,
        tokens: int = 0,
        retry_s: float = 0.0,
    ):
        self.redis = redis
        self.keys = keys
        self.job_id = job_id
        self.owner = owner
        self.retention_ms = int(retention_s * 1000)
        self.last_id = last_id
        self.tokens = tokens
        self.retry_s = retry_s
        self._script = register_log_script(redis, APPEND_SCRIPT)

    async def start(self, model: str, created_at: str) -> AppendResult:
        return await self._append([(START, start_data(self.job_id, model, created_at), "")])

    async def append_tokens(self, texts: list[str]) -> AppendResult:
        """Append one ``token`` event per text, in one atomic step."""
        result = await self._append([(TOKEN, token_data(text), text) for text in texts])
        self.tokens += len(texts)
        return result

    async def finish(
        self,
        status: str,
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
        fields = fields or {}
        args: list[str | int] = [self.owner, self.last_id, len(events)]
        for event in events:
            args.extend(event)
        args.append(len(fields))
        for item in fields.items():
            args.extend(item)
        args.append(expire_ms)
        try:
            last, cancel = await self._call_with_retry(args)
        except ResponseError as exc:
            reason = str(exc)
            if reason.startswith("FINISHED"):
                raise JobFinished(reason) from exc
            if reason.startswith(("FENCED", "GONE")):
                raise Fenced(reason) from exc
            raise
        self.last_id = int(last)
        return AppendResult(self.last_id, cancel in ("1", b"1"))

    async def _call_with_retry(self, args: list[str | int]) -> list:
        deadline = time.monotonic() + self.retry_s
        delay = RETRY_MIN_S
        while True:
            try:
                with broker_errors():
                    reply: list = await self._script(
                        keys=self.keys.job_keys(self.job_id), args=args
                    )
                    return reply
            except BrokerUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: broker unreachable, retrying the append", self.job_id)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
