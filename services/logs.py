"""Logging for every tokencast process: one handler on the root logger, set up
once at start-up by ``configure``.

Lines are plain text, or JSON objects one per line with
``TOKENCAST_LOG_FORMAT=json``: ``ts``, ``level``, ``logger``, ``message``,
``node_id``, ``request_id``, ``job_id``, the fields a line adds (an access
line's ``method``, ``path``, ``status``, ``duration_ms``…) and ``exception``
when there is one.

The ids come from context variables: ``AccessLog`` (the web app's ASGI
middleware) opens a request scope with the request id; ``set_job_id`` names
the job of the current request or task; ``job_scope`` names one for a block.
Tasks started inside a request inherit its scope; once the request has
ended, their lines stop carrying its ids.

Secrets never reach the output: no line carries a query string, and every
line is scrubbed of ``token=``-style parameters, ``Authorization`` values,
Bearer credentials, passwords in URLs and the configured keys themselves.
Prompts are logged only with ``TOKENCAST_LOG_PROMPTS=1``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from services.config import Settings

ACCESS_LOGGER = "tokencast.access"
JOBS_LOGGER = "tokencast.jobs"
REQUEST_ID_HEADER = b"x-request-id"
REDACTED = "[redacted]"

# A caller's request id is kept when it looks like one (a UUID, nginx's
# $request_id, a trace id); anything else is replaced rather than logged.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


@dataclass
class _Scope:
    """The ids of one request or one job's work, shared by the tasks it starts."""

    request_id: str | None = None
    job_id: str | None = None
    ended: bool = False
    events: int = 0  # events an event stream wrote (``count_events``)


_scope: contextvars.ContextVar[_Scope | None] = contextvars.ContextVar(
    "tokencast_log_scope", default=None
)
_log_prompts = False


def current_ids() -> tuple[str | None, str | None]:
    """``(request_id, job_id)`` of the current context; ``None`` where unknown."""
    scope = _scope.get()
    if scope is None or scope.ended:
        return None, None
    return scope.request_id, scope.job_id


def set_job_id(job_id: str) -> None:
    """Name the job the current request, or the current task, is about.

    In a request the whole request sees it, its access line included; in a
    task outside any request (a worker's job) it holds until the task ends.
    """
    scope = _scope.get()
    if scope is not None and not scope.ended:
        scope.job_id = job_id
    else:
        _scope.set(_Scope(job_id=job_id))


def count_events(count: int) -> None:
    """Add ``count`` to the events the current request's stream wrote (for its
    access line); the stream knows them, so the middleware need not scan bytes."""
    scope = _scope.get()
    if scope is not None:
        scope.events += count


@contextlib.contextmanager
def job_scope(job_id: str) -> Iterator[None]:
    """Name ``job_id`` on every line logged in the block (the reaper's work on one job)."""
    request_id, _ = current_ids()
    token = _scope.set(_Scope(request_id=request_id, job_id=job_id))
    try:
        yield
    finally:
        _scope.reset(token)


def job_created(job_id: str, model: str, prompt: str) -> None:
    """Name the new job and log its creation; the prompt only with TOKENCAST_LOG_PROMPTS=1."""
    set_job_id(job_id)
    logger = logging.getLogger(JOBS_LOGGER)
    if _log_prompts:
        fields = {"model": model, "prompt": prompt}
        logger.info("job created (model %s); prompt: %r", model, prompt, extra={"fields": fields})
    else:
        logger.info("job created (model %s)", model, extra={"fields": {"model": model}})


def request_id_from(header: str | None) -> str:
    """The caller's ``X-Request-ID`` when it is sane, else a new random one."""
    if header and _SANE_REQUEST_ID.fullmatch(header):
        return header
    return secrets.token_hex(16)


# Scrubbing secrets.

_QUERY_SECRET = re.compile(
    r"(?i)(?<![\w-])((?:access_)?token|api_?key|key|secret|password|sig(?:nature)?)="
    r"[^&\s\"'#,;)\\]+"
)
_AUTH_VALUE = re.compile(
    r"(?i)\b(authorization|proxy-authorization|x-api-key|api-key)([\"']?\s*[:=]\s*[\"']?)"
    r"(?:(bearer|basic|token)\s+)?[^\s\"',}\]\\]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:\"']*:[^/\s@\"']*@")


