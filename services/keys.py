"""Every Redis key and channel name tokencast uses, and nowhere else.

Keys of one job share the hash tag ``{<job id>}`` so that on Redis Cluster the
log, the state and the channel live on one shard and one Lua script may touch
them all. The queue's keys share the tag ``{queue}`` for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix (tests give each run its own prefix)."""

    prefix: str = "tokencast"

    # One job.
    def job(self, job_id: str) -> str:
        """Hash: the job's state (status, owner, counters, timestamps)."""
        return f"{self.prefix}:{{{job_id}}}:job"

    def log(self, job_id: str) -> str:
        """Stream: the event log, entry ids ``<event id>-0``."""
        return f"{self.prefix}:{{{job_id}}}:log"

    def text(self, job_id: str) -> str:
        """String: the text generated so far (APPENDed with each token)."""
        return f"{self.prefix}:{{{job_id}}}:text"

    def reasoning(self, job_id: str) -> str:
        """String: the reasoning generated so far (APPENDed with each reasoning event)."""
        return f"{self.prefix}:{{{job_id}}}:reasoning"

    def tool_calls(self, job_id: str) -> str:
        """List: the data of every ``tool_call`` fragment, in log order (RPUSHed)."""
        return f"{self.prefix}:{{{job_id}}}:tool_calls"

    def viewers(self, job_id: str) -> str:
        """Hash: node id → ``<open streams> <expiry ms>``."""
        return f"{self.prefix}:{{{job_id}}}:viewers"

    def channel(self, job_id: str) -> str:
        """Pub/sub channel: every appended event, as ``<id> <appended ms> <name> <data>``."""
        return f"{self.prefix}:{{{job_id}}}:events"

    def job_keys(self, job_id: str) -> list[str]:
        """The KEYS of every script that writes a job's log, in the order
        ``services.logscripts.LUA_LOG_LIB`` binds them to names."""
        return [
            self.job(job_id),
            self.log(job_id),
            self.text(job_id),
            self.channel(job_id),
            self.viewers(job_id),
            self.reasoning(job_id),
            self.tool_calls(job_id),
        ]

    # The queue.
    def queue(self) -> str:
        """Stream with the consumer group ``QUEUE_GROUP``: one entry per job to run."""
        return f"{self.prefix}:{{queue}}:stream"

    def waiting(self) -> str:
        """Sorted set of queued job ids (score: enqueue time); its size is the queue depth."""
        return f"{self.prefix}:{{queue}}:waiting"

    def leases(self) -> str:
        """Sorted set of running job ids (score: lease expiry, ms); an index for the reaper."""
        return f"{self.prefix}:{{queue}}:leases"

    def reaper_heartbeat(self) -> str:
        """String: when a reaper last reached the broker (ms, the Redis clock)."""
        return f"{self.prefix}:{{queue}}:reaper-heartbeat"

    def broker_back(self) -> str:
        """String: when the broker was last found back from an outage (ms, the Redis clock)."""
        return f"{self.prefix}:{{queue}}:broker-back"

    def ready_probe(self) -> str:
        """String: written by ``/readyz``, on the shard that creating a job needs."""
        return f"{self.prefix}:{{queue}}:ready"

    # Models.
    def models(self) -> str:
        """Sorted set: model name → expiry (ms) of the latest worker advertisement
        of it (``services.catalog``)."""
        return f"{self.prefix}:models"

    # Limits.
    def rate(self, subject: str, window: int) -> str:
        """Counter of jobs created by ``subject`` (a hashed API key or an address)
        in the minute ``window``."""
        return f"{self.prefix}:rate:{subject}:{window}"


QUEUE_GROUP = "workers"
