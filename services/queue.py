"""The job queue and the leases of running jobs.

Queued jobs are entries of one Redis Stream read by the consumer group
``workers``; the ``waiting`` sorted set holds the ids not yet started (its
size is the queue depth that ``TOKENCAST_MAX_QUEUED_JOBS`` bounds).

A worker that starts a job becomes its owner and holds a lease: an expiry
time in the job's hash, renewed while it works. The ``leases`` sorted set
indexes those expiries so a reaper finds expired ones without scanning; the
hash is the truth, checked atomically when a reaper takes a job over.
Times come from the Redis server's clock, so workers' clocks may disagree.

Leases across a broker outage: that clock runs on while nobody can reach
the server (and across its restart), so a lease could run out without its
worker having had a chance to renew. Every reaper pass therefore starts with
a heartbeat (``heartbeat``): a heartbeat older than ``BROKER_GAP_S`` (or
none: a server that lost its data, a promoted replica behind) means no reaper
reached the broker meanwhile, and the time it was found back is recorded.
A takeover treats every lease as renewed at that moment: a live worker,
which renews as soon as it reaches the broker, keeps its job; a dead one's
job is taken over one lease TTL after the broker's return. A gap shorter
than ``BROKER_GAP_S`` needs no such care as long as it is shorter than a
lease TTL minus a renewal period (0.5 of TOKENCAST_LEASE_SECONDS: 5 s at
the default). The job's keys and the queue's are on different Redis Cluster
slots, so the time goes to the takeover script as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from services.errors import UnexpectedReply
from services.events import LUA_STATUSES, JobStatus
from services.keys import QUEUE_GROUP, Keys
from services.redisconn import Redis, broker_errors

# A lease runs for this share of TOKENCAST_LEASE_SECONDS and is renewed every
# RENEW_FRACTION of it; with reapers scanning twice a second, a dead worker's
# job is noticed well within TOKENCAST_LEASE_SECONDS.
LEASE_TTL_FRACTION = 0.7
RENEW_FRACTION = 0.2
# No reaper heartbeat for this long: the broker was unreachable (or is new).
BROKER_GAP_S = 2.0
# The heartbeat keys outlive any gap that matters.
HEARTBEAT_KEEP_MS = 3_600_000

LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: waiting, stream.  ARGV: job id, limit (0: none).  Returns 1, or 0 when full.
ENQUEUE_SCRIPT = (
    LUA_NOW_MS
    + """
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
return 1
"""
)

# KEYS: job.  ARGV: owner, lease ms, queue entry id, started_at.  Answers
# {'started', lease expiry, last event id, tokens, attempts}, {'not_queued', status} or {'gone'}.
START_SCRIPT = (
    LUA_STATUSES
    + LUA_NOW_MS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status ~= QUEUED then return {'not_queued', status} end
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'status', RUNNING, 'owner', ARGV[1],
           'lease_expires', expiry, 'queue_entry', ARGV[3])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[4])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {'started', expiry, tonumber(redis.call('HGET', KEYS[1], 'last_event_id')),
        tonumber(redis.call('HGET', KEYS[1], 'tokens')), attempts}
"""
)

# KEYS: job.  ARGV: owner, lease ms.  Returns {lease expiry or -1 when lost, cancel flag}.
RENEW_SCRIPT = (
    LUA_NOW_MS
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1]
   or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return {-1, ''}
end
local expiry = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'lease_expires', expiry)
return {expiry, redis.call('HGET', KEYS[1], 'cancel') or ''}
"""
)

# KEYS: job.  ARGV: new owner, lease ms, when the broker was back (ms; 0: never away).
# Returns {'taken', tokens, attempts, cancel flag, queue entry, last event id,
# reasoning tokens, producer ('' for a worker's job)},
# {'alive', expiry} or {'done'}.
TAKEOVER_SCRIPT = (
    LUA_STATUSES
    + LUA_NOW_MS
    + """
local status = redis.call('HGET', KEYS[1], 'status')
-- An external job holds a lease from its creation, queued until its first publish.
local external = status == QUEUED and redis.call('HGET', KEYS[1], 'producer') == 'external'
if (status ~= RUNNING and not external) or redis.call('HEXISTS', KEYS[1], 'finished_at') == 1 then
  return {'done'}
end
local expiry = math.max(tonumber(redis.call('HGET', KEYS[1], 'lease_expires') or '0'),
                        tonumber(ARGV[3]) + tonumber(ARGV[2]))
if expiry > now then return {'alive', expiry} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'lease_expires', now + tonumber(ARGV[2]))
return {'taken', tonumber(redis.call('HGET', KEYS[1], 'tokens')),
        tonumber(redis.call('HGET', KEYS[1], 'attempts')),
        redis.call('HGET', KEYS[1], 'cancel') or '',
        redis.call('HGET', KEYS[1], 'queue_entry') or '',
        tonumber(redis.call('HGET', KEYS[1], 'last_event_id')),
        tonumber(redis.call('HGET', KEYS[1], 'reasoning_tokens') or '0'),
        redis.call('HGET', KEYS[1], 'producer') or ''}
