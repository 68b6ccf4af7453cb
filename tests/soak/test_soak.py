"""A long soak of a whole deployment under faults (``make test-soak``).

Redis (append-only, as deploy/ runs it), 3 web nodes and 2 workers behind
real nginx. For TOKENCAST_SOAK_SECONDS (default 600) 50 jobs run at a time at
an LLM's pace, each with 5 viewers that reconnect through the balancer with
``Last-Event-ID`` as a browser does. At seeded random moments (the seed is
printed; TOKENCAST_SOAK_SEED replays one): Redis is killed and started again,
its pub/sub connections are killed, a web node and a worker get ``kill -9``
and are started again a few seconds later, as a supervisor would.

Checked: every finished job's viewers have exactly its text, its ids 1..N each
once (a job whose worker was killed after sending tokens ends
``failed``/``worker_lost``, and its viewers have exactly the text up to
there); and the RSS of every server process at the end is within 20 % of its
level after its first minute (a quarter of the run when it is shorter).
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from deploy.local.cluster import LocalCluster, RedisServer
from tests.soak.support import (
    VIEWERS_PER_JOB,
    Api,
    Chaos,
    Memory,
    Outcome,
    keep_running,
    mismatch,
)

SECONDS = float(os.environ.get("TOKENCAST_SOAK_SECONDS", "600"))
SEED = int(os.environ.get("TOKENCAST_SOAK_SEED", random.SystemRandom().randrange(10**6)))
JOBS_AT_ONCE = 50
SETTLE_S = min(60.0, SECONDS / 4)  # "after the first minute"
RSS_TOLERANCE = 0.20
LEASE_S = 5
WORKER_CONCURRENCY = 32

pytestmark = [
    pytest.mark.soak,
    pytest.mark.timeout(SECONDS + 600),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed"),
]


@pytest.fixture
def deployment():
    # The deployment's Redis: append-only, fsync once a second (deploy/).
    redis = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "everysec")).start()
    cluster = LocalCluster(
        web=3,
        workers=2,
        redis_url=redis.url,
        keepalive_seconds="1",
        drain_seconds="5",
        lease_seconds=str(LEASE_S),
        worker_concurrency=str(WORKER_CONCURRENCY),
        retention_seconds="60",  # Redis reaches a steady size within the first minute
        create_rate_per_minute="100000",
    )
    try:
        cluster.start()
        yield cluster, redis
    finally:
        cluster.stop()
        redis.close()


@dataclass
class Run:
    outcomes: list[Outcome]
    chaos: Chaos
    memory: Memory
    api_retries: int
    slot_errors: list[str]  # job slots that stopped on an error


async def soak(cluster: LocalCluster, redis: RedisServer) -> Run:
    started = time.monotonic()
    until = started + SECONDS
    chaos = Chaos(cluster, redis, random.Random(SEED), started)
    chaos.schedule(SETTLE_S, SECONDS - 2 * SETTLE_S)
    memory = Memory(chaos, SETTLE_S)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=JOBS_AT_ONCE * VIEWERS_PER_JOB + 50)
    timeout = httpx.Timeout(30, connect=5)
    async with (
        httpx.AsyncClient(base_url=cluster.url, timeout=timeout, limits=limits) as viewers,
        httpx.AsyncClient(base_url=cluster.url, timeout=timeout) as api_client,
    ):
        api = Api(api_client)
        rngs = [random.Random(SEED * 1000 + slot) for slot in range(JOBS_AT_ONCE)]
        slots = [
            asyncio.create_task(keep_running(api, viewers, rng, until, outcomes)) for rng in rngs
        ]
        await asyncio.gather(chaos.run(), memory.watch(until))
        memory.measure_final()  # at the end, still under load
        ended = await asyncio.wait_for(asyncio.gather(*slots, return_exceptions=True), 300)
    errors = [repr(error) for error in ended if error is not None]
    return Run(outcomes, chaos, memory, api.retries, errors)


def summary(run: Run) -> str:
    outcomes, chaos = run.outcomes, run.chaos
    statuses = Counter(
        o.state["status"] + (f"/{o.state['error']['code']}" if o.state["error"] else "")
        for o in outcomes
    )
    watched = [v for o in outcomes for v in o.viewers if not isinstance(v, BaseException)]
    reconnects = sum(v.connections - 1 for v in watched)
    refused = Counter(r.status_code for v in watched for r in v.refused)
    lines = [
        f"soak: {SECONDS:.0f} s, seed {SEED}, {JOBS_AT_ONCE} jobs at a time, "
        f"{VIEWERS_PER_JOB} viewers each",
        f"jobs finished: {len(outcomes)} ({dict(statuses)})",
        f"viewers: {len(outcomes) * VIEWERS_PER_JOB}; reconnects: {reconnects} "
        f"(by {sum(v.connections > 1 for v in watched)} viewers); "
        f"refused answers: {dict(refused)}; API retries: {run.api_retries}",
        "faults:",
    ]
    for fault in chaos.faults:
        back = f", restarted at {fault.restarted_at:.1f} s" if fault.restarted_at else ""
        lines.append(f"  {fault.at:6.1f} s  {fault.name}: {fault.detail}{back}")
    lines.append(f"RSS (MB, settled after {SETTLE_S:.0f} s of the process's life, and at the end):")
    for name, pid, settled, final, change in run.memory.rows():
        was = f"{settled:7.1f}" if settled else "  young"
        by = f"{change:+6.1%}" if change is not None else "     -"
        lines.append(f"  {name:9} pid {pid:<8} {was} -> {final:7.1f}  {by}")
    return "\n".join(lines)


def nginx_no_live_upstreams(cluster: LocalCluster) -> int:
    """How often nginx had every web node marked down (it answers 502 then)."""
    assert cluster.nginx is not None
    log = cluster.nginx.dir / "error.log"
    return log.read_text(errors="replace").count("no live upstreams") if log.exists() else 0


async def test_soak_under_faults(deployment):
    cluster, redis = deployment
    run = await soak(cluster, redis)
    outcomes, chaos = run.outcomes, run.chaos
    print("\n" + summary(run))
    print(f"nginx: {nginx_no_live_upstreams(cluster)} answers 'no live upstreams' (502)")

    wrong = [
        f"job {o.job_id} ({o.state['status']}, last id {o.state['last_event_id']}) "
        f"viewer {i}: {problem}"
        for o in outcomes
        for i, viewer in enumerate(o.viewers)
        if (problem := mismatch(o.state, viewer))
    ]
    assert not run.slot_errors, run.slot_errors
    assert not wrong, "\n".join(wrong[:20])
    failed = [o for o in outcomes if o.state["status"] != "completed"]
    unexpected = [o for o in failed if (o.state["error"] or {}).get("code") != "worker_lost"]
    assert not unexpected, [(o.job_id, o.state["status"], o.state["error"]) for o in unexpected]
    # Only jobs the killed worker held (and had begun) may end worker_lost.
    assert len(failed) <= WORKER_CONCURRENCY, [o.job_id for o in failed]
    assert len(outcomes) >= JOBS_AT_ONCE * SECONDS / 30, "far fewer jobs than the pace allows"
    assert all(f.restarted_at or f.name == "pubsub_kill" for f in chaos.faults), chaos.faults
    rows = run.memory.rows()
    assert len(rows) == 6 and all(settled for _n, _p, settled, _f, _c in rows), rows
    grew = [(name, change) for name, _pid, _s, _f, change in rows if abs(change) > RSS_TOLERANCE]
    assert not grew, grew
