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
from services.events import CANCELLED, LUA_KINDS, LUA_STATUSES, done_data

# Shared by every script that writes a job's log. ``publish_command`` is bound
# before it (see ``log_script``). Each published message carries the append
# time (the Redis clock, ms), so web nodes can measure publish-to-send latency.
LUA_LOG_LIB = """
local job_key, log_key, text_key = KEYS[1], KEYS[2], KEYS[3]
local channel_key, viewers_key = KEYS[4], KEYS[5]
local reasoning_key, tool_calls_key = KEYS[6], KEYS[7]
local clock = redis.call('TIME')
local appended_ms = clock[1] .. string.format('%03d', math.floor(clock[2] / 1000))

local function append_event(name, data, piece)
  local last = redis.call('HINCRBY', job_key, 'last_event_id', 1)
  redis.call('XADD', log_key, last .. '-0', 'e', name, 'd', data)
  redis.call(publish_command, channel_key, last .. ' ' .. appended_ms .. ' ' .. name .. ' ' .. data)
  if name == TOKEN then
    redis.call('HINCRBY', job_key, 'tokens', 1)
    redis.call('APPEND', text_key, piece)
  elseif name == REASONING then
    redis.call('HINCRBY', job_key, 'reasoning_tokens', 1)
    redis.call('APPEND', reasoning_key, piece)
  elseif name == TOOL_CALL then
    redis.call('RPUSH', tool_calls_key, data)  -- JobStore.get assembles the calls
  end
  return last
end

-- The n events (name, data, text piece) in ARGV from index i on, after id
-- last; answers the new last id and the index past them.
local function append_events(i, n, last)
  for _ = 1, n do
    last = append_event(ARGV[i], ARGV[i + 1], ARGV[i + 2])
    i = i + 3
  end
  return last, i
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


# ARGV: owner, expected last id, n, (name, data, text piece) * n, m, (field, value) * m,
# expire ms.  Answers {'appended', last event id, cancel flag}, {'behind', last
# event id} (the log lost events this owner wrote: see RESTORE_BODY) or a refusal {tag}.
# Idempotent: a retried call whose first attempt landed (its reply was lost to
# a dropped connection) finds the log already n events further and does nothing.
APPEND_BODY = """
if redis.call('EXISTS', job_key) == 0 then return {'gone'} end
if redis.call('HGET', job_key, 'owner') ~= ARGV[1] then return {'not_owner'} end
local n = tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', job_key, 'last_event_id') or '0')
if n > 0 and current == tonumber(ARGV[2]) + n then
  return {'appended', current, redis.call('HGET', job_key, 'cancel') or ''}
end
if current < tonumber(ARGV[2]) then return {'behind', current} end
if current ~= tonumber(ARGV[2]) then return {'moved_on'} end
if redis.call('HEXISTS', job_key, 'finished_at') == 1 then return {'finished'} end
local last, i = append_events(4, n, current)
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('HSET', job_key, ARGV[i], ARGV[i + 1])
  i = i + 2
end
local expire_ms = tonumber(ARGV[i])
if expire_ms > 0 then expire_job(expire_ms) end
return {'appended', last, redis.call('HGET', job_key, 'cancel') or ''}
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
    the keys' life after that long."""
    args: list[str | int] = [owner, after, len(events)]
    for event in events:
        args.extend(event)
    args.append(len(fields))
    for item in fields.items():
        args.extend(item)
    args.append(expire_ms)
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
# ``append_event``: the log, the counters and the text end up as if nothing had
# been lost, and the events are published again (viewers drop ids they have).
# Only onto a log that ends at ``first id - 1``; answers {'restored', last event
# id} (also when a retried call already landed) or a refusal {tag}.
RESTORE_BODY = """
if redis.call('EXISTS', job_key) == 0 then return {'gone'} end
if redis.call('HGET', job_key, 'owner') ~= ARGV[1] then return {'not_owner'} end
if redis.call('HEXISTS', job_key, 'finished_at') == 1 then return {'finished'} end
local first, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local current = tonumber(redis.call('HGET', job_key, 'last_event_id') or '0')
if current == first - 1 + n then return {'restored', current} end
if current ~= first - 1 then return {'moved_on'} end
return {'restored', (append_events(4, n, current))}
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


# ARGV: canceller, done data, finished_at, expire ms.  A queued job is ended here at once
# (no worker holds it); a running one is flagged, and its worker ends it.
CANCEL_BODY = """
local status = redis.call('HGET', job_key, 'status')
if not status then return {'gone'} end
if redis.call('HEXISTS', job_key, 'finished_at') == 1 then return {'finished'} end
if status == QUEUED then
  -- A cancel's finish reason is spelled like its status.
  redis.call('HSET', job_key, 'owner', ARGV[1], 'status', CANCELLED,
             'finish_reason', CANCELLED, 'finished_at', ARGV[3])
  append_event('done', ARGV[2], '')
  expire_job(tonumber(ARGV[4]))
  return {'ended'}
end
redis.call('HSET', job_key, 'cancel', '1')
return {'flagged'}
"""


def cancel_args(canceller: str, finished_at: str, expire_ms: int) -> list[str | int]:
    """ARGV of the cancel; a queued job's ``done`` event is built here."""
    return [canceller, done_data(CANCELLED, CANCELLED, 0), finished_at, expire_ms]


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
