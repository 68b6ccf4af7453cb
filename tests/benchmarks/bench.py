"""The fan-out benchmark (issues 6 and 16): S1-S8 against real processes, one table.

    .venv/bin/python -m tests.benchmarks.bench                      # all, 3 runs each, medians
    .venv/bin/python -m tests.benchmarks.bench --scenarios S1,S4 --repeat 1

Starts what it needs and stops it, even on Ctrl-C or failure: a Redis on a
free port, a fresh ``tokencast serve`` (``--workers 2`` for S6) per run
(``processes.py``), a publisher writing through the worker's real write path
(``publisher.py``) or, for S7, an external producer publishing over HTTP
(``producer.py``), and load client processes (``client.py``); this module
runs the scenarios and turns what they saw into figures, ``report.py``
prints them. Server CPU comes from /proc/<pid>/stat, so Linux only; Redis's
time per command from ``INFO commandstats`` (``commandstats.py``).
``--profile DIR`` also samples the web process(es) with py-spy over the
measured phase and prints where the time went. With ``--pin`` (the default
on two cores or more) the server and its Redis run on CPU 0 and everything
else the bench starts on CPU 1, as issue 16's side-by-side harness did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from deploy.local.cluster import RedisServer, wait_until
from services.keys import Keys
from tests.benchmarks import client, commandstats, procstat, producer, publisher
from tests.benchmarks.processes import FORK, HOST, SEND_LAG_KEY, Child, Profiler, Server
from tests.benchmarks.publisher import PublishSpec
from tests.benchmarks.report import print_profile, print_table, summarise

OPEN_WAIT_S = client.OPEN_TIMEOUT_S + 15
SERVER_CPU, LOAD_CPU = 0, 1  # --pin: the server and its Redis; the rest


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    publish: PublishSpec
    viewers_per_job: int
    after: int = 0  # Last-Event-ID of every viewer
    workers: int = 1
    finish_s: float = 120.0  # how long the viewers may take after publishing ends
    env: dict[str, str] = field(default_factory=dict)
    external: bool = False  # published over HTTP (producer.py), not through the worker's path


SCENARIOS = {
    s.name: s
    for s in (
        Scenario(
            "S1",
            "broadcast: 1 job x 1,000 viewers, 2,000 tokens at 500/s",
            PublishSpec("paced", tokens=2000, rate=500),
            viewers_per_job=1000,
        ),
        Scenario(
            "S2",
            "many jobs: 200 jobs x 5 viewers, 30 tokens/s each for 20 s",
            PublishSpec("paced", jobs=200, tokens=600, rate=30),
            viewers_per_job=5,
        ),
        Scenario(
            "S3",
            "idle: 10,000 open streams on one process",
            PublishSpec("one"),
            viewers_per_job=10000,
            env={"TOKENCAST_MAX_STREAMS": "11000"},
        ),
        Scenario(
            "S4",
            "resume storm: 500 clients resume a finished 1,000-token job from event 500",
            PublishSpec("history", tokens=1000),
            viewers_per_job=500,
            after=500,
        ),
        Scenario(
            "S5",
            "saturation: 1 job x 1,000 viewers, as fast as the server keeps up, 10 s",
            PublishSpec("window", seconds=10),
            viewers_per_job=1000,
        ),
        Scenario(
            "S6",
            "scale-up: S5 with serve --workers 2",
            PublishSpec("window", seconds=10),
            viewers_per_job=1000,
            workers=2,
        ),
        Scenario(
            "S7",
            "external producer: S2 published over HTTP by one producer process",
            PublishSpec("paced", jobs=200, tokens=600, rate=30),
            viewers_per_job=5,
            # Lines renew the lease; none come while the viewers connect.
            env={"TOKENCAST_LEASE_SECONDS": "120"},
            external=True,
        ),
        Scenario(
            "S8",
            "resume storm on a running job: S4's 500 clients while the job goes on at 50 tokens/s",
            # It ends once every viewer has caught up (at most 30 s).
            PublishSpec("running", tokens=1000, rate=50, seconds=30),
            viewers_per_job=500,
            after=500,
        ),
    )
}
STORMS = ("history", "running")  # modes whose measured phase is the opening itself


# One run.


def run_once(scenario: Scenario, redis: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    spec = scenario.publish
    if spec.mode == "window":
        spec = replace(spec, window=args.window)
    prefix = f"bench-{secrets.token_hex(4)}"
    follows = spec.mode in ("window", "running")  # the publisher reads the viewers' progress
    progress = FORK.Array("q", [1] * args.clients, lock=False) if follows else None
    helpers: list[Child] = []
    server = Server(redis.url, prefix, scenario.workers, scenario.env)
    profiler: Profiler | None = None
    storm = spec.mode in STORMS  # the storm itself is what is measured
    try:
        server.start()
        if args.pin:
            server.pin(SERVER_CPU)
        if scenario.external:
            pub = Child(producer.run, HOST, server.port)
        else:
            pub = Child(publisher.run, redis.url, prefix, progress)
        helpers.append(pub)
        pub.send("prepare", spec)
        job_ids: list[str] = pub.expect("ready", 120)
        plans: list[list[tuple[int, str, int]]] = [[] for _ in range(args.clients)]
        streams = [(j, job_id) for j, job_id in enumerate(job_ids)] * scenario.viewers_per_job
        for k, (j, job_id) in enumerate(streams):
            plans[k % args.clients].append((j, job_id, scenario.after))
        clients = [
            Child(client.run, HOST, server.port, plan, progress, slot)
            for slot, plan in enumerate(plans)
        ]
        helpers += clients
        rss_before = server.rss()
        before_open = sample(server, redis)
        # S3's, S4's and S8's cost is in opening the streams: profile that too.
        if args.profile and (storm or spec.mode == "one"):
            profiler = Profiler(server.pids, Path(args.profile), f"{scenario.name}-{prefix}")
        go_ns = time.time_ns()
        if spec.mode == "running":
            pub.send("go")  # the job goes on while its viewers come back
        for c in clients:
            c.send("open")
        opened = [c.expect("opened", OPEN_WAIT_S) for c in clients]
        rss_open = server.rss()
        after_open = sample(server, redis)
        nodes = {}
        if scenario.workers > 1:
            nodes = streams_per_node(redis, Keys(prefix), job_ids[0], scenario.viewers_per_job)
        start = before_open if storm else sample(server, redis)
        if args.profile and not profiler:
            profiler = Profiler(server.pids, Path(args.profile), f"{scenario.name}-{prefix}")
        if spec.mode != "running":
            go_ns = time.time_ns()
            pub.send("go")
        published = pub.expect("published", spec.seconds + spec.tokens / (spec.rate or 1e9) + 120)
        for c in clients:
            c.send("finish", scenario.finish_s)
        results = [c.expect("result", scenario.finish_s + 30) for c in clients]
        end = sample(server, redis)
        if profiler:
            profiler.stop()  # (idempotent: ``finally`` stops it too)
        rss_after = server.rss()
    finally:
        for helper in helpers:
            helper.stop()
        if profiler:
            profiler.stop()
        server.stop()
        redis.cli("FLUSHALL")
    return measure(
        scenario,
        published,
        opened,
        results,
        {"before_open": before_open, "after_open": after_open, "start": start, "end": end},
        go_ns,
        {"before": rss_before, "open": rss_open, "after": rss_after},
        profiler.paths if profiler else [],
        nodes,
    )


def sample(server: Server, redis: RedisServer) -> dict[str, float]:
    assert redis.process is not None
    return {
        "web": server.cpu(),
        "redis": procstat.total_cpu([redis.process.pid]),
        "machine": procstat.machine_busy_seconds(),
        "t": time.monotonic(),
        **server.counters(),
        **commandstats.sample(redis),
    }


def streams_per_node(redis: RedisServer, keys: Keys, job_id: str, expected: int) -> dict[str, int]:
    """Open streams on the job per web process, as the processes report them (each second)."""

    def counts() -> dict[str, int]:
        lines = redis.cli("HGETALL", keys.viewers(job_id)).splitlines()
        return {
            node: int(value.split()[0])
            for node, value in zip(lines[::2], lines[1::2], strict=False)
        }

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: sum(counts().values()) >= expected, 3, what="viewer counts")
    return counts()


def measure(
    scenario: Scenario,
    published: dict[str, Any],
    opened: list[dict[str, Any]],
    results: list[dict[str, Any]],
    samples: dict[str, dict[str, float]],
    go_ns: int,
    rss: dict[str, int],
    profiles: list[Path],
    nodes: dict[str, int],
) -> dict[str, Any]:
    """The table's figures for one run. ``samples``: the server's and Redis's
    counters before and after the opening and the measured phase."""
    start, end = samples["start"], samples["end"]
    final_ids = published["final_ids"]
    rows = [row for result in results for row in result["streams"]]
    expected = sum(final_ids[job] - after for job, after, *_ in rows)
    received = sum(row[2] for row in rows)
    tokens = sum(result["tokens"] for result in results)
    histogram = [0] * client.BUCKETS
    for result in results:
        counts = memoryview(result["histogram"]).cast("q")
        for i in range(client.BUCKETS):
            if counts[i]:
                histogram[i] += counts[i]
    storm = scenario.publish.mode in STORMS
    if storm:
        # Mostly old tokens: the figure is how long each client took, connect to done.
        times = sorted(row[10] - row[8] for row in rows if row[10])
        p50, p99, worst = (pick(times, 0.50), pick(times, 0.99), times[-1]) if times else (0,) * 3
        first, last = min(row[8] for row in rows), max(row[10] for row in rows)
    else:
        p50, p99 = percentile(histogram, 0.50), percentile(histogram, 0.99)
        worst = max(result["max_latency_ns"] for result in results)
        first, last = go_ns, max(result["last_token_ns"] for result in results) or go_ns
    seconds = max((last - first) / 1e9, 1e-9)
    web_cpu, redis_cpu = end["web"] - start["web"], end["redis"] - start["redis"]
    elapsed = max(end["t"] - start["t"], 1e-9)
    client_cpu = sum(r["cpu_s"] for r in results)
    ours = web_cpu + redis_cpu + client_cpu + published["cpu_s"]
    if storm:  # the storm is the opening
        client_share = [
            (r["open_cpu_s"] + r["cpu_s"]) / max(r["open_wall_s"] + r["wall_s"], 1e-9)
            for r in results
        ]
    else:
        client_share = [r["cpu_s"] / max(r["wall_s"], 1e-9) for r in results]
    return {
        "expected": expected,
        "received": received,
        "lost": max(expected - received, 0),
        "dup": sum(row[4] for row in rows),
        "ooo": sum(row[5] for row in rows),
        "refused": sum(1 for row in rows if row[6] != 200),
        "refusals": {k: v for r in results for k, v in r["refusals"].items()},
        "tok_s": tokens / seconds,
        "p50_ms": p50 / 1e6,
        "p99_ms": p99 / 1e6,
        "max_ms": worst / 1e6,
        "web_us": web_cpu * 1e6 / max(tokens, 1),
        "web_us_published": web_cpu * 1e6 / max(published["tokens"], 1),
        "redis_us": redis_cpu * 1e6 / max(tokens, 1),
        "web_cpu_share": web_cpu / elapsed,
        # Cores busy with anything else on the machine meanwhile (noise).
        "others_share": max(end["machine"] - start["machine"] - ours, 0) / elapsed,
        "rss_before_mb": rss["before"] / 2**20,
        "rss_after_mb": rss["after"] / 2**20,
        "kb_stream": (rss["open"] - rss["before"]) / 1024 / max(len(rows), 1),
        "open_s": max(o["open_s"] for o in opened),
        **opening_costs(samples["before_open"], samples["after_open"], len(rows)),
        "client_max": max(client_share),
        "client_total": sum(client_share),
        # Not meaningful when everything was written beforehand (S4).
        "publisher_share": published["cpu_s"] / max(published["seconds"], 0.1),
        "timed_out": any(r["timed_out"] for r in results),
        # Events sent per delivered token (below 1: merged), and falls into catch-up.
        "events_per_token": (end["events"] - start["events"]) / max(tokens, 1)
        if "events" in start
        else None,
        "catch_ups": end["catch_ups"] - start["catch_ups"] if "catch_ups" in start else None,
        "server_p99_ms": send_lag_p99_ms(start, end),
        **append_costs(start, end, tokens),
        "client_cpu_s": client_cpu,
        "profiles": [str(p) for p in profiles],
        "nodes": nodes,
    }


def opening_costs(
    before: dict[str, float], after: dict[str, float], streams: int
) -> dict[str, Any]:
    """Web and Redis CPU, and Redis's commands, per stream opened."""
    commands = commandstats.between(before, after)
    per = max(streams, 1)
    return {
        "open_web_us": (after["web"] - before["web"]) * 1e6 / per,
        "open_redis_us": (after["redis"] - before["redis"]) * 1e6 / per,
        "open_commands": sum(calls for calls, _usec in commands.values()) / per,
        "open_command_us": sum(usec for _calls, usec in commands.values()) / per,
        "open_costliest": commandstats.costliest(commands, per=per),
    }


