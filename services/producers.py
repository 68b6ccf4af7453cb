"""External producers: jobs whose events come over HTTP (API.md, "Producers").

An external job is never queued. It has a producer token of its own (only
its hash is stored), and a lease like a worker's job, from its creation on:
each publish request renews it, and a reaper ends the job with
``producer_lost`` when it runs out (the whole TOKENCAST_LEASE_SECONDS).

Owning the writer across requests: each publish request claims the job
(``ExternalJobs.claim``) under an owner id of its own, ``publish:<random>``,
and writes through the same fenced ``JobWriter`` as a worker, from the last
id the claim read. A newer request's claim replaces the owner, so an older
request still running (a producer that retried after its connection was
cut) is fenced on its next append: two requests never interleave.

Exactly once: a claim records where its request starts (``publish_after``,
the ``Tokencast-After`` it named, and ``publish_from``, the id its first
line follows). A request naming the same ``Tokencast-After`` again is a
retry of that request: its first ``log end - publish_from`` lines already
landed and are skipped. Any other ``Tokencast-After`` but the log's end is
out of order.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from services.errors import Fenced, JobFinished, UnexpectedReply
from services.eventlog import JobWriter, LogAppender
from services.events import CANCELLED, FAILED, LUA_STATUSES
from services.keys import Keys
from services.queue import LEASE_TTL_FRACTION, LUA_NOW_MS, JobQueue
from services.redisconn import Redis, broker_errors

EXTERNAL = "external"
OWNER_PREFIX = "publish:"

PRODUCER_LOST = {
    "code": "producer_lost",
    "message": "the producer stopped publishing to this job (nothing arrived for"
    " TOKENCAST_LEASE_SECONDS)",
}


def new_producer_token() -> str:
    """A secret of 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_owner() -> str:
    """The owner id of one publish request."""
    return OWNER_PREFIX + secrets.token_hex(8)


async def is_external(redis: Redis, keys: Keys, job_id: str) -> bool:
    """Whether the job's events come from an external producer."""
    with broker_errors():
        return await redis.hget(keys.job(job_id), "producer") == EXTERNAL


def known_tool_calls(fragments: list[str]) -> dict[int, tuple[str, str]]:
    """Each tool call's (id, name) by index, from the job's ``tool_call`` fragments."""
    known: dict[int, tuple[str, str]] = {}
    for raw in fragments:
        fragment = json.loads(raw)
        if fragment["index"] not in known:  # the first one has them: the writer made sure
            known[fragment["index"]] = (fragment["id"], fragment["name"])
    return known


def external_fields(token: str) -> dict[str, str]:
    """The fields an external job's hash starts with (``JobStore.create``)."""
    return {"producer": EXTERNAL, "producer_token": token_hash(token), "owner": new_owner()}


# KEYS: job.  ARGV: new owner, lease ms, Tokencast-After (-1: none), started_at.
# Answers {'claimed', last id, lines to skip, tokens, model, created_at, lease expiry,
# reasoning tokens},
# {'finished', last id, status, lines already landed (-1: not a retry)},
# {'cancelled', last id}, {'out_of_order', last id}, {'lost', last id} or {'gone'}.
CLAIM_SCRIPT = (
    LUA_STATUSES
    + LUA_NOW_MS
    + """
local job = KEYS[1]
local status = redis.call('HGET', job, 'status')
if not status then return {'gone'} end
local f = redis.call('HMGET', job, 'last_event_id', 'finished_at', 'cancel', 'owner',
                     'publish_after', 'publish_from', 'tokens', 'model', 'created_at',
                     'reasoning_tokens')
local last = tonumber(f[1])
if status == CANCELLED or f[3] == '1' then return {'cancelled', last} end
local after = tonumber(ARGV[3])
local fresh = after < 0 or (after == last and not f[2])
local retry = not fresh and f[5] and after == tonumber(f[5])
local landed = -1
if retry then landed = math.max(last - tonumber(f[6]), 0) end
if f[2] then
  if string.sub(f[4], 1, 8) ~= 'publish:' then landed = -1 end
  return {'finished', last, status, landed}
end
if not fresh and not retry then return {'out_of_order', last} end
if string.sub(f[4], 1, 8) ~= 'publish:' then return {'lost', last} end
if fresh then
  redis.call('HSET', job, 'publish_after', last, 'publish_from', math.max(last, 1))
end
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', job, 'owner', ARGV[1], 'lease_expires', expiry, 'status', RUNNING)
redis.call('HSETNX', job, 'started_at', ARGV[4])
return {'claimed', last, math.max(landed, 0), tonumber(f[7]), f[8], f[9], expiry,
        tonumber(f[10] or '0')}
"""
)

