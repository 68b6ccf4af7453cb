"""Settings, read once from the ``TOKENCAST_*`` environment variables.

Each setting is declared once, as a field of ``Settings``: its type is the
field's, and its variable, default, bounds and description are the
``setting(...)`` call beside it. ``Settings.from_env`` reads every declared
variable, and ``settings_table()`` is the README's Configuration table (a
test fails when they differ). Every setting has a default; a bad value, or
settings that contradict each other, fail at start-up with a
``SettingsError`` naming the variables, never later in a request.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import Any, get_type_hints

from services.errors import SettingsError

SPEC = "tokencast.setting"  # the key of a field's Spec in its metadata


@dataclass(frozen=True)
class Spec:
    """How one setting is read and documented."""

    env: str
    doc: str
    low: float | None = None  # numbers: the bounds, inclusive
    high: float | None = None
    choices: tuple[str, ...] = ()  # text: the values allowed (any case), the first the default
    shown_default: str | None = None  # the table's default, where the value does not say it


def setting(
    env: str,
    default: Any = None,
    *,
    doc: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[str, ...] = (),
    factory: Callable[[], Any] | None = None,
    shown_default: str | None = None,
) -> Any:
    """A ``Settings`` field read from ``env`` (see ``Spec``)."""
    metadata = {SPEC: Spec(env, doc, low, high, choices, shown_default)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """The whole configuration of a web node or a worker.

    ``redis_url`` is ``None`` when unset: ``tokencast dev`` then runs on its
    embedded broker, while ``serve`` and ``worker`` use ``DEFAULT_REDIS_URL``.
    """

    # The table's order: the broker, then the web tier, then timing and capacity.
    redis_url: str | None = setting(
        "TOKENCAST_REDIS_URL",
        doc="Redis for `serve`/`worker` (unset: `redis://127.0.0.1:6379/0`); "
        "`dev` uses its embedded broker when unset",
    )
    redis_cluster: bool = setting(
        "TOKENCAST_REDIS_CLUSTER",
        False,
        doc="`1`: `TOKENCAST_REDIS_URL` names a Redis Cluster node (sharded pub/sub)",
    )
    redis_sentinels: tuple[tuple[str, int], ...] = setting(
        "TOKENCAST_REDIS_SENTINELS",
        (),
        doc="the Sentinels of a Redis behind Sentinel; then only the password and database "
        "of `TOKENCAST_REDIS_URL` count, its host is ignored",
    )
    redis_sentinel_master: str = setting(
        "TOKENCAST_REDIS_SENTINEL_MASTER",
        "mymaster",
        doc="the name the Sentinels know the master by",
    )
    host: str = setting(
        "TOKENCAST_HOST", "127.0.0.1", doc="where `dev` and `serve` listen (`--host` overrides)"
    )
    port: int = setting(
        "TOKENCAST_PORT",
        8000,
        low=1,
        high=65535,
        doc="the port `dev` and `serve` listen on (`--port` overrides)",
    )
    api_keys: tuple[str, ...] = setting(
        "TOKENCAST_API_KEYS", (), doc="keys for creating and cancelling jobs"
    )
    secret: str | None = setting(
        "TOKENCAST_SECRET",
        doc="signs viewer tokens; when set, watching a job needs its token",
    )
    viewer_token_ttl_s: int = setting(
        "TOKENCAST_VIEWER_TOKEN_TTL", 86400, low=1, doc="seconds a viewer token stays valid"
    )
    cors_origins: tuple[str, ...] = setting(
        "TOKENCAST_CORS_ORIGINS",
        (),
        doc="origins whose pages may call the API and open event streams",
    )
    create_rate_per_minute: int = setting(
        "TOKENCAST_CREATE_RATE_PER_MINUTE",
        600,
        low=1,
        doc="jobs one API key (or, with keys off, one address) may create per minute; "
        "past it `429` + `Retry-After`",
    )
    max_streams_per_client: int = setting(
        "TOKENCAST_MAX_STREAMS_PER_CLIENT",
        1000,
        low=1,
        doc="open streams per client address on one web process; past it `429` + `Retry-After`",
    )
    trust_proxy: bool = setting(
        "TOKENCAST_TRUST_PROXY",
        False,
        doc="`1`: the client address is the last `X-Forwarded-For` hop "
        "(set it behind your load balancer only)",
    )
    worker_metrics_port: int = setting(
        "TOKENCAST_WORKER_METRICS_PORT",
        0,
        low=0,
        high=65535,
        doc="a worker serves its Prometheus metrics on this port (`0`: off)",
    )
    retention_s: float = setting(
        "TOKENCAST_RETENTION_SECONDS",
        3600.0,
        low=1,
        doc="how long a finished job's events stay resumable",
    )
    keepalive_s: float = setting(
        "TOKENCAST_KEEPALIVE_SECONDS",
        15.0,
        low=0.1,
        doc="a `: keepalive` comment after this long without output",
    )
    retry_ms: int = setting("TOKENCAST_RETRY_MS", 1000, low=0, doc="the stream's `retry:` value")
    max_queued_jobs: int = setting(
        "TOKENCAST_MAX_QUEUED_JOBS",
        1000,
        low=1,
        doc="jobs waiting for a worker before `POST /v1/jobs` gets `429`",
    )
    default_model: str = setting(
        "TOKENCAST_DEFAULT_MODEL", "demo", doc="the model of a job that names none"
    )
    lease_s: float = setting(
        "TOKENCAST_LEASE_SECONDS", 10.0, low=0.5, doc="a dead worker's job is noticed within this"
    )
    drain_s: float = setting(
        "TOKENCAST_DRAIN_SECONDS", 10.0, low=0, doc="a node exits this long after SIGTERM at most"
    )
    broker_grace_s: float = setting(
        "TOKENCAST_BROKER_GRACE_SECONDS",
        30.0,
        low=0,
        doc="how long an open stream waits out a broker outage",
    )
    max_streams: int = setting(
        "TOKENCAST_MAX_STREAMS",
        10000,
        low=1,
        doc="open streams per web process; past it new streams get `503` + `Retry-After`",
    )
    viewer_buffer: int = setting(
        "TOKENCAST_VIEWER_BUFFER",
        512,
        low=8,
        doc="live events a watched job keeps for its viewers (also at most 2 s of them); "
        "a viewer further behind catches up from the log",
    )
    worker_concurrency: int = setting(
        "TOKENCAST_WORKER_CONCURRENCY", 32, low=1, doc="jobs one worker process runs at once"
    )
    key_prefix: str = setting(
        "TOKENCAST_KEY_PREFIX",
        "tokencast",
        doc="prefix of every Redis key (several deployments, or tests, on one Redis)",
    )
    node_id: str = setting(
        "TOKENCAST_NODE_ID",
        factory=lambda: secrets.token_hex(6),
        shown_default="random",
        doc="this process's name in viewer counts and logs",
    )
    log_format: str = setting(
        "TOKENCAST_LOG_FORMAT",
        "text",
        choices=("text", "json"),
        doc="`text`, or `json` for one JSON object per line (Operations, Logs)",
    )
    log_prompts: bool = setting(
        "TOKENCAST_LOG_PROMPTS",
        False,
        doc="`1` writes each job's prompt in its `job created` log line",
    )
    upstream_base_url: str | None = setting(
        "TOKENCAST_UPSTREAM_BASE_URL",
        doc="the `/v1` URL of an OpenAI-compatible model server (with `TOKENCAST_UPSTREAM_MODELS`)",
    )
    upstream_api_key: str | None = setting(
        "TOKENCAST_UPSTREAM_API_KEY", doc="the model server's API key, if it needs one"
    )
    upstream_models: tuple[tuple[str, str], ...] = setting(
        "TOKENCAST_UPSTREAM_MODELS",
        (),
        doc="the models it offers, each under its own name or renamed "
        "(with `TOKENCAST_UPSTREAM_BASE_URL`)",
    )
    upstream_first_token_timeout_s: float = setting(
        "TOKENCAST_UPSTREAM_FIRST_TOKEN_TIMEOUT_SECONDS",
        60.0,
        low=0.1,
        doc="how long the upstream may take to start answering (retries included) "
        "before the job fails with `upstream_timeout`",
    )
    upstream_idle_timeout_s: float = setting(
        "TOKENCAST_UPSTREAM_IDLE_TIMEOUT_SECONDS",
        30.0,
        low=0.1,
        doc="how long the upstream may fall silent mid-answer "
        "before the job fails with `upstream_timeout`",
    )
    backends: tuple[str, ...] = setting(
        "TOKENCAST_BACKENDS",
        (),
        doc="backends to load into every worker, each `module:attribute` (Writing a backend); "
        "web nodes list their models from what workers advertise",
    )

    DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

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

        A variable unset or blank keeps its default. Raises ``SettingsError``
        naming the first variable with a bad value, or the variables that
        contradict each other.
        """
        env = os.environ if env is None else env
        values = {}
        for declared, spec, kind in declared_settings():
            raw = env.get(spec.env, "").strip()
            if raw:
                values[declared.name] = PARSERS[kind](spec, raw)
        settings = cls(**values)
        settings.check_together()
        return settings

    def check_together(self) -> None:
        """Raise ``SettingsError`` for settings that make no sense side by side."""
        if self.redis_cluster and self.redis_sentinels:
            raise SettingsError(
                "TOKENCAST_REDIS_CLUSTER and TOKENCAST_REDIS_SENTINELS cannot both be set"
            )
        base_url = "TOKENCAST_UPSTREAM_BASE_URL"
        if not self.upstream_base_url:
            for name, value in (
                ("TOKENCAST_UPSTREAM_MODELS", self.upstream_models),
                ("TOKENCAST_UPSTREAM_API_KEY", self.upstream_api_key),
            ):
                if value:
                    raise SettingsError(
                        f"{name} is set but {base_url} is not: "
                        f"name the model server's /v1 URL in {base_url}, or unset {name}"
                    )
        elif not self.upstream_models:
            raise SettingsError(
                f"{base_url} is set but TOKENCAST_UPSTREAM_MODELS is not: "
                "list the models to offer from it, or unset both"
            )
        if self.default_model not in self.models:
            raise SettingsError(
                f"TOKENCAST_DEFAULT_MODEL={self.default_model!r} is not a model "
                f"(demo or one of TOKENCAST_UPSTREAM_MODELS): {', '.join(self.models)}"
            )


