from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.keys import Keys
from services.redisconn import connect
from tests.support import Cluster, RedisServer, redis_available

# Set at the start of the run and inherited by every process the tests start
# (and theirs), however it was started: at the end of the run, any live
# process that carries it is a leak. Not a TOKENCAST_* name: Cluster.env
# drops those from what it passes on.
SESSION_MARKER = "PYTEST_TOKENCAST_SESSION"
LEFTOVER_GRACE_S = 5.0  # for processes a teardown has just told to stop
LEFTOVERS = pytest.StashKey[list[str]]()  # their "pid: command line", for the summary


def pytest_sessionstart(session: pytest.Session) -> None:
    os.environ[SESSION_MARKER] = secrets.token_hex(8)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run if a process the tests started is still alive, and kill it."""
    leftovers = started_processes(os.environ[SESSION_MARKER])
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = started_processes(os.environ[SESSION_MARKER])
    if not leftovers:
        return
    lines = [f"{pid}: {command}" for pid, command in leftovers.items()]
    session.config.stash[LEFTOVERS] = lines
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    if lines := config.stash.get(LEFTOVERS, None):
        terminalreporter.section("processes left running by the tests (now killed)", red=True)
        for line in lines:
            terminalreporter.line(line, red=True)


def started_processes(marker: str) -> dict[int, str]:
    """Live processes other than this one whose environment holds ``marker``:
    pid → command line. Zombies have no environment left and are not listed."""
    needle = f"{SESSION_MARKER}={marker}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ:
            found[int(proc.name)] = command.strip()
    return found


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: TOKENCAST_TEST_REDIS_URL, the one on 127.0.0.1:6379, or one of our own."""
    if url := os.environ.get("TOKENCAST_TEST_REDIS_URL"):
        yield url
    elif redis_available(6379):
        yield "redis://127.0.0.1:6379/0"
    else:
        with RedisServer().start() as server:
            yield server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis server this test may kill or restart."""
    with RedisServer().start() as server:
        yield server


@pytest.fixture
def keys() -> Keys:
    """A key prefix of this test's own, so tests never see each other's data."""
    return Keys(f"test-{secrets.token_hex(4)}")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator:
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def node(redis_url: str) -> Iterator[Cluster]:
    """One web node and one worker, shared by a module's tests."""
    with Cluster(redis_url) as cluster:
        cluster.web()
        cluster.worker()
        yield cluster
