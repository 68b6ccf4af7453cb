"""Settings, read once from the ``TOKENCAST_*`` environment variables.

Every setting has a default; a bad value fails at start-up with a
``SettingsError`` naming the variable, never later in a request.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from services.errors import SettingsError

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """The whole configuration of a web node or a worker.

    ``redis_url`` is ``None`` when unset: ``tokencast dev`` then runs on its
    embedded broker, while ``serve`` and ``worker`` use ``DEFAULT_REDIS_URL``.
    """

    redis_url: str | None = None
    redis_cluster: bool = False
    redis_sentinels: tuple[tuple[str, int], ...] = ()
    redis_sentinel_master: str = "mymaster"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    secret: str | None = None
    viewer_token_ttl_s: int = 86400
    cors_origins: tuple[str, ...] = ()
    create_rate_per_minute: int = 600
    max_streams_per_client: int = 1000
    trust_proxy: bool = False
    worker_metrics_port: int = 0
    retention_s: float = 3600.0
    keepalive_s: float = 15.0
    retry_ms: int = 1000
    max_queued_jobs: int = 1000
    default_model: str = "demo"
    lease_s: float = 10.0
    drain_s: float = 10.0
    broker_grace_s: float = 30.0
    max_streams: int = 10000
    viewer_buffer: int = 512
    worker_concurrency: int = 32
    key_prefix: str = "tokencast"
    node_id: str = field(default_factory=lambda: secrets.token_hex(6))
    log_format: str = "text"
    log_prompts: bool = False
    upstream_base_url: str | None = None
    upstream_api_key: str | None = None
    upstream_models: tuple[tuple[str, str], ...] = ()
    upstream_first_token_timeout_s: float = 60.0
    upstream_idle_timeout_s: float = 30.0

    DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

    def __post_init__(self) -> None:
        if self.redis_cluster and self.redis_sentinels:
            raise SettingsError(
                "TOKENCAST_REDIS_CLUSTER and TOKENCAST_REDIS_SENTINELS cannot both be set"
            )

    @property
    def broker_url(self) -> str:
        """The Redis URL that ``serve`` and ``worker`` connect to."""
        return self.redis_url or self.DEFAULT_REDIS_URL

    @property
    def models(self) -> list[str]:
        """Every model a job may ask for: ``demo``, then the upstream ones."""
        upstream = [name for name, _ in self.upstream_models] if self.upstream_base_url else []
        return ["demo", *(name for name in upstream if name != "demo")]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from ``env`` (default ``os.environ``).

        Raises ``SettingsError`` naming the first variable with a bad value.
        """
        env = os.environ if env is None else env
        reader = _Reader(env)
        return cls(
            redis_url=reader.text("TOKENCAST_REDIS_URL"),
            redis_cluster=reader.flag("TOKENCAST_REDIS_CLUSTER"),
            redis_sentinels=reader.addresses("TOKENCAST_REDIS_SENTINELS"),
            redis_sentinel_master=(
                reader.text("TOKENCAST_REDIS_SENTINEL_MASTER") or cls.redis_sentinel_master
            ),
            host=reader.text("TOKENCAST_HOST") or cls.host,
            port=reader.number("TOKENCAST_PORT", int, cls.port, 1, 65535),
            api_keys=reader.csv("TOKENCAST_API_KEYS"),
            secret=reader.text("TOKENCAST_SECRET"),
            viewer_token_ttl_s=reader.number(
                "TOKENCAST_VIEWER_TOKEN_TTL", int, cls.viewer_token_ttl_s, 1
            ),
            cors_origins=reader.csv("TOKENCAST_CORS_ORIGINS"),
            create_rate_per_minute=reader.number(
                "TOKENCAST_CREATE_RATE_PER_MINUTE", int, cls.create_rate_per_minute, 1
            ),
            max_streams_per_client=reader.number(
                "TOKENCAST_MAX_STREAMS_PER_CLIENT", int, cls.max_streams_per_client, 1
            ),
            trust_proxy=reader.flag("TOKENCAST_TRUST_PROXY"),
            worker_metrics_port=reader.number(
                "TOKENCAST_WORKER_METRICS_PORT", int, cls.worker_metrics_port, 0, 65535
            ),
            retention_s=reader.number("TOKENCAST_RETENTION_SECONDS", float, cls.retention_s, 1),
            keepalive_s=reader.number("TOKENCAST_KEEPALIVE_SECONDS", float, cls.keepalive_s, 0.1),
            retry_ms=reader.number("TOKENCAST_RETRY_MS", int, cls.retry_ms, 0),
            max_queued_jobs=reader.number("TOKENCAST_MAX_QUEUED_JOBS", int, cls.max_queued_jobs, 1),
            default_model=reader.text("TOKENCAST_DEFAULT_MODEL") or cls.default_model,
            lease_s=reader.number("TOKENCAST_LEASE_SECONDS", float, cls.lease_s, 0.5),
            drain_s=reader.number("TOKENCAST_DRAIN_SECONDS", float, cls.drain_s, 0),
            broker_grace_s=reader.number(
                "TOKENCAST_BROKER_GRACE_SECONDS", float, cls.broker_grace_s, 0
            ),
            max_streams=reader.number("TOKENCAST_MAX_STREAMS", int, cls.max_streams, 1),
            viewer_buffer=reader.number("TOKENCAST_VIEWER_BUFFER", int, cls.viewer_buffer, 8),
            worker_concurrency=reader.number(
                "TOKENCAST_WORKER_CONCURRENCY", int, cls.worker_concurrency, 1
            ),
            key_prefix=reader.text("TOKENCAST_KEY_PREFIX") or cls.key_prefix,
            node_id=reader.text("TOKENCAST_NODE_ID") or secrets.token_hex(6),
            log_format=reader.choice("TOKENCAST_LOG_FORMAT", ("text", "json")),
            log_prompts=reader.flag("TOKENCAST_LOG_PROMPTS"),
            upstream_base_url=reader.text("TOKENCAST_UPSTREAM_BASE_URL"),
            upstream_api_key=reader.text("TOKENCAST_UPSTREAM_API_KEY"),
            upstream_models=reader.model_map("TOKENCAST_UPSTREAM_MODELS"),
            upstream_first_token_timeout_s=reader.number(
                "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS",
                float,
                cls.upstream_first_token_timeout_s,
                0.1,
            ),
            upstream_idle_timeout_s=reader.number(
                "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS", float, cls.upstream_idle_timeout_s, 0.1
            ),
        )


