"""The Lua scripts that write a job's log, their arguments and their replies.

Only ``services.eventlog.LogAppender`` runs them. Each script takes the keys
``Keys.job_keys`` lists (bound to names once, in ``LUA_LOG_LIB``) and answers
a table whose first element names the outcome; its decoder here is the only
code that reads the reply, and turns it into a typed result or raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from services.errors import Fenced, JobFinished, LogBehind, TokencastError, UnexpectedReply
from services.events import CANCELLED, DONE, LUA_KINDS, LUA_STATUSES, done_data

# Shared by every script that writes a job's log. ``publish_command`` is bound
# before it (see ``log_script``). Each published message carries the append
# time (the Redis clock, ms), so web nodes can measure publish-to-send latency.
#
# A script's cost is mostly fixed (the call, its keys and arguments) plus about
# 1 us per redis.call, so a script reads the hash in one HMGET and writes the
# last id, counters and texts once per batch, not per event: 7 calls for a
# one-event append instead of 11, 21 instead of 46 for eight.
# (tests/benchmarks/append_cost.py, us of Redis per append, mean of
# cmdstat_evalsha: 17-21 -> 12-13 for one event, 54-56 -> 34-45 for eight.)
LUA_LOG_LIB = """
local job_key, log_key, text_key = KEYS[1], KEYS[2], KEYS[3]
local channel_key, viewers_key = KEYS[4], KEYS[5]
local reasoning_key, tool_calls_key = KEYS[6], KEYS[7]