"""
)

# KEYS: reaper heartbeat, broker back.  ARGV: gap ms, keep ms.
# Returns when the broker was last back from an outage (ms; 0 if never).
HEARTBEAT_SCRIPT = (
    LUA_NOW_MS
    + """
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], now, 'PX', ARGV[2])
if now - last > tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], now, 'PX', ARGV[2])
  return now
end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""
)

# KEYS: job.  ARGV: owner.  Puts a taken-over job back in the queued state.
REQUEUE_SCRIPT = (
    LUA_STATUSES
    + """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', QUEUED)
redis.call('HDEL', KEYS[1], 'owner', 'lease_expires', 'queue_entry')
return 1
"""
)


@dataclass(frozen=True)
class Claim:
    """A queue entry a worker read: it must be acked once the job is settled."""

    entry_id: str
    job_id: str


@dataclass(frozen=True)
class Started:
    """A job this worker now owns."""

    lease_expires_ms: int
    last_event_id: int
    tokens: int
    attempts: int


@dataclass(frozen=True)
class NotStarted:
    """A claimed job that was not queued any more: ``status`` is what it is
    instead (cancelled meanwhile, running elsewhere), ``None`` when it is gone."""

    status: JobStatus | None

    @property
    def ended(self) -> bool:
        """Nobody will run it: its queue entry can be settled."""
        return self.status is None or self.status.terminal


@dataclass(frozen=True)
class TakenOver:
    """An expired job a reaper now owns."""

    tokens: int
    attempts: int
    cancel_requested: bool
    entry_id: str
    last_event_id: int
    reasoning_tokens: int
    external: bool  # its events come from an external producer (services.producers)


@dataclass(frozen=True)
class _Lease:
    """A lease that runs until ``expires_ms`` (Redis clock)."""

    expires_ms: int
    cancel_requested: bool = False


# The only readers of the scripts' replies.
def _decode_start(reply: Any) -> Started | NotStarted:
    match reply:
        case ["started", expiry, last_event_id, tokens, attempts]:
            return Started(int(expiry), int(last_event_id), int(tokens), int(attempts))
        case ["not_queued", status]:
            return NotStarted(JobStatus(status))
        case ["gone"]:
            return NotStarted(None)
    raise UnexpectedReply(f"the start script answered {reply!r}")


def _decode_renew(reply: Any) -> _Lease | None:
    """``None``: this owner lost the lease, or the job ended."""
    match reply:
        case [-1, _]:
            return None
        case [expiry, cancel]:
            return _Lease(int(expiry), cancel_requested=cancel == "1")
    raise UnexpectedReply(f"the renew script answered {reply!r}")


def _decode_takeover(reply: Any) -> TakenOver | _Lease | None:
    """A ``_Lease``: its owner renewed it after all; ``None``: the job is not running any more."""
    match reply:
        case ["taken", tokens, attempts, cancel, entry_id, last_event_id, reasoning, producer]:
            return TakenOver(
                tokens=int(tokens),
                attempts=int(attempts),
                cancel_requested=cancel == "1",
                entry_id=entry_id,
                last_event_id=int(last_event_id),
                reasoning_tokens=int(reasoning),
                external=producer == "external",
            )
        case ["alive", expiry]:
            return _Lease(int(expiry))
        case ["done"]:
            return None
    raise UnexpectedReply(f"the takeover script answered {reply!r}")


def lease_ttl_ms(lease_s: float) -> int:
    return int(lease_s * 1000 * LEASE_TTL_FRACTION)


