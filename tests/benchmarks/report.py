"""The benchmark's output: the table of medians, and py-spy profiles by function."""

from __future__ import annotations

import contextlib
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

CLIENT_BUSY = 0.80  # a client process above this share of a core may be the bottleneck
MIN_APPENDS = 10  # fewer in the measured phase (S3's token and done) say nothing of their cost


# The table.

COLUMNS = [
    ("expected", "events exp", "{:.0f}"),
    ("received", "received", "{:.0f}"),
    ("lost", "lost", "{:.0f}"),
    ("dup", "dup", "{:.0f}"),
    ("ooo", "ooo", "{:.0f}"),
    ("tok_s", "tok/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("max_ms", "max ms", "{:.0f}"),
    ("web_us", "web us/tok", "{:.1f}"),
    ("web_us_published", "us/pub tok", "{:.0f}"),
    ("redis_us", "redis us/tok", "{:.2f}"),
    ("rss_before_mb", "RSS MB before", "{:.0f}"),
    ("rss_after_mb", "after", "{:.0f}"),
    ("kb_stream", "KB/stream", "{:.1f}"),
    ("open_web_us", "web us/open", "{:.0f}"),
    ("open_redis_us", "redis us/open", "{:.0f}"),
    ("open_s", "open s", "{:.2f}"),
    ("client_max", "client CPU", "{:.0%}"),
]
WORST = {"lost", "dup", "ooo", "max_ms"}  # across runs: the worst, not the median
NOTED = [  # figures of the notes under the table: medians
    "web_cpu_share",
    "others_share",
    "refused",
    "open_commands",
    "open_command_us",
    "appends",
    "append_us",
    "redis_cpu_per_append_us",
    "command_us_tok",
]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    row = {}
    for key, _title, _fmt in [*COLUMNS, ("client_total", "", ""), ("publisher_share", "", "")]:
        values = [run[key] for run in runs]
        row[key] = max(values) if key in WORST else statistics.median(values)
    for key in NOTED:
        row[key] = statistics.median(run[key] for run in runs)
    for key in ("open_costliest", "costliest"):
        row[key] = runs[-1][key]
    lags = [run["server_p99_ms"] for run in runs if run.get("server_p99_ms") is not None]
    row["server_p99_ms"] = statistics.median(lags) if lags else None
    row["timed_out"] = any(run["timed_out"] for run in runs)
    row["refusals"] = {k: v for run in runs for k, v in run["refusals"].items()}
    row["nodes"] = runs[-1]["nodes"]
    return row


def print_table(rows: dict[str, dict[str, Any]], repeat: int) -> None:
    header = ["scen"] + [title for _key, title, _fmt in COLUMNS]
    lines = [header]
    for name, row in rows.items():
        cells = [name] + [fmt.format(row[key]) for key, _title, fmt in COLUMNS]
        if row["client_max"] > CLIENT_BUSY:
            cells[-1] += " !"
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    print(
        f"\nMedians of {repeat} run(s); lost/dup/ooo and max ms: the worst run. Ids counted"
        " with merged ranges expanded. S4's and S8's latency columns: each client's time from"
        " connect to its done event. CPU per delivered token over the delivery phase (S4, S8:"
        " the whole storm); us/pub tok: web CPU per token published (S7's includes reading its line);"
        " us/open: CPU per stream over the opening (until each has its first event; S8's"
        " includes the job's writing meanwhile)."
        " Client CPU: the busiest client process, share of one core"
        f" ('!' above {CLIENT_BUSY:.0%})."
    )
    for name, row in rows.items():
        notes = [
            f"web process(es) {row['web_cpu_share']:.0%} of a core",
            f"all clients {row['client_total']:.0%}",
            f"publisher {row['publisher_share']:.0%}",
            f"other processes {row['others_share']:.0%}",
        ]
        if row["server_p99_ms"] is not None:
            notes.append(f"server's own p99 (append to socket) <= {row['server_p99_ms']:g} ms")
        notes.append(
            f"opening, per stream: {row['open_commands']:.1f} Redis commands,"
            f" {row['open_command_us']:.1f} us in Redis ({row['open_costliest']})"
        )
        if row["appends"] >= MIN_APPENDS:
            notes.append(
                f"appends: {row['appends']:.0f} EVALSHA, {row['append_us']:.1f} us each in Redis"
                f" (with the commands it runs); all of Redis's CPU over the appends"
                f" {row['redis_cpu_per_append_us']:.1f} us each; Redis commands"
                f" {row['command_us_tok']:.2f} us per delivered token (a script's commands"
                f" count twice: in it and by name; {row['costliest']})"
            )
        if row["refused"]:
            answers = ", ".join(f"{k}: {v[:120]!r}" for k, v in row["refusals"].items())
            notes.append(f"{row['refused']:.0f} streams refused ({answers})")
        if row["timed_out"]:
            notes.append("VIEWERS TIMED OUT")
        if row["nodes"]:
            notes.append(
                "streams per process " + ", ".join(f"{k}={v}" for k, v in row["nodes"].items())
            )
        print(f"  {name}: " + "; ".join(notes))


# Profiles.


def print_profile(paths: list[str], top: int = 20) -> None:
    """Self and inclusive time by function, from py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError), open(path) as lines:
            for line in lines:
                stack, _, count = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                n = int(count)
                frames = [frame_name(frame) for frame in stack.split(";")]
                total += n
                own[frames[-1]] += n
                for frame in set(frames):
                    inclusive[frame] += n
    if not total:
        print("  (no samples)")
        return
    print(f"  {total} samples; self time:")
    for frame, n in own.most_common(top):
        print(f"    {n / total:6.1%}  {frame}")
    print("  inclusive (tokencast, quart, hypercorn, redis):")
    ours = [(f, n) for f, n in inclusive.most_common() if any(k in f for k in OUR_FRAMES)]
    for frame, n in ours[:top]:
        print(f"    {n / total:6.1%}  {frame}")


OUR_FRAMES = ("services/", "web/", "quart/", "hypercorn/", "redis/", "h11/")


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` → ``func (to/file.py)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})"