def append_costs(start: dict[str, float], end: dict[str, float], tokens: int) -> dict[str, Any]:
    """Redis's cost of the appends (an ``EVALSHA`` each) over the measured phase."""
    commands = commandstats.between(start, end)
    appends, append_usec = commands.get("evalsha", (0.0, 0.0))
    return {
        "appends": appends,
        "append_us": append_usec / max(appends, 1),
        # All of Redis's CPU (reads and pub/sub too) over the appends.
        "redis_cpu_per_append_us": (end["redis"] - start["redis"]) * 1e6 / max(appends, 1),
        "command_us_tok": sum(usec for _calls, usec in commands.values()) / max(tokens, 1),
        "costliest": commandstats.costliest(commands),
    }


def send_lag_p99_ms(start: dict[str, float], end: dict[str, float]) -> float | None:
    """The node's p99 from the Redis append to the write to a viewer's socket
    (upper edge of its histogram bucket), or ``None`` without its figures."""
    buckets = sorted(
        (float(key[len(SEND_LAG_KEY) :]), end[key] - start.get(key, 0.0))
        for key in end
        if key.startswith(SEND_LAG_KEY)
    )
    if not buckets or not buckets[-1][1]:
        return None
    total = buckets[-1][1]  # the +Inf bucket counts every observation
    upper = next(upper for upper, count in buckets if count >= 0.99 * total)
    return upper * 1000


