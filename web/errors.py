"""Every error leaves as JSON: ``{"error": {"code": …, "message": …}}``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from quart import Quart, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from services.errors import BrokerUnavailable, JobFinished, JobNotFound, QueueFull, RateLimited
from services.redisconn import is_broker_unavailability
from services.resume import InvalidLastEventId
from web.auth import AccessDenied
from web.models import MAX_BODY_BYTES, InvalidField

log = logging.getLogger(__name__)

BROKER_RETRY_AFTER_S = 2
QUEUE_RETRY_AFTER_S = 5

HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    431: "headers_too_large",
}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict = {"code": code, "message": message}
    if param is not None:
        body["param"] = param
    response = jsonify({"error": body})
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


async def invalid_field(exc: InvalidField) -> Response:
    return error_response(400, "invalid_request", exc.message, param=exc.field)


async def access_denied(exc: AccessDenied) -> Response:
    # Read the body before refusing: a load balancer reuses this connection.
    await request.get_data()
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, headers=headers)


async def invalid_last_event_id(exc: InvalidLastEventId) -> Response:
    return error_response(400, "invalid_last_event_id", str(exc), param="Last-Event-ID")


async def job_not_found(exc: JobNotFound) -> Response:
    return error_response(404, "job_not_found", str(exc))


async def job_finished(exc: JobFinished) -> Response:
    return error_response(409, "job_finished", str(exc))


async def rate_limited(exc: RateLimited) -> Response:
    await request.get_data()  # keep a load balancer's connection clean
    headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(429, "rate_limited", exc.message, headers=headers)


async def queue_full(exc: QueueFull) -> Response:
    headers = {"Retry-After": str(QUEUE_RETRY_AFTER_S)}
    return error_response(429, "queue_full", str(exc), headers=headers)


async def broker_unavailable(exc: BrokerUnavailable) -> Response:
    log.warning("broker unavailable: %s", exc)
    return broker_unavailable_response()


async def http_error(exc: HTTPException) -> Response:
    status = exc.code or 500
    message = exc.description or exc.name
    if status == 413:
        message = f"the request body is larger than {MAX_BODY_BYTES} bytes (1 MiB)"
    elif status == 404:
        message = "no such resource"
    elif status == 405:
        allowed = getattr(exc, "valid_methods", None) or []
        message = f"this method is not allowed here; use {', '.join(sorted(allowed))}"
    headers = {
        name: value
        for name, value in exc.get_headers()
        if name.lower() not in ("content-type", "content-length")
    }
    code = HTTP_CODES.get(status, "http_error")
    return error_response(status, code, message, headers=headers)


async def unexpected(exc: Exception) -> Response:
    if is_broker_unavailability(exc):
        # READONLY, LOADING or a dropped connection that a path did not
        # translate: still the broker's unavailability, not our bug.
        log.warning("broker unavailable (untranslated %s): %s", type(exc).__name__, exc)
        return broker_unavailable_response()
    log.exception("unhandled error")
    return error_response(500, "internal_error", "an internal error occurred")


# Each failure and the handler that answers it (Quart picks the most specific class).
HANDLERS: tuple[tuple[type[Exception], Callable[..., Awaitable[Response]]], ...] = (
    (InvalidField, invalid_field),
    (AccessDenied, access_denied),
    (InvalidLastEventId, invalid_last_event_id),
    (JobNotFound, job_not_found),
    (JobFinished, job_finished),
    (RateLimited, rate_limited),
    (QueueFull, queue_full),
    (BrokerUnavailable, broker_unavailable),
    (HTTPException, http_error),
    (Exception, unexpected),
)


def install(app: Quart) -> None:
    """Register the handlers that turn every failure into a JSON error."""
    for exc, handler in HANDLERS:
        app.register_error_handler(exc, handler)


def broker_unavailable_response() -> Response:
    headers = {"Retry-After": str(BROKER_RETRY_AFTER_S)}
    message = "the broker is unreachable; retry shortly"
    return error_response(503, "broker_unavailable", message, headers=headers)
