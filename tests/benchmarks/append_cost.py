"""What an append costs Redis (issue 16): its own figures from ``INFO commandstats``.

    .venv/bin/python -m tests.benchmarks.append_cost                 # 10,000 appends of 1 and of 8
    .venv/bin/python -m tests.benchmarks.append_cost --appends 5000 --jobs 50
    .venv/bin/python -m tests.benchmarks.append_cost --rate 6000    # paced as bench S2: 200 x 30/s

Starts a Redis of its own on a free port, creates ``--jobs`` running jobs as
the bench's publisher does (``publisher.start_job``), and lets one
``redis-cli`` subscribe to every job's channel (as a web node's hub would, so
each PUBLISH has a receiver). Then, per batch size, it appends ``--appends``
batches through the real ``JobWriter`` (all jobs at once, so the process's
``LogAppender`` pipelines them as a worker's does) and prints what Redis
spent: the script's calls and µs per call (``cmdstat_evalsha``, which
includes the commands it runs: the mean, and the median from ``INFO
latencystats``), the commands it ran per append, and the server's whole CPU
(``INFO cpu``: also parsing, replies and pub/sub delivery) per append and per
event.

The machine may be shared: ``cmdstat`` µs are wall time, and a call that
waits for a core counts its wait, so the median is the steadiest figure; and
each figure is the least of ``--repeat`` rounds, since other load only adds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from deploy.local.cluster import RedisServer, wait_until
from services.eventlog import JobWriter, LogAppender
from services.jobs import new_job_id
from services.keys import Keys
from services.redisconn import Redis, connect
from tests.benchmarks.publisher import stamp, start_job
from tests.support import token_items

BATCH_SIZES = (1, 8)
SETTLE_S = 0.3  # for the subscriber's deliveries to be flushed before reading INFO cpu


async def append_batches(writers: list[JobWriter], appends: int, size: int, rate: float) -> None:
    """``appends`` batches of ``size`` tokens, spread over the writers, all
    writing at once: as fast as they go, or ``rate`` appends a second in all
    (each job at its share, starts spread over one interval, as bench S2 paces them)."""
    loop = asyncio.get_running_loop()

    async def write(writer: JobWriter, count: int, offset_s: float) -> None:
        interval_s = len(writers) / rate if rate else 0.0
        start = loop.time() + offset_s
        for k in range(count):
            delay = start + k * interval_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await writer.append(token_items([stamp() for _ in range(size)]))

    share, extra = divmod(appends, len(writers))
    offset_s = 1 / rate if rate else 0.0
    await asyncio.gather(
        *(write(w, share + (i < extra), i * offset_s) for i, w in enumerate(writers))
    )


async def redis_cost(redis: Redis) -> tuple[dict[str, dict[str, float]], float, float]:
    """Every command's stats since the last reset, the script's median µs per
    call (``INFO latencystats``: unlike the mean, not moved by the few calls
    that waited for a core), and the server's CPU seconds so far."""
    stats: Any = await redis.info("commandstats")
    latency: Any = await redis.info("latencystats")
    cpu: Any = await redis.info("cpu")
    commands = {name.removeprefix("cmdstat_"): fields for name, fields in stats.items()}
    median = latency.get("latency_percentiles_usec_evalsha", {"p50": 0.0})["p50"]
    return commands, float(median), float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def check(redis: Redis, keys: Keys, writers: list[JobWriter]) -> None:
    """The log, the counters and the text agree with what the writers appended."""
    for writer in writers:
        job = await redis.hmget(keys.job(writer.job_id), ["last_event_id", "tokens"])
        length = await redis.xlen(keys.log(writer.job_id))
        text = await redis.strlen(keys.text(writer.job_id))
        if [int(job[0]), int(job[1]), length] != [writer.last_id, writer.tokens, writer.last_id]:
            raise SystemExit(
                f"job {writer.job_id}: hash {job}, log {length}, writer {writer.last_id}"
            )
        if text != writer.tokens * len(stamp()):
            raise SystemExit(
                f"job {writer.job_id}: {text} bytes of text for {writer.tokens} tokens"
            )


