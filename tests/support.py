"""Helpers for tests that run real things: Redis servers, tokencast processes, SSE clients."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
from dataclasses import dataclass, field

import httpx
import httpx_sse
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

from deploy.local.cluster import ROOT, Process, RedisServer, free_port, http_status, wait_until
from services.core import Core, assemble
from services.items import TOKEN, Text
from services.keys import Keys
from services.redisconn import Redis

__all__ = ["ROOT", "Process", "RedisServer", "free_port", "http_status", "wait_until"]

ARTIFACTS = ROOT / "test-artifacts"


class Cluster:
    """Web nodes and workers on one Redis, under one key prefix (no load balancer)."""

    def __init__(self, redis_url: str, **settings: str):
        self.redis_url = redis_url
        self.prefix = f"test-{secrets.token_hex(4)}"
        self.settings = settings
        self.procs: list[Process] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAST_")}
        env.update(
            TOKENCAST_REDIS_URL=self.redis_url,
            TOKENCAST_KEY_PREFIX=self.prefix,
            PYTHONUNBUFFERED="1",
        )
        env.update(
            {f"TOKENCAST_{k.upper()}": str(v) for k, v in {**self.settings, **extra}.items()}
        )
        return env

    def web(self, port: int | None = None, **extra: str) -> Process:
        port = port or free_port()
        proc = Process(["serve", "--port", str(port)], self.env(**extra), port=port).start()
        self.procs.append(proc)
        return proc

    def worker(self, **extra: str) -> Process:
        proc = Process(["worker"], self.env(**extra)).start()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_items(texts: list[str]) -> list[Text]:
    """Answer texts as the items a job's writer appends."""
    return [Text(TOKEN, text) for text in texts]


def core_for_test(
    redis: Redis,
    keys: Keys,
    *,
    retention_s: float = 60,
    max_queued_jobs: int = 100,
    lease_s: float = 10.0,
    reaper_owner: str = "reaper-test",
) -> Core:
    """A process's shared objects (``services.core``) over ``redis`` and ``keys``."""
    return assemble(
        redis,
        keys,
        retention_s=retention_s,
        max_queued_jobs=max_queued_jobs,
        lease_s=lease_s,
        reaper_owner=reaper_owner,
    )


def redis_available(port: int = 6379) -> bool:
    try:
        return RedisServer(port).ping()
    except OSError:
        return False


# SSE clients.


@dataclass
class Received:
    """What one viewer got: each event's id, name and parsed data."""

    events: list[tuple[int, str, dict]] = field(default_factory=list)
    status: int | None = None

    @property
    def text(self) -> str:
        return "".join(data["text"] for _id, name, data in self.events if name == "token")

    @property
    def ids(self) -> list[int]:
        return [event_id for event_id, _name, _data in self.events]

    @property
    def covered_ids(self) -> list[int]:
        """Every event id received, merged token ranges expanded."""
        ids: list[int] = []
        for event_id, _name, data in self.events:
            first = data.get("first_id") if isinstance(data, dict) else None
            ids.extend(range(first, event_id + 1) if first else [event_id])
        return ids

    @property
    def done(self) -> dict | None:
        if self.events and self.events[-1][1] == "done":
            return self.events[-1][2]
        return None


def dispatched(sse: ServerSentEvent) -> bool:
    """httpx-sse also yields a block without data (our ``retry:`` line); the SSE
    spec (and every browser) dispatches no event for it."""
    return bool(sse.data)


def read_stream(
    base_url: str, job_id: str, last_event_id: int | None = None, timeout: float = 30
) -> Received:
    """Read one stream to its end (synchronously)."""
    received = Received()
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with (
        httpx.Client(base_url=base_url, timeout=timeout) as client,
        connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source,
    ):
        received.status = source.response.status_code
        if received.status != 200:
            return received
        for sse in source.iter_sse():
            if dispatched(sse):
                received.events.append((int(sse.id), sse.event, json.loads(sse.data)))
    return received


async def aread_stream(
    client: httpx.AsyncClient, job_id: str, last_event_id: int | None = None
) -> Received:
    """Read one stream to its end, on a shared async client."""
    received = Received()
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    async with aconnect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
        received.status = source.response.status_code
        if received.status != 200:
            return received
        async for sse in source.aiter_sse():
            if dispatched(sse):
                received.events.append((int(sse.id), sse.event, json.loads(sse.data)))
    return received


def create_job(base_url: str, **body) -> str:
    if "messages" not in body:
        body.setdefault("prompt", "hello from the tests")
    response = httpx.post(f"{base_url}/v1/jobs", json=body, timeout=10)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job_state(base_url: str, job_id: str) -> dict:
    response = httpx.get(f"{base_url}/v1/jobs/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def wait_finished(base_url: str, job_id: str, timeout: float = 30) -> dict:
    return wait_until(
        lambda: (s := job_state(base_url, job_id))["finished_at"] and s,
        timeout,
        what=f"job {job_id} to finish",
    )


@dataclass
class Watched(Received):
    """What a viewer that reconnects by itself (as a browser does) got, and
    every answer other than 200 or 204 it met on the way (body read)."""

    connections: int = 0
    refused: list[httpx.Response] = field(default_factory=list)


async def watch_resiliently(
    client: httpx.AsyncClient,
    job_id: str,
    last_event_id: int | None = None,
    retry_s: float = 0.2,
    give_up_s: float = 60,
) -> Watched:
    """Follow a job to its ``done`` like EventSource: on any drop, reconnect
    with the last id received. 204 (already at the end) also ends it."""
    watched = Watched()
    last = last_event_id
    deadline = asyncio.get_running_loop().time() + give_up_s
    while asyncio.get_running_loop().time() < deadline:
        headers = {"Last-Event-ID": str(last)} if last is not None else {}
        try:
            watched.connections += 1
            async with aconnect_sse(
                client, "GET", f"/v1/jobs/{job_id}/events", headers=headers
            ) as source:
                watched.status = source.response.status_code
                if watched.status == 204:
                    return watched
                if watched.status != 200:
                    await source.response.aread()
                    watched.refused.append(source.response)
                if watched.status == 200:
                    async for sse in source.aiter_sse():
                        if dispatched(sse):
                            event = (int(sse.id), sse.event, json.loads(sse.data))
                            watched.events.append(event)
                            last = event[0]
                            if sse.event == "done":
                                return watched
        except (httpx.TransportError, httpx_sse.SSEError):
            pass
        await asyncio.sleep(retry_s)
    raise AssertionError(f"viewer of {job_id} gave up after {give_up_s}s: {watched.ids[-5:]}")


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and port_free(port + 10000):
            return port


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalRedisCluster:
    """Three Redis masters on free ports, joined into a Redis Cluster."""

    def __init__(self, masters: int = 3):
        self.servers = [
            RedisServer(
                cluster_port(),
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            )
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.servers[0].url

    def start(self) -> LocalRedisCluster:
        for server in self.servers:
            server.start()
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(
            lambda: all("cluster_state:ok" in s.cli("CLUSTER", "INFO") for s in self.servers),
            20,
            what="cluster_state:ok",
        )
        return self

    def close(self) -> None:
        for server in self.servers:
            server.close()
