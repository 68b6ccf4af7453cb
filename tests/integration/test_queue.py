"""What the queue's and the cancel's scripts answer, as the worker, the reaper
and the API see it, on a real Redis."""

from __future__ import annotations

import pytest

from services.errors import JobFinished, JobNotFound, UnexpectedReply
from services.eventlog import EventLog
from services.events import JobStatus
from services.jobs import JobSpec, JobStore, now_iso
from services.logscripts import decode_append, decode_cancel
from services.queue import Claim, JobQueue, NotStarted, Started, TakenOver
from tests.support import core_for_test

pytestmark = pytest.mark.timeout(30)

LEASE_S = 10.0
RETENTION_S = 60


@pytest.fixture
def store(redis, keys) -> JobStore:
    return core_for_test(redis, keys, retention_s=RETENTION_S, max_queued_jobs=10).store


async def queued_job(store: JobStore) -> Claim:
    state = await store.create(JobSpec(prompt="p", model="demo"))
    claims = await store.queue.claim("test-worker", 10, None)
    assert [claim.job_id for claim in claims] == [state.id]
    return claims[0]


async def test_a_queued_job_starts_once_then_is_running_elsewhere(redis, keys, store):
    await store.queue.ensure_group()
    claim = await queued_job(store)

    started = await store.queue.start(claim, "owner-1", LEASE_S, now_iso())
    again = await store.queue.start(claim, "owner-2", LEASE_S, now_iso())

    assert isinstance(started, Started)
    assert (started.last_event_id, started.tokens, started.attempts) == (0, 0, 1)
    assert await redis.zscore(keys.leases(), claim.job_id) == started.lease_expires_ms
    assert await redis.zcard(keys.waiting()) == 0
    assert again == NotStarted(JobStatus.RUNNING)
    assert not again.ended  # its owner settles its queue entry, not this worker
    assert (await store.get(claim.job_id)).status == "running"


async def test_a_job_cancelled_or_gone_before_it_starts_is_not_started(redis, keys, store):
    await store.queue.ensure_group()
    cancelled, gone = await queued_job(store), await queued_job(store)
    await store.cancel(cancelled.job_id)
    await redis.delete(keys.job(gone.job_id))

    not_started = [
        await store.queue.start(claim, "owner", LEASE_S, now_iso()) for claim in (cancelled, gone)
    ]

    assert not_started == [NotStarted(JobStatus.CANCELLED), NotStarted(None)]
    assert all(result.ended for result in not_started)


async def test_cancelling_a_queued_job_ends_its_log_and_keys_expire(redis, keys, store):
    await store.queue.ensure_group()
    claim = await queued_job(store)

    state = await store.cancel(claim.job_id)

    assert (state.status, state.finish_reason, state.last_event_id) == ("cancelled", "cancelled", 1)
    [done] = await EventLog(redis, keys).read(claim.job_id, 0)
    assert (done.id, done.name) == (1, "done")
    assert done.payload() == {
        "status": "cancelled",
        "finish_reason": "cancelled",
        "tokens": 0,
        "reasoning_tokens": 0,
    }
    for key in (keys.job(claim.job_id), keys.log(claim.job_id)):
        assert 0 < await redis.pttl(key) <= RETENTION_S * 1000
    with pytest.raises(JobFinished, match=f"^job {claim.job_id} has already finished$"):
        await store.cancel(claim.job_id)
    with pytest.raises(JobNotFound, match=r"^no job with id 'nope' \(unknown, or expired\)$"):
        await store.cancel("nope")


async def test_cancelling_a_running_job_flags_it_for_its_owner(redis, keys, store):
    await store.queue.ensure_group()
    claim = await queued_job(store)
    await store.queue.start(claim, "owner", LEASE_S, now_iso())

    state = await store.cancel(claim.job_id)

    assert (state.status, state.finished_at) == ("running", None)
    assert await store.queue.renew(claim.job_id, "owner", LEASE_S) == (True, True)
    assert await store.queue.renew(claim.job_id, "someone-else", LEASE_S) == (False, False)


async def test_takeover_waits_for_the_lease_then_takes_the_job(redis, keys, store):
    queue: JobQueue = store.queue
    await queue.ensure_group()
    claim = await queued_job(store)
    await queue.start(claim, "owner", LEASE_S, now_iso())

    assert await queue.takeover(claim.job_id, "reaper", LEASE_S) is None  # alive
    await redis.hset(keys.job(claim.job_id), "lease_expires", 0)
    taken = await queue.takeover(claim.job_id, "reaper", LEASE_S)

    assert taken == TakenOver(
        tokens=0,
        attempts=1,
        cancel_requested=False,
        entry_id=claim.entry_id,
        last_event_id=0,
        reasoning_tokens=0,
        external=False,
    )
    assert await queue.renew(claim.job_id, "owner", LEASE_S) == (False, False)
    await redis.hset(keys.job(claim.job_id), "finished_at", now_iso())
    assert await queue.takeover(claim.job_id, "another-reaper", LEASE_S) is None  # ended
    assert await redis.zscore(keys.leases(), claim.job_id) is None


@pytest.mark.parametrize("decode", [decode_append, decode_cancel])
@pytest.mark.parametrize("reply", [["ok"], [], "appended", ["appended", 1]])
def test_a_reply_outside_the_protocol_is_an_unexpected_reply(decode, reply):
    with pytest.raises(UnexpectedReply, match="script answered"):
        decode(reply)


async def test_a_jobs_state_and_head_without_reading_its_spec(redis, keys, store):
    spec = JobSpec(prompt="p" * 1000, model="demo", metadata={"team": "a"})
    created = await store.create(spec)
    state = await store.get(created.id)
    assert state.metadata == {"team": "a"}
    head = await store.head(created.id)
    assert (head.id, head.model, head.created_at) == (created.id, "demo", created.created_at)
    # A job stored before its metadata had a field of its own: read from the spec.
    await redis.hdel(keys.job(created.id), "metadata")
    assert (await store.get(created.id)).metadata == {"team": "a"}
    with pytest.raises(JobNotFound):
        await store.head("AAAAAAAAAAAAAAAAAAAAAA")