def declared_settings() -> Iterator[tuple[Field[Any], Spec, Any]]:
    """Each setting in declaration order: its field, its ``Spec``, its type."""
    types = get_type_hints(Settings)
    for declared in fields(Settings):
        yield declared, declared.metadata[SPEC], types[declared.name]


def settings_table() -> str:
    """The README's Configuration table: one row per setting, as declared."""
    rows = ["| variable | default | values | meaning |", "|---|---|---|---|"]
    for declared, spec, kind in declared_settings():
        default = declared.default
        if spec.shown_default is not None:
            shown = spec.shown_default
        elif default is None or default == ():
            shown = "unset"
        elif isinstance(default, bool):
            shown = f"`{int(default)}`"
        else:
            shown = f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        rows.append(f"| `{spec.env}` | {shown} | {_values(spec, kind)} | {spec.doc} |")
    return "\n".join(rows) + "\n"


def _values(spec: Spec, kind: Any) -> str:
    """What the table says a setting accepts."""
    if spec.choices:
        return " or ".join(f"`{choice}`" for choice in spec.choices)
    if spec.low is not None:
        return f"{'integer' if kind is int else 'number'}, {_limit(spec.low, spec.high)}"
    return {
        bool: "`1` or `0`",
        tuple[str, ...]: "comma-separated",
        tuple[tuple[str, str], ...]: "comma-separated, each `name` or `name=upstream-name`",
        tuple[tuple[str, int], ...]: "comma-separated `host:port`",
    }.get(kind, "text")


