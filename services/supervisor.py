"""``tokencast serve --workers N``: N web processes accepting on one socket.

Framework-free: this module only binds the socket, spawns the children,
passes signals on and watches them; what a child runs is its command line.
"""

from __future__ import annotations

import ctypes
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

from services.config import Settings

log = logging.getLogger(__name__)

# A reconnect storm (a node died; its viewers all come back at once) must
# not overflow the accept queue: dropped SYNs are retried after 1, 3, 7 s.
BACKLOG = 4096
# How long after TOKENCAST_DRAIN_SECONDS the supervisor waits for a child
# before killing it.
WORKER_EXIT_MARGIN_S = 5.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def serve_workers(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run N ``tokencast serve`` children on one listening socket until a signal.

    This process binds the socket, starts N children that inherit it, each
    with its own node id (``<node id>-<n>``, so viewer counts stay right),
    and passes SIGTERM and SIGINT on to them. It returns 0 once they have all
    drained and exited; a child still running ``WORKER_EXIT_MARGIN_S`` after
    TOKENCAST_DRAIN_SECONDS is killed. A child that exits by itself stops the
    others and the status is 1, so whatever supervises the node (systemd,
    Kubernetes) restarts all of it. Should this process die without a word
    (SIGKILL, the OOM killer), each child gets SIGTERM from the kernel and
    drains: none is left holding the port.
    """
    received: list[int] = []

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
    with listen(host, port) as listener:
        fd = listener.fileno()
        command = [sys.executable, "-m", "tokencast_cli", "serve", "--fd", str(fd)]
        envs = [
            {
                **os.environ,
                "TOKENCAST_NODE_ID": f"{settings.node_id}-{index}",
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            }
            for index in range(1, workers + 1)
        ]
        children = start_children(command, envs, fd)
    # Only the children hold the socket now: once they have all stopped
    # accepting, new connections are refused at once rather than left queued.
    log.info("serving on http://%s:%d with %d processes", host, port, workers)
    failed = watch(children, received, settings.drain_s + WORKER_EXIT_MARGIN_S)
    if own_metrics_dir:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0 if received and not failed else 1


def listen(host: str, port: int) -> socket.socket:
    """The listening socket the children share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(BACKLOG)
    return listener


def start_children(
    command: list[str], envs: list[dict[str, str]], fd: int
) -> list[subprocess.Popen]:
    """One child per environment, each inheriting ``fd``; all or none."""
    children: list[subprocess.Popen] = []
    try:
        for env in envs:
            children.append(
                subprocess.Popen(
                    command, env=env, pass_fds=[fd], preexec_fn=exit_with_parent(os.getpid())
                )
            )
    except BaseException:
        for child in children:
            child.kill()
            child.wait()
        raise
    return children


def exit_with_parent(parent_pid: int) -> Callable[[], None]:
    """What a child runs between fork and exec so that it gets SIGTERM when
    ``parent_pid`` dies, however it dies (Linux; elsewhere nothing).

    The kernel's parent-death signal rather than a pipe each child watches:
    it needs no reader in the child (a busy or stuck event loop still gets
    it), no inherited descriptor, and it survives the exec. It is sent when
    the thread that forked the child ends: the supervisor forks from its main
    thread, which lives as long as it does. SIGTERM, not SIGKILL, so that the
    child drains its streams as on a normal stop.
    """

    try:  # looked up before the fork: the child does as little as it can
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None  # not Linux

    def set_death_signal() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        # The parent may have died before the prctl: then the child is
        # already someone else's and no signal will ever come.
        if os.getppid() != parent_pid:
            os._exit(1)

    return set_death_signal


def watch(children: list[subprocess.Popen], received: list[int], exit_s: float) -> list[int]:
    """Wait for a signal (in ``received``) or a child's exit, stop every child,
    and return the pids of those that did not exit cleanly."""
    while not received and all(child.poll() is None for child in children):
        time.sleep(0.1)
    signum = received[0] if received else signal.SIGTERM
    if not received:
        log.error("a web process exited by itself; stopping the others")
    for child in children:
        if child.poll() is None:
            child.send_signal(signum)
    deadline = time.monotonic() + exit_s
    for child in children:
        try:
            child.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            log.error("web process %d did not drain in time; killing it", child.pid)
            child.kill()
            child.wait()
    # A child still starting up when the signal came dies of it: nothing lost.
    failed = [child for child in children if child.returncode not in (0, -signum)]
    for child in failed:
        log.error("web process %d exited with status %d", child.pid, child.returncode)
    return [child.pid for child in failed]