class JobQueue:
    """The queue stream, its consumer group, and the lease index."""

    def __init__(self, redis: Redis, keys: Keys):
        self.redis = redis
        self.keys = keys
        self._enqueue = redis.register_script(ENQUEUE_SCRIPT)
        self._start = redis.register_script(START_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._takeover = redis.register_script(TAKEOVER_SCRIPT)
        self._heartbeat = redis.register_script(HEARTBEAT_SCRIPT)
        self._requeue = redis.register_script(REQUEUE_SCRIPT)

    async def ensure_group(self) -> None:
        with broker_errors():
            try:
                await self.redis.xgroup_create(
                    self.keys.queue(), QUEUE_GROUP, id="0", mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def enqueue(self, job_id: str, *, limit: int = 0) -> bool:
        """Queue a job; ``False`` when ``limit`` jobs are already waiting."""
        with broker_errors():
            added = await self._enqueue(
                keys=[self.keys.waiting(), self.keys.queue()], args=[job_id, limit]
            )
        return bool(added)

    async def depth(self) -> int:
        with broker_errors():
            return int(await self.redis.zcard(self.keys.waiting()))

    async def claim(self, consumer: str, count: int, block_ms: int | None) -> list[Claim]:
        """Read up to ``count`` new entries for ``consumer``, waiting ``block_ms`` at most."""
        with broker_errors():
            try:
                reply: Any = await self.redis.xreadgroup(
                    QUEUE_GROUP, consumer, {self.keys.queue(): ">"}, count=count, block=block_ms
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self.ensure_group()  # the broker lost its data (restart)
                return []
        return [
            Claim(entry_id, fields["job"])
            for _stream, entries in reply
            for entry_id, fields in entries
        ]

    async def reclaim_stale(self, consumer: str, min_idle_ms: int, count: int = 50) -> list[Claim]:
        """Entries read long ago and never acked.

        Mostly these belong to running jobs (``start`` leaves those alone), but
        a worker that died between reading an entry and starting its job
        leaves the job queued with its entry stuck: this hands it on.
        """
        with broker_errors():
            try:
                reply: Any = await self.redis.xautoclaim(
                    self.keys.queue(), QUEUE_GROUP, consumer, min_idle_ms, count=count
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise  # READONLY and the like are broker_errors' to translate
                return []  # the broker lost its data; claim() recreates the group
        return [Claim(entry_id, fields["job"]) for entry_id, fields in reply[1] if fields]

    async def start(
        self, claim: Claim, owner: str, lease_s: float, started_at: str
    ) -> Started | NotStarted:
        """Take ownership of a claimed job, unless it is not queued any more."""
        with broker_errors():
            reply = await self._start(
                keys=[self.keys.job(claim.job_id)],
                args=[owner, lease_ttl_ms(lease_s), claim.entry_id, started_at],
            )
            started = _decode_start(reply)
            if isinstance(started, NotStarted):
                return started
            await self.redis.zrem(self.keys.waiting(), claim.job_id)
            await self.redis.zadd(self.keys.leases(), {claim.job_id: started.lease_expires_ms})
        return started

    async def renew(self, job_id: str, owner: str, lease_s: float) -> tuple[bool, bool]:
        """Extend the lease: ``(still the owner, cancel requested)``."""
        with broker_errors():
            reply = await self._renew(
                keys=[self.keys.job(job_id)], args=[owner, lease_ttl_ms(lease_s)]
            )
            renewed = _decode_renew(reply)
            if renewed is None:
                return False, False
            await self.redis.zadd(self.keys.leases(), {job_id: renewed.expires_ms})
        return True, renewed.cancel_requested

    async def cancel_requested(self, job_id: str, owner: str) -> tuple[bool, bool]:
        """A cheap read: ``(still the owner, cancel requested)``."""
        with broker_errors():
            current, cancel, finished_at = await self.redis.hmget(
                self.keys.job(job_id), ["owner", "cancel", "finished_at"]
            )
        return current == owner and finished_at is None, cancel == "1"

    async def settle(self, job_id: str, entry_id: str | None) -> None:
        """Forget a job that ended or moved on: its lease and its queue entry."""
        with broker_errors():
            await self.redis.zrem(self.keys.leases(), job_id)
            if entry_id:
                await self.redis.xack(self.keys.queue(), QUEUE_GROUP, entry_id)
                await self.redis.xdel(self.keys.queue(), entry_id)

    async def forget_waiting(self, job_id: str) -> None:
        with broker_errors():
            await self.redis.zrem(self.keys.waiting(), job_id)

    async def expired(self, limit: int = 100) -> list[str]:
        """Ids of running jobs whose lease (by the index) has run out."""
        with broker_errors():
            seconds, micros = await self.redis.time()
            now_ms = seconds * 1000 + micros // 1000
            ids: list[str] = await self.redis.zrangebyscore(  # type: ignore[assignment]
                self.keys.leases(), "-inf", now_ms, start=0, num=limit
            )
        return ids

    async def heartbeat(self) -> int:
        """Record that a reaper reached the broker; returns when the broker was
        last back from an outage (ms, the Redis clock; 0 if never), for ``takeover``."""
        with broker_errors():
            back_ms = await self._heartbeat(
                keys=[self.keys.reaper_heartbeat(), self.keys.broker_back()],
                args=[int(BROKER_GAP_S * 1000), HEARTBEAT_KEEP_MS],
            )
        return int(back_ms)

    async def takeover(
        self, job_id: str, owner: str, lease_s: float, broker_back_ms: int = 0
    ) -> TakenOver | None:
        """Own an expired job; ``None`` when it is alive after all, or has ended.

        A lease counts as renewed at ``broker_back_ms`` (see ``heartbeat``)."""
        with broker_errors():
            reply = await self._takeover(
                keys=[self.keys.job(job_id)],
                args=[owner, lease_ttl_ms(lease_s), broker_back_ms],
            )
            found = _decode_takeover(reply)
            if isinstance(found, _Lease):
                await self.redis.zadd(self.keys.leases(), {job_id: found.expires_ms})
                return None
            if found is None:
                await self.redis.zrem(self.keys.leases(), job_id)
        return found

    async def requeue(self, job_id: str, owner: str) -> bool:
        """Hand a job this owner holds back to the queue (it keeps its log)."""
        with broker_errors():
            if not await self._requeue(keys=[self.keys.job(job_id)], args=[owner]):
                return False
            await self.redis.zrem(self.keys.leases(), job_id)
        return await self.enqueue(job_id)