def _limit(low: float, high: float | None) -> str:
    return f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"


def _text(spec: Spec, raw: str) -> str:
    if spec.choices and raw.lower() not in spec.choices:
        raise SettingsError(f"{spec.env}={raw!r} must be one of: {', '.join(spec.choices)}")
    return raw.lower() if spec.choices else raw


def _flag(spec: Spec, raw: str) -> bool:
    raw = raw.lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise SettingsError(f"{spec.env}={raw!r} must be 1 or 0")
    return raw in ("1", "true", "yes")


def _number(kind: Callable[[str], float]) -> Callable[[Spec, str], float]:
    def parse(spec: Spec, raw: str) -> float:
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(f"{spec.env}={raw!r} is not a valid {kind.__name__}") from None
        low = spec.low if spec.low is not None else float("-inf")
        if value != value or value < low or (spec.high is not None and value > spec.high):
            raise SettingsError(f"{spec.env}={raw!r} must be {_limit(low, spec.high)}")
        return value

    return parse


def _csv(spec: Spec, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _model_map(spec: Spec, raw: str) -> tuple[tuple[str, str], ...]:
    """``a,b=upstream-b`` → ``(("a", "a"), ("b", "upstream-b"))``."""
    pairs = []
    for item in _csv(spec, raw):
        local, _, upstream = item.partition("=")
        local, upstream = local.strip(), (upstream.strip() or local.strip())
        if not local:
            raise SettingsError(f"{spec.env}: {item!r} has no model name before '='")
        pairs.append((local, upstream))
    return tuple(pairs)


def _addresses(spec: Spec, raw: str) -> tuple[tuple[str, int], ...]:
    """``a:26379, [::1]:26380`` → ``(("a", 26379), ("::1", 26380))``."""
    pairs = []
    for item in _csv(spec, raw):
        host, _, port = item.rpartition(":")
        host = host.strip().removeprefix("[").removesuffix("]")
        if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise SettingsError(f"{spec.env}: {item!r} must be host:port, port from 1 to 65535")
        pairs.append((host, int(port)))
    return tuple(pairs)


# A setting's type → how its variable is read.
PARSERS: dict[Any, Callable[[Spec, str], Any]] = {
    str: _text,
    str | None: _text,
    bool: _flag,
    int: _number(int),
    float: _number(float),
    tuple[str, ...]: _csv,
    tuple[tuple[str, str], ...]: _model_map,
    tuple[tuple[str, int], ...]: _addresses,
}