# KEYS: job.  ARGV: new owner.  Takes a running job from its producer, to end it.
# Answers {'taken', last id, tokens, reasoning tokens} or {'done'}.
TAKE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return {'done'}
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local f = redis.call('HMGET', KEYS[1], 'last_event_id', 'tokens', 'reasoning_tokens')
return {'taken', tonumber(f[1]), tonumber(f[2]), tonumber(f[3] or '0')}
"""


@dataclass(frozen=True)
class Claimed:
    """This request owns the job now; its first ``skip`` lines already landed."""

    owner: str
    last_event_id: int
    skip: int
    tokens: int
    model: str
    created_at: str
    reasoning_tokens: int = 0
    # The id and name of each tool call the job's log has, by index: a later
    # request may go on with a call's fragments without repeating them.
    tool_calls: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Refused:
    """The request may not publish: ``reason`` is ``gone``, ``cancelled``,
    ``finished``, ``out_of_order`` or ``lost`` (the lease ran out: a reaper is
    ending the job). A finished job's retry tells how many of its lines landed."""

    reason: str
    last_event_id: int = 0
    status: str | None = None
    landed: int = -1


def _decode_claim(owner: str, reply: Any) -> Claimed | Refused:
    match reply:
        case ["claimed", last, skip, tokens, model, created_at, _expiry, reasoning]:
            return Claimed(
                owner, int(last), int(skip), int(tokens), model, created_at, int(reasoning)
            )
        case ["finished", last, status, landed]:
            return Refused("finished", int(last), status, int(landed))
        case [reason, last] if reason in ("cancelled", "out_of_order", "lost"):
            return Refused(reason, int(last))
        case ["gone"]:
            return Refused("gone")
    raise UnexpectedReply(f"the claim script answered {reply!r}")


class ExternalJobs:
    """The lifecycle of external jobs: their tokens, claims, leases and ends."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        queue: JobQueue,
        appender: LogAppender,
        *,
        lease_s: float,
        retention_s: float,
    ):
        self.redis = redis
        self.keys = keys
        self.lease_s = lease_s
        self.retention_s = retention_s
        self.queue = queue
        self.appender = appender
        self._claim = redis.register_script(CLAIM_SCRIPT)
        self._take = redis.register_script(TAKE_SCRIPT)

    @property
    def _queue_lease_s(self) -> float:
        # JobQueue gives a worker LEASE_TTL_FRACTION of the setting; an external
        # job's lease is the whole TOKENCAST_LEASE_SECONDS (API.md, "Liveness").
        return self.lease_s / LEASE_TTL_FRACTION

    async def open(self, job_id: str, owner: str) -> None:
        """Start a new external job's lease: it ends if nothing is published in time."""
        await self.queue.renew(job_id, owner, self._queue_lease_s)

    async def token_matches(self, job_id: str, token: str) -> bool:
        """Whether ``token`` is this job's producer token (compared in constant time)."""
        with broker_errors():
            stored = await self.redis.hget(self.keys.job(job_id), "producer_token")
        if not isinstance(stored, str):
            return False  # no such job, or not an external one: no token opens it
        return hmac.compare_digest(stored, token_hash(token))

    async def claim(self, job_id: str, after: int | None, started_at: str) -> Claimed | Refused:
        """Own the job for one publish request that follows event ``after``."""
        owner = new_owner()
        with broker_errors():
            reply = await self._claim(
                keys=[self.keys.job(job_id)],
                args=[owner, int(self.lease_s * 1000), -1 if after is None else after, started_at],
            )
            claimed = _decode_claim(owner, reply)
            if not isinstance(claimed, Claimed):
                return claimed
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zadd(self.keys.leases(), {job_id: int(reply[6])})
                pipe.lrange(self.keys.tool_calls(job_id), 0, -1)
                _, fragments = await pipe.execute()
        return replace(claimed, tool_calls=known_tool_calls(fragments))

    def writer(self, job_id: str, claimed: Claimed) -> JobWriter:
        """The request's writer, fenced by its claim."""
        return JobWriter(
            self.appender,
            self.keys,
            job_id,
            claimed.owner,
            retention_s=self.retention_s,
            last_id=claimed.last_event_id,
            tokens=claimed.tokens,
            reasoning_tokens=claimed.reasoning_tokens,
            tool_calls=claimed.tool_calls,
        )

    async def renew(self, job_id: str, owner: str) -> tuple[bool, bool]:
        """Extend the lease: ``(still the owner, cancel requested)``."""
        return await self.queue.renew(job_id, owner, self._queue_lease_s)

    async def end(self, job_id: str, finished_at: str, cancel: bool) -> None:
        """End a running external job now: cancelled, or ``producer_lost``.
        Its producer's request, if any, is fenced and answers ``409``."""
        owner = f"end:{secrets.token_hex(8)}"
        with broker_errors():
            reply = await self._take(keys=[self.keys.job(job_id)], args=[owner])
        match reply:
            case ["taken", last, tokens, reasoning]:
                pass
            case ["done"]:
                return
            case _:
                raise UnexpectedReply(f"the take script answered {reply!r}")
        taken = Claimed(owner, int(last), 0, int(tokens), "", "", int(reasoning))
        writer = self.writer(job_id, taken)
        try:
            if cancel:
                await writer.finish(CANCELLED, CANCELLED, finished_at=finished_at)
            else:
                await writer.finish(FAILED, None, PRODUCER_LOST, finished_at=finished_at)
        except (Fenced, JobFinished):
            pass  # ended meanwhile
        await self.queue.settle(job_id, None)
