"""Redis's own account of its commands (``INFO commandstats``): calls and time per command.

A script's time includes the commands it runs, and Redis counts those again
under their own names (an ``EVALSHA`` that runs ``XADD`` adds to both), so a
sum over every command counts a script's work twice. The times are wall
clock inside each command: on a busy core they include the moments Redis
was not running, so /proc's CPU time for the whole process can be lower.
"""

from __future__ import annotations

from deploy.local.cluster import RedisServer

KEY = "cmd:"  # a sample's keys: "cmd:<command>:calls", "cmd:<command>:usec"
OURS = {"info"}  # the bench's own sampling


def sample(redis: RedisServer) -> dict[str, float]:
    """Calls and microseconds of each command so far, as flat keys for the bench's samples."""
    found = {}
    for line in redis.cli("INFO", "commandstats").splitlines():
        if not line.startswith("cmdstat_"):
            continue
        # cmdstat_evalsha:calls=12,usec=480,usec_per_call=40.00,rejected_calls=0,...
        name, _, fields = line[len("cmdstat_") :].partition(":")
        values = dict(field.split("=", 1) for field in fields.split(","))
        found[f"{KEY}{name}:calls"] = float(values["calls"])
        found[f"{KEY}{name}:usec"] = float(values["usec"])
    return found


def between(start: dict[str, float], end: dict[str, float]) -> dict[str, tuple[float, float]]:
    """(calls, usec) of each command Redis ran between two samples, but the bench's own."""
    commands = {}
    for key, calls in end.items():
        if not (key.startswith(KEY) and key.endswith(":calls")):
            continue
        name = key[len(KEY) : -len(":calls")]
        usec_key = f"{KEY}{name}:usec"
        ran = calls - start.get(key, 0.0)
        if ran > 0 and name not in OURS:
            commands[name] = (ran, end[usec_key] - start.get(usec_key, 0.0))
    return commands


def costliest(commands: dict[str, tuple[float, float]], per: float = 1, top: int = 4) -> str:
    """``"evalsha 12003 x 41 us, hget ..."``: the commands that took most time,
    calls divided by ``per`` (say, per stream)."""
    ranked = sorted(commands.items(), key=lambda item: item[1][1], reverse=True)[:top]
    return ", ".join(
        f"{name} {calls / per:{'.0f' if per == 1 else '.1f'}} x {usec / calls:.1f} us"
        for name, (calls, usec) in ranked
    )