async def measure(
    url: str, keys: Keys, job_ids: list[str], appends: int, repeat: int, rate: float
) -> list[list[dict[str, Any]]]:
    """Per round, a row of figures per batch size."""
    redis = connect(url)
    appender = LogAppender(redis)
    rounds = []
    try:
        writers = [await start_job(redis, appender, keys, job_id) for job_id in job_ids]
        for _ in range(repeat):
            rows = []
            for size in BATCH_SIZES:
                await redis.config_resetstat()
                *_, cpu_before = await redis_cost(redis)
                started = time.monotonic()
                await append_batches(writers, appends, size, rate)
                elapsed = time.monotonic() - started
                await asyncio.sleep(SETTLE_S)
                commands, median, cpu_after = await redis_cost(redis)
                cpu_s = cpu_after - cpu_before
                rows.append(row(size, appends, commands, median, cpu_s, elapsed))
            rounds.append(rows)
        await check(redis, keys, writers)
    finally:
        await redis.aclose()
    return rounds


@contextlib.contextmanager
def subscriber(server: RedisServer, channels: list[str]) -> Iterator[None]:
    """A redis-cli subscribed to ``channels``, reading (and dropping) what is published."""
    process = subprocess.Popen(
        ["redis-cli", "-p", str(server.port), "SUBSCRIBE", *channels],
        stdout=subprocess.DEVNULL,
    )
    try:
        last = channels[-1]
        wait_until(lambda: server.cli("PUBSUB", "NUMSUB", last).split() == [last, "1"], 10)
        yield
    finally:
        process.kill()
        process.wait()


FIGURES = ("usec_per_call", "usec_median", "usec_per_event", "cpu_per_append", "cpu_per_event")


def least(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per batch size, each figure's least over the rounds (the most for a rate)."""
    rows = []
    for same_size in zip(*rounds, strict=True):
        merged = dict(same_size[0])
        for name in FIGURES:
            merged[name] = min(r[name] for r in same_size)
        merged["appends_s"] = max(r["appends_s"] for r in same_size)
        rows.append(merged)
    return rows


def row(
    size: int,
    appends: int,
    commands: dict[str, dict[str, float]],
    median: float,
    cpu_s: float,
    elapsed: float,
) -> dict[str, Any]:
    script = commands.get("evalsha", {"calls": 0, "usec": 0, "usec_per_call": 0})
    inner = {
        name: fields["calls"] / appends
        for name, fields in commands.items()
        if name not in ("evalsha", "info", "config|resetstat")
    }
    return {
        "size": size,
        "calls": int(script["calls"]),
        "usec_per_call": float(script["usec_per_call"]),
        "usec_median": median,
        "usec_per_event": float(script["usec"]) / (appends * size),
        "commands_per_append": sum(inner.values()),
        "inner": inner,
        "cpu_per_append": cpu_s * 1e6 / appends,
        "cpu_per_event": cpu_s * 1e6 / (appends * size),
        "appends_s": appends / elapsed,
    }


def print_rows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'events/append':>13} {'evalsha calls':>13} {'us/call':>8} {'median':>7}"
        f" {'us/event':>8} {'cmds/append':>11} {'redis cpu us/append':>19} {'us/event':>8}"
        f" {'appends/s':>9}"
    )
    for r in rows:
        print(
            f"{r['size']:>13} {r['calls']:>13} {r['usec_per_call']:>8.1f}"
            f" {r['usec_median']:>7.1f} {r['usec_per_event']:>8.1f}"
            f" {r['commands_per_append']:>11.1f} {r['cpu_per_append']:>19.1f}"
            f" {r['cpu_per_event']:>8.1f} {r['appends_s']:>9.0f}"
        )
    for r in rows:
        inner = ", ".join(f"{name} {calls:.1f}" for name, calls in sorted(r["inner"].items()))
        print(f"  {r['size']} per append, commands run per append: {inner}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=10_000, help="appends per batch size")
    parser.add_argument("--jobs", type=int, default=200, help="jobs written at once")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; the least figure is kept")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="appends/s in all (0: as fast as they go)"
    )
    args = parser.parse_args()
    keys = Keys(f"append-cost-{secrets.token_hex(3)}:")
    job_ids = [new_job_id() for _ in range(args.jobs)]
    with (
        RedisServer().start() as server,
        subscriber(server, [keys.channel(job_id) for job_id in job_ids]),
    ):
        rounds = asyncio.run(
            measure(server.url, keys, job_ids, args.appends, args.repeat, args.rate)
        )
    print(
        f"{args.appends} appends over {args.jobs} jobs per batch size"
        f" ({f'{args.rate:.0f}/s' if args.rate else 'as fast as they go'}), one subscriber,"
        f" least of {args.repeat} rounds"
    )
    print_rows(least(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
