"""services/supervisor.py on its own: real child processes, no web server, no Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from services.supervisor import exit_with_parent, listen, start_children, watch
from tests.integration.test_serve_workers import gone
from tests.support import ROOT, wait_until

pytestmark = pytest.mark.timeout(30)

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# Ignores SIGTERM, and says so once it does.
STUBBORN = [
    sys.executable,
    "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)",
]
# A supervisor of two sleepers on one socket, that prints their pids and the port.
SUPERVISOR = textwrap.dedent(
    f"""
    import os, time
    from services.supervisor import listen, start_children
    with listen("127.0.0.1", 0) as sock:
        children = start_children({SLEEPER!r}, [dict(os.environ)] * 2, sock.fileno())
        port = sock.getsockname()[1]
    print(port, *(child.pid for child in children), flush=True)
    time.sleep(60)
    """
)


def test_children_get_sigterm_when_the_supervisor_is_killed():
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    port, *children = (int(word) for word in supervisor.stdout.readline().split())
    try:
        assert len(children) == 2 and not any(gone(pid) for pid in children)
        supervisor.kill()
        supervisor.wait(5)
        wait_until(lambda: all(gone(pid) for pid in children), 2, what="both children to exit")
        with listen("127.0.0.1", port):  # nothing holds the port any more
            pass
    finally:
        supervisor.kill()
        supervisor.wait(5)
        supervisor.stdout.close()
        for pid in children:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    # The parent it expects is not its parent: as if that one died before the prctl.
    child = subprocess.Popen(SLEEPER, preexec_fn=exit_with_parent(os.getpid() + 1_000_000))
    assert child.wait(5) == 1


def test_a_signal_is_passed_on_and_clean_exits_are_not_failures():
    with listen("127.0.0.1", 0) as sock:
        children = start_children(SLEEPER, [dict(os.environ)] * 2, sock.fileno())
    assert watch(children, [signal.SIGTERM], 5) == []
    assert [child.returncode for child in children] == [-signal.SIGTERM] * 2


def test_a_child_that_exits_by_itself_stops_the_others_and_is_reported():
    failing = [sys.executable, "-c", "raise SystemExit(3)"]
    children = [subprocess.Popen(failing), subprocess.Popen(SLEEPER)]
    assert watch(children, [], 5) == [children[0].pid]
    assert children[1].returncode == -signal.SIGTERM


def test_a_child_that_does_not_stop_in_time_is_killed():
    child = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline() == "ready\n"
        started = time.monotonic()
        assert watch([child], [signal.SIGTERM], 0.5) == [child.pid]
    assert child.returncode == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 3
