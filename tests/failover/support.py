"""A Redis master, its replica and three sentinels on loopback, for failover tests."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support import RedisServer, free_port, wait_until

MASTER_NAME = "mymaster"
# The master is down for the sentinels after this long without an answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


def sentinel_command(config: Path) -> list[str]:
    """Debian's ``redis-sentinel``, else ``redis-server --sentinel`` (the same program)."""
    if shutil.which("redis-sentinel"):
        return ["redis-sentinel", str(config)]
    return ["redis-server", str(config), "--sentinel"]


def sentinel_available() -> bool:
    return shutil.which("redis-sentinel") is not None or shutil.which("redis-server") is not None


class SentinelProcess:
    """One sentinel on a free port, watching ``MASTER_NAME`` with a quorum of 2."""

    def __init__(self, master_port: int):
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tokencast-sentinel-"))
        self.monitored_port = master_port
        self.process: subprocess.Popen | None = None

    def start(self) -> SentinelProcess:
        config = self.dir / "sentinel.conf"  # a sentinel rewrites its file: one of its own
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.monitored_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        )
        self.process = subprocess.Popen(
            sentinel_command(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        ).stdout

    def master(self) -> dict[str, str]:
        """``SENTINEL MASTER`` as a dict (empty while the sentinel is not up)."""
        fields = self.cli("SENTINEL", "MASTER", MASTER_NAME).split("\n")
        return dict(zip(fields[0::2], fields[1::2], strict=False))

    def current_master_port(self) -> int | None:
        """The port of the server this sentinel calls the master now."""
        address = self.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME).split()
        return int(address[1]) if len(address) == 2 else None

    def close(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelGroup:
    """A master, a replica (``--replicaof``) and three sentinels, all on free ports.

    ``start()`` returns once every sentinel knows the replica and the other
    two sentinels, so that a failover can be voted; ``close()`` kills
    everything by pid.
    """

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinels = [SentinelProcess(self.master.port) for _ in range(3)]

    @property
    def addresses(self) -> str:
        """The value of ``TOKENCAST_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def start(self) -> SentinelGroup:
        try:
            self.master.start()
            self.replica.start()
            wait_until(self.replica_in_sync, 10, what="the replica to sync")
            for sentinel in self.sentinels:
                sentinel.start()
            wait_until(self.sentinels_ready, 20, what="the sentinels to know each other")
        except BaseException:
            self.close()
            raise
        return self

    def replica_in_sync(self) -> bool:
        return "master_link_status:up" in self.replica.cli("INFO", "replication")

    def sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            state = sentinel.master()
            if state.get("num-slaves") != "1" or state.get("num-other-sentinels") != "2":
                return False
        return True

    def cut_replication(self) -> None:
        """From now on the replica gets none of the master's writes, as when
        the link between them breaks: it follows a server that is not there.

        (Stopping the replica with SIGSTOP does not do it: the kernel keeps
        receiving the stream for it, and it catches up when it resumes, even
        after the master is gone.)
        """
        self.replica.cli("REPLICAOF", "127.0.0.1", str(free_port()))

    def restore_replication(self) -> None:
        """The replica follows the master's address again (whether or not it is alive)."""
        self.replica.cli("REPLICAOF", "127.0.0.1", str(self.master.port))

    def promoted(self) -> bool:
        """Every sentinel names the replica as the master, and it accepts writes."""
        if any(s.current_master_port() != self.replica.port for s in self.sentinels):
            return False
        return "role:master" in self.replica.cli("INFO", "replication")

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.close()
        self.replica.close()
        self.master.close()
