"""The exception tree of tokencast.

    TokencastError
    ├── SettingsError          a TOKENCAST_* variable has a bad value (start-up)
    ├── BrokerUnavailable      Redis cannot be reached (web: 503)
    ├── JobNotFound            unknown or expired job id (web: 404)
    ├── QueueFull              TOKENCAST_MAX_QUEUED_JOBS reached (web: 429)
    ├── RateLimited            a per-client limit reached (web: 429 + Retry-After)
    ├── JobFinished            the job already ended, e.g. cancel (web: 409)
    ├── Fenced                 this writer lost the job's lease; it must stop
    │   └── LogBehind          the broker lost this writer's last events (a failover)
    ├── BackendError           a model backend failed; ``code`` goes in ``done``
    └── UnexpectedReply        a Redis script answered outside its protocol (a bug)

Redis errors are translated where they are raised (``from exc``), so callers
above ``services`` never catch a redis-py exception.
"""

from __future__ import annotations

import math


class TokencastError(Exception):
    """Base of every error tokencast raises on purpose."""


class SettingsError(TokencastError):
    """A setting has a bad value; the message names the variable."""


class BrokerUnavailable(TokencastError):
    """The broker (Redis) could not be reached or answered with an I/O error."""


class JobNotFound(TokencastError):
    """No job with this id exists (never created, or its retention ran out)."""


class QueueFull(TokencastError):
    """Too many jobs are waiting for a worker."""


class RateLimited(TokencastError):
    """A client went over one of its limits; it may retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.message = message
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class JobFinished(TokencastError):
    """The job has already reached its terminal event."""


class Fenced(TokencastError):
    """Another writer took this job over; the stale writer must not append."""


class LogBehind(Fenced):
    """The job's log ends at ``last_id``, below what its writer (still the
    owner) appended: a promoted replica lacks the last events. The writer
    restores them (``JobWriter``); any other caller stops, as when fenced."""

    def __init__(self, last_id: int):
        super().__init__(f"the log ends at event {last_id}, before this writer's last event")
        self.last_id = last_id


class BackendError(TokencastError):
    """A model backend failed. ``code`` is the failure code of the ``done`` event."""

    def __init__(self, message: str, code: str = "backend_error"):
        super().__init__(message)
        self.code = code
        self.message = message


class UnexpectedReply(TokencastError):
    """A Redis script answered something its decoder does not know."""