-- Appends the n events (name, data, text piece) in ``events`` from index i
-- on, after event ``last`` (a number): the log, the publishes, and once for
-- the batch the counters and texts. Answers the new last id (a string) and
-- the index past the events.
local function append_events(events, i, n, last)
  local clock = redis.call('TIME')
  local appended_ms = clock[1] .. string.format('%03d', math.floor(clock[2] / 1000))
  local id, text, texts, reasoning, reasonings, tool_calls = '', '', 0, '', 0, nil
  for _ = 1, n do
    local name, data = events[i], events[i + 1]
    last = last + 1
    id = tostring(last)
    redis.call('XADD', log_key, id .. '-0', 'e', name, 'd', data)
    redis.call(publish_command, channel_key, id .. ' ' .. appended_ms .. ' ' .. name .. ' ' .. data)
    if name == TOKEN then
      text, texts = text .. events[i + 2], texts + 1
    elseif name == REASONING then
      reasoning, reasonings = reasoning .. events[i + 2], reasonings + 1
    elseif name == TOOL_CALL then  -- JobStore.get assembles the calls
      tool_calls = tool_calls or {}
      tool_calls[#tool_calls + 1] = data
    end
    i = i + 3
  end
  redis.call('HSET', job_key, 'last_event_id', id)
  if texts > 0 then
    redis.call('HINCRBY', job_key, 'tokens', texts)
    redis.call('APPEND', text_key, text)
  end
  if reasonings > 0 then
    redis.call('HINCRBY', job_key, 'reasoning_tokens', reasonings)
    redis.call('APPEND', reasoning_key, reasoning)
  end
  if tool_calls then
    for first = 1, #tool_calls, 1000 do  -- unpack is bounded by Lua's stack
      local last = math.min(first + 999, #tool_calls)
      redis.call('RPUSH', tool_calls_key, unpack(tool_calls, first, last))
    end
  end
  return id, i
end

-- The refusal for a writer that is not the job's owner.
local function not_owner()
  if redis.call('EXISTS', job_key) == 0 then return {'gone'} end
  return {'not_owner'}
end

local function expire_job(ms)
  for _, key in ipairs({job_key, log_key, text_key, viewers_key, reasoning_key, tool_calls_key}) do
    redis.call('PEXPIRE', key, ms)
  end
end
"""


def log_script(body: str, *, cluster: bool) -> str:
    """The source of a log-writing script: SPUBLISH on a Redis Cluster, so an
    event goes to its job's shard only (where the hub SSUBSCRIBEs), PUBLISH on
    one server."""
    publish = "SPUBLISH" if cluster else "PUBLISH"
    return f"local publish_command = '{publish}'\n" + LUA_STATUSES + LUA_KINDS + LUA_LOG_LIB + body


# ARGV: owner, expected last id, n, (name, data, text piece) * n, and for a
# finishing append: expire ms, (field, value) * m.  Answers {'appended', last
# event id, cancel flag}, {'behind', last event id} (the log lost events this
# owner wrote: see RESTORE_BODY) or a refusal {tag}.
# Idempotent: a retried call whose first attempt landed (its reply was lost to
# a dropped connection) finds the log already n events further and does nothing.
APPEND_BODY = """
local owner, last_id, cancel, finished = unpack(redis.call('HMGET', job_key,
  'owner', 'last_event_id', 'cancel', 'finished_at'))
if owner ~= ARGV[1] then return not_owner() end
local current, after, n = tonumber(last_id or '0'), tonumber(ARGV[2]), tonumber(ARGV[3])
if n > 0 and current == after + n then return {'appended', current, cancel or ''} end
if current < after then return {'behind', current} end
if current ~= after then return {'moved_on'} end
if finished then return {'finished'} end
local last, i = current, 4
if n > 0 then last, i = append_events(ARGV, 4, n, current) end
if i <= #ARGV then  -- a finishing append's expiry and fields
  if #ARGV > i then redis.call('HSET', job_key, unpack(ARGV, i + 1, #ARGV)) end
  if ARGV[i] ~= '0' then expire_job(ARGV[i]) end
end
return {'appended', last, cancel or ''}
"""


def append_args(
    owner: str,
    after: int,
    events: list[tuple[str, str, str]],
    fields: dict[str, str],
    expire_ms: int,
) -> list[str | int]:
    """ARGV of the append: ``events`` are (name, data, text piece) after event
    ``after``; ``fields`` are set on the job's hash; ``expire_ms`` > 0 ends
    the keys' life after that long. An append that does neither leaves the
    two out: each argument costs Redis about as much as a cheap command."""
    args: list[str | int] = [owner, after, len(events)]
    for event in events:
        args.extend(event)
    if fields or expire_ms:
        args.append(expire_ms)
        for item in fields.items():
            args.extend(item)
    return args


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where the log stands after an append, and whether a cancel was asked."""

    last_id: int
    cancel_requested: bool


# Each refusal tells the writer to stop writing, for this reason.
APPEND_REFUSALS: dict[str, tuple[type[TokencastError], str]] = {
    "gone": (Fenced, "the job does not exist"),
    "not_owner": (Fenced, "another writer owns this job"),
    "moved_on": (Fenced, "the log moved on without this writer"),
    "finished": (JobFinished, "the job has ended"),
}


def decode_append(reply: Any) -> AppendResult:
    """The append's result; raises ``Fenced`` or ``JobFinished`` for a
    refusal, ``LogBehind`` when the log lost events this owner wrote."""
    match reply:
        case ["appended", last, cancel]:
            return AppendResult(int(last), cancel == "1")
        case ["behind", last]:
            raise LogBehind(int(last))
        case [refusal] if refusal in APPEND_REFUSALS:
            error, reason = APPEND_REFUSALS[refusal]
            raise error(reason)
    raise UnexpectedReply(f"the append script answered {reply!r}")


# ARGV: owner, first id, n, (name, data, text piece) * n.  Puts back events
# ``first id`` to ``first id + n - 1`` that the log lost (a promoted replica
# lacked them) exactly as its owner first appended them, through the same
# ``append_events``: the log, the counters and the text end up as if nothing had
# been lost, and the events are published again (viewers drop ids they have).
# Only onto a log that ends at ``first id - 1``; answers {'restored', last event
# id} (also when a retried call already landed) or a refusal {tag}.
RESTORE_BODY = """
local owner, last_id, finished = unpack(redis.call('HMGET', job_key,
  'owner', 'last_event_id', 'finished_at'))
if owner ~= ARGV[1] then return not_owner() end
if finished then return {'finished'} end
local current, first, n = tonumber(last_id or '0'), tonumber(ARGV[2]), tonumber(ARGV[3])
if current == first - 1 + n then return {'restored', current} end
if current ~= first - 1 then return {'moved_on'} end
return {'restored', (append_events(ARGV, 4, n, current))}
"""


def restore_args(owner: str, first_id: int, events: list[tuple[str, str, str]]) -> list[str | int]:
    """ARGV of the restore: ``events`` are (name, data, text piece), from id ``first_id`` on."""
    args: list[str | int] = [owner, first_id, len(events)]
    for event in events:
        args.extend(event)
    return args


def decode_restore(reply: Any) -> int:
    """The log's last id after the restore; raises ``Fenced`` or ``JobFinished`` for a refusal."""
    match reply:
        case ["restored", last]:
            return int(last)
        case [refusal] if refusal in APPEND_REFUSALS:
            error, reason = APPEND_REFUSALS[refusal]
            raise error(reason)
    raise UnexpectedReply(f"the restore script answered {reply!r}")


# ARGV: canceller, finished_at, expire ms, the done event (name, data, text
# piece).  A queued job is ended here at once (no worker holds it); a running
# one is flagged, and its worker ends it.
CANCEL_BODY = """
local status, finished, last_id = unpack(redis.call('HMGET', job_key,
  'status', 'finished_at', 'last_event_id'))
if not status then return {'gone'} end
if finished then return {'finished'} end
if status == QUEUED then
  -- A cancel's finish reason is spelled like its status.
  redis.call('HSET', job_key, 'owner', ARGV[1], 'status', CANCELLED,
             'finish_reason', CANCELLED, 'finished_at', ARGV[2])
  append_events(ARGV, 4, 1, tonumber(last_id or '0'))
  expire_job(ARGV[3])
  return {'ended'}
end
redis.call('HSET', job_key, 'cancel', '1')
return {'flagged'}
"""


def cancel_args(canceller: str, finished_at: str, expire_ms: int) -> list[str | int]:
    """ARGV of the cancel; a queued job's ``done`` event is built here."""
    return [canceller, finished_at, expire_ms, DONE, done_data(CANCELLED, CANCELLED, 0), ""]


class CancelOutcome(Enum):
    """What a cancel found, and did."""

    GONE = "gone"  # no such job (unknown, or expired)
    FINISHED = "finished"  # it had already ended: nothing done
    ENDED = "ended"  # it was queued: it ended at once, with its done event
    FLAGGED = "flagged"  # it is running: its owner ends it


CANCEL_OUTCOMES = {outcome.value: outcome for outcome in CancelOutcome}


def decode_cancel(reply: Any) -> CancelOutcome:
    match reply:
        case [tag] if tag in CANCEL_OUTCOMES:
            return CANCEL_OUTCOMES[tag]
    raise UnexpectedReply(f"the cancel script answered {reply!r}")