class Redactor:
    """Removes credentials from text: known secret values, and anything shaped like one."""

    def __init__(self, known: Iterable[str] = ()):
        # Longest first, so a key that contains another is removed whole.
        self.known = sorted({k for k in known if len(k) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.known:
            if value in text:
                text = text.replace(value, REDACTED)
        text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
        text = _AUTH_VALUE.sub(_auth_replacement, text)
        text = _BEARER.sub(rf"\1 {REDACTED}", text)
        return _QUERY_SECRET.sub(rf"\1={REDACTED}", text)

    @classmethod
    def for_settings(cls, settings: Settings) -> Redactor:
        known = [*settings.api_keys, settings.secret or "", settings.upstream_api_key or ""]
        if settings.redis_url:
            password = urlsplit(settings.redis_url).password
            known += [password, unquote(password)] if password else []
        return cls(known)


def _auth_replacement(match: re.Match[str]) -> str:
    scheme = f"{match.group(3)} " if match.group(3) else ""
    return f"{match.group(1)}{match.group(2)}{scheme}{REDACTED}"


# Formatting.


class ContextFilter(logging.Filter):
    """Puts ``node_id``, ``request_id`` and ``job_id`` on every record it sees."""

    def __init__(self, node_id: str):
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        request_id, job_id = current_ids()
        record.node_id = self.node_id
        record.request_id = getattr(record, "request_id", None) or request_id
        record.job_id = getattr(record, "job_id", None) or job_id
        return True


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger> node=… request=… job=…: <message>``, scrubbed."""

    def __init__(self, redact: Redactor | None = None):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s")
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        ids = [
            f" {label}={value}"
            for label, value in (
                ("node", getattr(record, "node_id", None)),
                ("request", getattr(record, "request_id", None)),
                ("job", getattr(record, "job_id", None)),
            )
            if value
        ]
        record.ids = "".join(ids)
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; every string in it scrubbed before encoding."""

    def __init__(self, redact: Redactor | None = None):
        super().__init__()
        self.redact = redact or Redactor()

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": self.redact(record.getMessage()),
            "node_id": getattr(record, "node_id", None),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for name, value in (getattr(record, "fields", None) or {}).items():
            if name not in line:
                line[name] = self.redact(value) if isinstance(value, str) else value
        exception = self.formatException(record.exc_info) if record.exc_info else record.exc_text
        if record.stack_info:
            exception = f"{exception or ''}\n{self.formatStack(record.stack_info)}".strip()
        if exception:
            line["exception"] = self.redact(exception)
        return json.dumps(line, ensure_ascii=True, default=str)


def configure(settings: Settings, stream: TextIO | None = None) -> logging.Handler:
    """Send every process log line, at INFO and up, to ``stream`` (stderr) in
    ``settings.log_format``. Replaces any handler installed before, so calling
    it again does not double the lines."""
    global _log_prompts
    _log_prompts = settings.log_prompts
    redact = Redactor.for_settings(settings)
    formatter = JsonFormatter(redact) if settings.log_format == "json" else TextFormatter(redact)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter(settings.node_id))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return handler


# The web tier's access log, as ASGI middleware (no web framework needed).

# (scope, receive, send): loosely typed, so that any server's or framework's types fit.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


class AccessLog:
    """Wraps an ASGI app: gives each HTTP request a request id (the caller's
    sane ``X-Request-ID``, else a new one), echoes it in the response's
    ``X-Request-ID``, and logs one line when the response ends: method, path
    (never the query string), status, duration in ms, and for an event
    stream the events and bytes it sent. Status 0: no response was started
    (the client went away first)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope.get("headers", ()) if k == REQUEST_ID_HEADER), b"")
        request = _Scope(request_id=request_id_from(header.decode("latin-1")))
        token = _scope.set(request)
        started = time.perf_counter()
        sent = _Sent()

        async def send_and_count(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = sent.start(message, request.request_id or "")
            elif message["type"] == "http.response.body":
                sent.body(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            sent.events = request.events
            sent.log(scope, (time.perf_counter() - started) * 1000)
            request.ended = True
            _scope.reset(token)


class _Sent:
    """What one response sent, counted as it goes."""

    def __init__(self) -> None:
        self.status = 0
        self.stream = False
        self.events = 0
        self.bytes = 0

    def start(self, message: Any, request_id: str) -> Any:
        self.status = int(message["status"])
        headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER]
        for name, value in headers:
            if name.lower() == b"content-type" and value.startswith(b"text/event-stream"):
                self.stream = True
        return {**message, "headers": [*headers, (REQUEST_ID_HEADER, request_id.encode())]}

    def body(self, chunk: bytes) -> None:
        self.bytes += len(chunk)

    def log(self, scope: MutableMapping[str, Any], duration_ms: float) -> None:
        method = str(scope.get("method", ""))
        path = _printable(str(scope.get("path", "")))
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "status": self.status,
            "duration_ms": round(duration_ms, 1),
        }
        message = f"{method} {path} {self.status} {duration_ms:.1f}ms"
        if self.stream:
            fields.update(events=self.events, bytes=self.bytes)
            message += f" (stream: {self.events} events, {self.bytes} bytes)"
        logging.getLogger(ACCESS_LOGGER).info(message, extra={"fields": fields})


def _printable(path: str, limit: int = 256) -> str:
    """A decoded path as one safe line: control characters escaped, long ones cut."""
    if len(path) > limit:
        path = path[:limit] + "…"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
