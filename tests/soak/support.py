"""The soak's moving parts: jobs kept running with their viewers, the faults,
and the memory of every server process.

Nothing here sleeps to wait for a result: jobs and viewers run until their
``done``, bounded by timeouts; the only sleeps are the scenario's own (when a
fault happens, how long a supervisor takes to restart what was killed).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field

import httpx

from deploy.local.cluster import LocalCluster, Process, RedisServer
from tests.support import Watched, watch_resiliently

VIEWERS_PER_JOB = 5
RESTART_AFTER_S = 3.0  # a supervisor's restart delay for a killed process
API_RETRY_S = 0.5
API_GIVE_UP_S = 90.0  # longer than any outage the soak causes
VIEWER_GIVE_UP_S = 150.0


@dataclass
class Outcome:
    """One finished job: its final state and what each of its viewers got."""

    job_id: str
    state: dict
    viewers: list[Watched | BaseException]


class Api:
    """Job creation and lookup through the balancer, retried like a careful
    client across the soak's outages (transport errors, 503, 429)."""

    def __init__(self, client: httpx.AsyncClient):
        self.client = client
        self.retries = 0

    async def request(self, method: str, path: str, **kw) -> httpx.Response:
        deadline = time.monotonic() + API_GIVE_UP_S
        while True:
            try:
                response = await self.client.request(method, path, **kw)
                if response.status_code not in (429, 502, 503, 504):
                    return response
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{method} {path}: no answer within {API_GIVE_UP_S}s")
            self.retries += 1
            await asyncio.sleep(API_RETRY_S)

    async def create(self, rng: random.Random) -> str:
        body = {
            "prompt": f"soak {rng.randrange(10**9)}",
            "max_tokens": rng.randint(100, 300),
            "demo": {"tokens_per_second": round(rng.uniform(20, 40), 1)},
        }
        response = await self.request("POST", "/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def finished_state(self, job_id: str) -> dict:
        """The job's state once it has finished (its viewers have seen ``done``)."""
        deadline = time.monotonic() + API_GIVE_UP_S
        while True:
            response = await self.request("GET", f"/v1/jobs/{job_id}")
            assert response.status_code == 200, f"{job_id}: {response.text}"
            state = response.json()
            if state["finished_at"] or time.monotonic() > deadline:
                return state
            await asyncio.sleep(API_RETRY_S)


async def keep_running(
    api: Api, viewers: httpx.AsyncClient, rng: random.Random, until: float, outcomes: list
) -> None:
    """One of the soak's job slots: a job and its viewers, then the next, until ``until``."""
    while time.monotonic() < until:
        job_id = await api.create(rng)
        watched = await asyncio.gather(
            *(
                watch_resiliently(viewers, job_id, give_up_s=VIEWER_GIVE_UP_S)
                for _ in range(VIEWERS_PER_JOB)
            ),
            return_exceptions=True,
        )
        outcomes.append(Outcome(job_id, await api.finished_state(job_id), list(watched)))


def mismatch(state: dict, got: Watched | BaseException) -> str | None:
    """What is wrong with one viewer's copy of a finished job, or None."""
    if isinstance(got, BaseException):
        return f"viewer failed: {got!r}"
    expected = list(range(1, int(state["last_event_id"]) + 1))
    covered = got.covered_ids
    if covered != expected:
        missing = sorted(set(expected) - set(covered))
        repeated = sorted({i for i in covered if covered.count(i) > 1})
        extra = sorted(set(covered) - set(expected))
        return f"ids: missing {missing[:10]}, repeated {repeated[:10]}, beyond the end {extra[:10]}"
    if got.text != state["text"]:
        at = next(
            (i for i, (a, b) in enumerate(zip(got.text, state["text"], strict=False)) if a != b),
            min(len(got.text), len(state["text"])),
        )
        return (
            f"text differs at char {at}: viewer {got.text[at : at + 40]!r}, "
            f"job {state['text'][at : at + 40]!r} (lengths {len(got.text)}, {len(state['text'])})"
        )
    if got.done is None or got.done["status"] != state["status"]:
        return f"done {got.done} but the job is {state['status']}"
    return None


# Faults.


@dataclass
class Fault:
    name: str
    at: float  # seconds into the run
    detail: str = ""
    restarted_at: float | None = None


@dataclass
class Chaos:
    """The four faults, each at its own seeded moment, applied to a live cluster."""

    cluster: LocalCluster
    redis: RedisServer
    rng: random.Random
    started: float
    faults: list[Fault] = field(default_factory=list)
    born: dict[int, float] = field(default_factory=dict)  # pid → when it started

    def schedule(self, earliest: float, latest: float) -> list[Fault]:
        names = ["redis_restart", "pubsub_kill", "web_kill", "worker_kill"]
        self.faults = sorted(
            (Fault(name, self.rng.uniform(earliest, latest)) for name in names),
            key=lambda fault: fault.at,
        )
        return self.faults

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def run(self) -> None:
        await asyncio.gather(*(self.apply(fault) for fault in self.faults))

    async def apply(self, fault: Fault) -> None:
        await asyncio.sleep(max(0.0, fault.at - self.elapsed()))  # the scenario's moment
        fault.at = self.elapsed()
        if fault.name == "pubsub_kill":
            killed = await asyncio.to_thread(self.redis.cli, "CLIENT", "KILL", "TYPE", "pubsub")
            fault.detail = f"{killed.strip()} pub/sub connections killed"
            return
        if fault.name == "redis_restart":
            await asyncio.to_thread(self.redis.kill)
            fault.detail = "redis kill -9, started again on its append-only file"
            await asyncio.sleep(RESTART_AFTER_S)
            await asyncio.to_thread(self.redis.start)
            self.born[self.redis_pid()] = time.monotonic()
        else:
            group = self.cluster.web if fault.name == "web_kill" else self.cluster.workers
            index = self.rng.randrange(len(group))
            fault.detail = f"{group[index].env['TOKENCAST_NODE_ID']} kill -9"
            group[index].signal(signal.SIGKILL)
            await asyncio.sleep(RESTART_AFTER_S)
            group[index] = await asyncio.to_thread(restart, group[index])
            self.born[group[index].pid] = time.monotonic()
        fault.restarted_at = self.elapsed()

    def redis_pid(self) -> int:
        assert self.redis.process is not None
        return self.redis.process.pid

    def servers(self) -> dict[str, int]:
        """Every server process now: name → pid."""
        named = {"redis": self.redis_pid()}
        for process in self.cluster.web + self.cluster.workers:
            if process.alive():
                named[process.env["TOKENCAST_NODE_ID"]] = process.pid
        return named


def restart(old: Process) -> Process:
    """Start a killed process again with its command, settings and port."""
    old.stop()  # reap it
    return Process(old.args, old.env, port=old.port).start()


# Memory.


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


@dataclass
class Memory:
    """Each server process's RSS once it has run ``settle_s``, and at the end."""

    chaos: Chaos
    settle_s: float
    settled: dict[int, tuple[str, float]] = field(default_factory=dict)
    final: dict[int, tuple[str, float]] = field(default_factory=dict)

    async def watch(self, until: float) -> None:
        while time.monotonic() < until:
            now = time.monotonic()
            for name, pid in self.chaos.servers().items():
                born = self.chaos.born.setdefault(pid, now)
                if pid not in self.settled and now - born >= self.settle_s:
                    self.settled[pid] = (name, rss_mb(pid))
            await asyncio.sleep(1.0)

    def measure_final(self) -> None:
        self.final = {pid: (name, rss_mb(pid)) for name, pid in self.chaos.servers().items()}

    def rows(self) -> list[tuple[str, int, float | None, float, float | None]]:
        """(name, pid, settled MB or None if too young, final MB, change or None)."""
        rows = []
        for pid, (name, final) in sorted(self.final.items(), key=lambda item: item[1][0]):
            settled = self.settled.get(pid, (name, None))[1]
            change = (final - settled) / settled if settled else None
            rows.append((name, pid, settled, final, change))
        return rows