def percentile(histogram: list[int], q: float) -> float:
    """The ``q`` quantile (ns) of a latency histogram (upper edge of the bucket)."""
    total = sum(histogram)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for i, count in enumerate(histogram):
        seen += count
        if seen >= rank:
            return float((i + 1) * client.BUCKET_NS)
    return float(len(histogram) * client.BUCKET_NS)


def pick(values: list[int], q: float) -> float:
    return float(values[min(int(q * len(values)), len(values) - 1)])


# Main.


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="e.g. S1,S4")
    parser.add_argument("--repeat", type=int, default=3, help="runs per scenario (median)")
    parser.add_argument("--clients", type=int, default=2, help="load client processes")
    parser.add_argument(
        "--window", type=int, default=256, help="S5/S6: tokens the publisher may run ahead"
    )
    parser.add_argument("--profile", metavar="DIR", help="py-spy the web process(es) into DIR")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures here")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        help=f"server and Redis on CPU {SERVER_CPU}, the rest on CPU {LOAD_CPU}"
        " (default: on when both are there)",
    )
    args = parser.parse_args(argv)
    both = {SERVER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
    if args.pin is None:
        args.pin = both
    elif args.pin and not both:
        parser.error(f"--pin needs CPUs {SERVER_CPU} and {LOAD_CPU}")
    args.names = [name.strip().upper() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in args.names if name not in SCENARIOS]
    if unknown or args.repeat < 1 or args.clients < 1:
        parser.error(f"unknown scenario(s) {unknown}" if unknown else "counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client.raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # even where the shell started us ignoring it
    if args.pin:
        os.sched_setaffinity(0, {LOAD_CPU})  # what we start inherits it; the server moves
    print(f"cores: {core_layout(args)}", file=sys.stderr, flush=True)
    loop_s = procstat.python_loop_seconds()  # before anything else runs
    try:
        rows, every = run_all(args)
    except KeyboardInterrupt:
        print("interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    print()
    print_table(rows, args.repeat)
    print(
        f"  machine: a {procstat.SPEED_LOOP_STEPS:,}-step Python loop took {loop_s:.2f} s of CPU"
        " (compare tables only from machines with a similar figure)"
    )
    print(f"  cores: {core_layout(args)}")
    if args.profile:
        for name, runs in every.items():
            print(f"\nprofile {name} (py-spy, web process(es), measured phase):")
            print_profile([p for run in runs for p in run["profiles"]])
    if args.json:
        figures = {"python_loop_s": loop_s, "pinned": args.pin, "rows": rows, "runs": every}
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


def run_all(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Every scenario ``args.repeat`` times on one Redis: the rows and every run's figures."""
    rows: dict[str, dict[str, Any]] = {}
    every: dict[str, list[dict[str, Any]]] = {}
    with RedisServer().start() as redis:
        if args.pin:
            assert redis.process is not None
            procstat.pin(redis.process.pid, SERVER_CPU)
        for name in args.names:
            scenario = SCENARIOS[name]
            print(f"{name} {scenario.title}", file=sys.stderr, flush=True)
            every[name] = []
            for i in range(args.repeat):
                figures = run_once(scenario, redis, args)
                every[name].append(figures)
                print(
                    f"  run {i + 1}: {figures['tok_s']:.0f} tok/s, p99"
                    f" {figures['p99_ms']:.1f} ms, web {figures['web_us']:.1f} us/tok,"
                    f" lost {figures['lost']}",
                    file=sys.stderr,
                    flush=True,
                )
            rows[name] = summarise(every[name])
    return rows, every


def core_layout(args: argparse.Namespace) -> str:
    """What shared each core, in words."""
    if not args.pin:
        return "not pinned (--no-pin): any process on any core"
    load = f"the {args.clients} load client processes, the publisher (S7: the producer)"
    load += ", the bench's driver" + (" and py-spy" if args.profile else "")
    shared = " (S6: both web processes)" if "S6" in args.names else ""
    return (
        f"CPU {SERVER_CPU}: the web process(es){shared} and Redis; CPU {LOAD_CPU}: {load};"
        " other work on the machine may run on either"
    )


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
