"""``tokencast serve --workers N``: N web processes accepting on one listening socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from services.eventlog import JobWriter
from services.events import COMPLETED
from services.jobs import new_job_id, now_iso
from services.keys import Keys
from tests.integration.test_hub import bare_job
from tests.support import Cluster, Process, free_port, token_items, wait_until

pytestmark = pytest.mark.timeout(90)

DRAIN_S = 2.0
ID_LINE = re.compile(r"^id: (\d+)$", re.MULTILINE)
STARTED_CHILDREN: dict[int, list[int]] = {}  # supervisor pid → its children, for the teardown


@pytest.fixture
def cluster(redis_url):
    cluster = Cluster(redis_url, drain_seconds=str(DRAIN_S), node_id="multi")
    try:
        yield cluster
    finally:
        for proc in cluster.procs:  # the children too, even if the parent has died
            for pid in STARTED_CHILDREN.pop(proc.pid, []):
                if not gone(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        cluster.close()


def serve_workers(cluster: Cluster, workers: int) -> tuple[Process, list[int]]:
    port = free_port()
    args = ["serve", "--port", str(port), "--workers", str(workers)]
    parent = Process(args, cluster.env(), port=port).start()
    cluster.procs.append(parent)
    # Each child up, not only the first to answer /readyz.
    wait_until(lambda: parent.log().count("Running on") == workers, 10, what="every child")
    children = children_of(parent.pid)
    STARTED_CHILDREN[parent.pid] = children
    assert len(children) == workers
    return parent, children


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped counts: it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def can_listen(port: int) -> bool:
    """A new server could take the port: nothing is listening on it any more."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


async def running_job(redis, keys: Keys) -> tuple[str, JobWriter]:
    """A started job owned by the test (no worker involved), and its writer."""
    job_id = new_job_id()
    writer = await bare_job(redis, keys, job_id)
    await writer.start("demo", now_iso())
    return job_id, writer


class Stream:
    """One open event stream, read in the background until the server ends it."""

    def __init__(self, client: httpx.AsyncClient, job_id: str):
        self.text = ""
        self.opened = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, job_id))

    async def _read(self, client: httpx.AsyncClient, job_id: str) -> None:
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_text():
                self.text += chunk
                if "id: 1\n" in self.text:
                    self.opened.set()

    @property
    def ids(self) -> list[int]:
        return [int(found) for found in ID_LINE.findall(self.text)]


async def open_until_both_nodes_count(
    client: httpx.AsyncClient, redis, keys: Keys, job_id: str
) -> list[Stream]:
    """Open streams in small rounds until each process reports some in the
    job's viewers hash (which process accepts a connection is the kernel's choice)."""
    streams: list[Stream] = []
    for _round in range(10):
        new = [Stream(client, job_id) for _ in range(8)]
        await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in new)), 10)
        streams += new
        deadline = time.monotonic() + 2.5  # the hub reports counts every second
        while time.monotonic() < deadline:
            nodes = await redis.hgetall(keys.viewers(job_id))
            if set(nodes) == {"multi-1", "multi-2"}:
                return streams
            await asyncio.sleep(0.1)
    raise AssertionError(f"streams reached only {set(nodes)}")


async def test_two_processes_share_the_port_and_both_serve_streams(cluster, redis):
    parent, children = serve_workers(cluster, 2)
    keys = Keys(cluster.prefix)
    job_id, writer = await running_job(redis, keys)
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=parent.url, timeout=30, limits=limits) as client:
        streams = await open_until_both_nodes_count(client, redis, keys, job_id)
        for i in range(20):
            await writer.append(token_items([f" t{i}"]))
        await writer.finish(COMPLETED, "stop", finished_at=now_iso())
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), 20)
    for stream in streams:
        assert stream.ids == list(range(1, 23))
    counts = await redis.hgetall(keys.viewers(job_id))
    assert set(counts) <= {"multi-1", "multi-2"}  # each child under its own node id
    assert all(not gone(pid) for pid in children)


async def test_sigterm_ends_the_streams_and_stops_every_process(cluster, redis):
    parent, children = serve_workers(cluster, 2)
    keys = Keys(cluster.prefix)
    job_id, _writer = await running_job(redis, keys)
    async with httpx.AsyncClient(base_url=parent.url, timeout=30) as client:
        streams = [Stream(client, job_id) for _ in range(6)]
        await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in streams)), 10)
        parent.signal(signal.SIGTERM)
        sent_at = time.monotonic()
        # Open streams end (their clients would resume elsewhere) ...
        await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), DRAIN_S + 3)
    # ... and the parent exits cleanly once both children have.
    assert await asyncio.to_thread(parent.wait, DRAIN_S + 8) == 0, parent.log()
    assert time.monotonic() - sent_at < DRAIN_S + 5
    assert all(gone(pid) for pid in children)


def test_a_child_that_dies_takes_the_node_down(cluster):
    parent, children = serve_workers(cluster, 2)
    os.kill(children[0], signal.SIGKILL)
    assert parent.wait(DRAIN_S + 8) == 1  # the supervisor restarts the whole node
    wait_until(lambda: gone(children[1]), 5, what="the other child to exit")


def test_children_exit_when_the_supervisor_is_killed(cluster):
    parent, children = serve_workers(cluster, 2)
    assert not can_listen(parent.port)
    parent.signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
    killed_at = time.monotonic()
    assert parent.wait(5) == -signal.SIGKILL
    wait_until(lambda: all(gone(pid) for pid in children), 2, what="both children to exit")
    assert time.monotonic() - killed_at < 2
    assert can_listen(parent.port)
