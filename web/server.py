"""Running the app under Hypercorn, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from services.config import Settings
from services.runtime import tune_gc
from web.context import Context

log = logging.getLogger(__name__)

# A reconnect storm (a node died; its viewers all come back at once) must
# not overflow the accept queue: dropped SYNs are retried after 1, 3, 7 s.
BACKLOG = 4096
# How long after TOKENCAST_DRAIN_SECONDS the parent of ``serve --workers``
# waits for a child before killing it.
WORKER_EXIT_MARGIN_S = 5.0


def hypercorn_config(host: str, port: int, drain_s: float, fd: int | None = None) -> Config:
    """Hypercorn's settings; with ``fd``, serve on that inherited listening socket."""
    config = Config()
    config.bind = [f"fd://{fd}"] if fd is not None else [f"{host}:{port}"]
    config.graceful_timeout = max(drain_s, 0.1)
    config.keep_alive_timeout = 75  # longer than a load balancer's idle upstream timeout
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_app(
    app: Quart,
    host: str,
    port: int,
    on_shutdown: Callable[[], None] | None = None,
    fd: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain.

    Draining: ``/readyz`` fails and new streams get ``503`` at once, open
    streams end (their clients reconnect and resume on another node), and the
    process exits within ``TOKENCAST_DRAIN_SECONDS``.
    """
    context: Context = app.extensions["tokencast"]
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)

    async def trigger() -> None:
        await shutdown.wait()
        context.draining = True
        if on_shutdown is not None:
            on_shutdown()
        context.hub.close_all()
        # Streams end at once; half the drain time is left for them to flush.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(context.settings.drain_s / 2):
                await context.hub.idle.wait()
        log.info("drained; %d streams left", context.hub.viewer_total)

    config = hypercorn_config(host, port, context.settings.drain_s, fd)
    tune_gc()
    await serve(app, config, shutdown_trigger=trigger)


def serve_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """``tokencast serve --workers N``: N web processes accepting on one socket.

    This process binds the socket, starts N ``tokencast serve`` children that
    inherit it, each with its own node id (``<node id>-<n>``, so viewer counts
    stay right), and passes SIGTERM and SIGINT on to them. It returns 0 once
    they have all drained and exited; a child still running
    ``WORKER_EXIT_MARGIN_S`` after TOKENCAST_DRAIN_SECONDS is killed. A child
    that exits by itself stops the others and the status is 1, so whatever
    supervises the node (systemd, Kubernetes) restarts all of it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(BACKLOG)
    received: list[int] = []
    children: list[subprocess.Popen] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # The children write their metrics here and /metrics, from any of them,
    # sums the node (prometheus-client's multi-process mode).
    own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
        prefix="tokencast-metrics-"
    )
    with listener:
        fd = listener.fileno()
        try:
            for index in range(1, workers + 1):
                env = {
                    **os.environ,
                    "TOKENCAST_NODE_ID": f"{settings.node_id}-{index}",
                    "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
                }
                command = [sys.executable, "-m", "services.cli", "serve", "--fd", str(fd)]
                children.append(subprocess.Popen(command, env=env, pass_fds=[fd]))
        except BaseException:
            for child in children:
                child.kill()
                child.wait()
            raise
    # Only the children hold the socket now: once they have all stopped
    # accepting, new connections are refused at once rather than left queued.
    log.info("serving on http://%s:%d with %d processes", host, port, workers)
    while not received and all(child.poll() is None for child in children):
        time.sleep(0.1)
    signum = received[0] if received else signal.SIGTERM
    if not received:
        log.error("a web process exited by itself; stopping the others")
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)
    deadline = time.monotonic() + settings.drain_s + WORKER_EXIT_MARGIN_S
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            log.error("web process %d did not drain in time; killing it", child.pid)
            child.kill()
            child.wait()
    # A child still starting up when the signal came dies of it: nothing lost.
    failed = [child for child in children if child.returncode not in (0, -signum)]
    if own_metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    for child in failed:
        log.error("web process %d exited with status %d", child.pid, child.returncode)
    return 0 if received and not failed else 1
