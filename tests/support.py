"""Helpers for tests that run real things: Redis servers, tokencast processes, SSE clients."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse, connect_sse

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


class RedisServer:
    """A redis-server of the test's own, on a free port, that it may stop and restart."""

    def __init__(self, port: int | None = None, persistent: bool = False):
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="tokencast-redis-")
        self.persistent = persistent
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        save = (
            ["--save", "3600 1", "--dbfilename", "dump.rdb"] if self.persistent else ["--save", ""]
        )
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                "--appendonly",
                "no",
                *save,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, what=f"redis-server on {self.port}")
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        ).stdout

    def kill(self) -> None:
        """SIGKILL: everything in memory is lost."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def redis_available(url_port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", url_port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class Proc:
    """A tokencast process (``serve`` or ``worker``) started by a test."""

    args: list[str]
    env: dict[str, str]
    port: int | None = None
    process: subprocess.Popen | None = None
    log_path: Path = field(
        default_factory=lambda: Path(tempfile.mktemp(prefix="tokencast-", suffix=".log"))
    )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Proc:
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait and self.port:
            wait_until(self.ready, 15, what=f"tokencast {' '.join(self.args)}")
        elif wait:
            wait_until(self.worker_ready, 15, what="tokencast worker")
        return self

    def worker_ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise AssertionError(f"process exited early:\n{self.log()}")
        return " ready (" in self.log()

    def ready(self) -> bool:
        if self.process and self.process.poll() is not None:
            raise AssertionError(f"process exited early:\n{self.log()}")
        return httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Cluster:
    """Web nodes and workers on one Redis, under one key prefix."""

    def __init__(self, redis_url: str, **settings: str):
        self.redis_url = redis_url
        self.prefix = f"test-{secrets.token_hex(4)}"
        self.settings = settings
        self.procs: list[Proc] = []

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

    def web(self, port: int | None = None, **extra: str) -> Proc:
        port = port or free_port()
        proc = Proc(["serve", "--port", str(port)], self.env(**extra), port=port).start()
        self.procs.append(proc)
        return proc

    def worker(self, **extra: str) -> Proc:
        proc = Proc(["worker"], self.env(**extra)).start()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


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


@contextlib.contextmanager
def running(*things) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in things:
            thing.close() if hasattr(thing, "close") else thing.stop()