class _Reader:
    """Parses one environment variable at a time, naming it in every error."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def flag(self, name: str) -> bool:
        raw = (self.text(name) or "0").lower()
        if raw not in ("0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"{name}={raw!r} must be 1 or 0")
        return raw in ("1", "true", "yes")

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        """One of ``choices`` (any case); the first when unset."""
        raw = self.text(name) or choices[0]
        if raw.lower() not in choices:
            raise SettingsError(f"{name}={raw!r} must be one of: {', '.join(choices)}")
        return raw.lower()

    def csv(self, name: str) -> tuple[str, ...]:
        return tuple(part.strip() for part in self.env.get(name, "").split(",") if part.strip())

    def number(
        self,
        name: str,
        kind: Callable[[str], T],
        default: T,
        low: float,
        high: float | None = None,
    ) -> T:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
        number = float(value)  # type: ignore[arg-type]
        if number != number or number < low or (high is not None and number > high):
            limit = f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"
            raise SettingsError(f"{name}={raw!r} must be {limit}")
        return value

    def addresses(self, name: str) -> tuple[tuple[str, int], ...]:
        """``a:26379, [::1]:26380`` → ``(("a", 26379), ("::1", 26380))``."""
        pairs = []
        for item in self.csv(name):
            host, _, port = item.rpartition(":")
            host = host.strip().removeprefix("[").removesuffix("]")
            if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
                raise SettingsError(f"{name}: {item!r} must be host:port, port from 1 to 65535")
            pairs.append((host, int(port)))
        return tuple(pairs)

    def model_map(self, name: str) -> tuple[tuple[str, str], ...]:
        """``a,b=upstream-b`` → ``(("a", "a"), ("b", "upstream-b"))``."""
        pairs = []
        for item in self.csv(name):
            local, _, upstream = item.partition("=")
            local, upstream = local.strip(), (upstream.strip() or local.strip())
            if not local:
                raise SettingsError(f"{name}: {item!r} has no model name before '='")
            pairs.append((local, upstream))
        return tuple(pairs)
