"""CPU time, memory and placement on cores of running processes, from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name, in parentheses, may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except FileNotFoundError:
        return []


def pin(pid: int, cpu: int) -> None:
    """Run every thread of the process on ``cpu`` only (threads it starts later inherit it).

    ``sched_setaffinity`` moves one thread: a process's helper threads (Redis's
    background ones, a web process's) would stay where they were.
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # the thread has ended
            os.sched_setaffinity(int(task.name), {cpu})


def total_cpu(pids: list[int]) -> float:
    return sum(_or_zero(cpu_seconds, pid) for pid in pids)


def machine_busy_seconds() -> float:
    """CPU time all cores have spent on anything but idling, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICKS  # minus idle and iowait


def total_rss(pids: list[int]) -> int:
    return sum(int(_or_zero(rss_bytes, pid)) for pid in pids)


def _or_zero(read, pid: int) -> float:  # type: ignore[no-untyped-def]
    try:
        return float(read(pid))
    except (FileNotFoundError, ProcessLookupError):
        return 0.0  # the process has exited


SPEED_LOOP_STEPS = 10_000_000


def python_loop_seconds() -> float:
    """CPU seconds a plain Python loop of ``SPEED_LOOP_STEPS`` steps takes.

    Machines of one class differ: two of them, a day apart, gave the same
    code's S5 at 1.42 M and 0.67 M tokens/s. Tables compare only when this
    figure does.
    """
    started = time.process_time()
    total = 0
    for step in range(SPEED_LOOP_STEPS):
        total += step
    return time.process_time() - started
