"""The processes a benchmark run starts: the server under test, forked helpers, py-spy."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.local.cluster import Process, free_port, wait_until
from tests.benchmarks import procstat

HOST = "127.0.0.1"
DRAIN_S = 2
FORK = multiprocessing.get_context("fork")
COUNTERS = {"tokencast_events_sent_total": "events", "tokencast_catch_ups_total": "catch_ups"}
# The node's own latency histogram (Redis append -> written to the viewer's socket),
# so the table can tell the server's share of the latency from the rest.
SEND_LAG_BUCKET = 'tokencast_publish_to_send_seconds_bucket{le="'
SEND_LAG_KEY = "send_lag_le_"  # + the bucket's upper bound, in ``Server.counters()``


class Server:
    """A fresh ``tokencast serve`` (``--workers N``) on a free port."""

    def __init__(self, redis_url: str, prefix: str, workers: int, env: dict[str, str]):
        self.port = free_port()
        self.workers = workers
        base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAST_")}
        base.update(
            # Every viewer comes from 127.0.0.1: lift the per-client cap.
            TOKENCAST_MAX_STREAMS_PER_CLIENT="100000",
            TOKENCAST_REDIS_URL=redis_url,
            TOKENCAST_KEY_PREFIX=prefix,
            TOKENCAST_DRAIN_SECONDS=str(DRAIN_S),
            TOKENCAST_NODE_ID="bench",
            PYTHONUNBUFFERED="1",
            **env,
        )
        args = ["serve", "--host", HOST, "--port", str(self.port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        self.process = Process(args, base, port=self.port)
        self.pids: list[int] = []

    def start(self) -> Server:
        self.process.start()
        if self.workers > 1:
            wait_until(
                lambda: self.process.log().count("Running on") == self.workers,
                20,
                what=f"{self.workers} web processes",
            )
            self.pids = procstat.children(self.process.pid)
        else:
            self.pids = [self.process.pid]
        return self

    def pin(self, cpu: int) -> None:
        """Every process of the server (``--workers``' supervisor too) on ``cpu``."""
        for pid in {self.process.pid, *self.pids}:
            procstat.pin(pid, cpu)

    def cpu(self) -> float:
        return procstat.total_cpu(self.pids)

    def counters(self) -> dict[str, float]:
        """The node's event and catch-up counters (one process's, so not for --workers)."""
        if self.workers > 1:
            return {}
        url = f"http://{HOST}:{self.port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return {}
        found = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in COUNTERS:
                found[COUNTERS[name]] = float(value)
            elif name.startswith(SEND_LAG_BUCKET):
                upper = name[len(SEND_LAG_BUCKET) :].rstrip('"}')
                found[SEND_LAG_KEY + upper] = float(value)
        return found

    def rss(self) -> int:
        return procstat.total_rss(self.pids)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError, AssertionError):
            self.process.signal(signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.process.wait(DRAIN_S + 8)
        self.process.stop()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.log_path.unlink(missing_ok=True)


class Child:
    """A forked helper process and our end of its pipe."""

    def __init__(self, target: Callable[..., None], *args: Any):
        self.conn, theirs = FORK.Pipe()
        self.process = FORK.Process(target=target, args=(theirs, *args), daemon=True)
        self.process.start()
        theirs.close()

    def send(self, *message: Any) -> None:
        self.conn.send(message)

    def expect(self, kind: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.2):
                got, payload = self.conn.recv()
                if got != kind:
                    raise RuntimeError(f"expected {kind!r} from a helper, got {got!r}")
                return payload
            if not self.process.is_alive():
                raise RuntimeError(f"a helper process died (waiting for {kind!r})")
        raise TimeoutError(f"no {kind!r} from a helper within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()


class Profiler:
    """py-spy on each web process over the measured phase, raw (collapsed) stacks."""

    def __init__(self, pids: list[int], out_dir: Path, label: str):
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        out_dir.mkdir(parents=True, exist_ok=True)
        self.paths = [out_dir / f"{label}-{pid}.txt" for pid in pids]
        self.procs = [
            subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-f",
                    "raw",
                    "-r",
                    "100",
                    "--nonblocking",
                    "-o",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for pid, path in zip(pids, self.paths, strict=True)
        ]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
