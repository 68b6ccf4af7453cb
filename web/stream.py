"""``GET /v1/jobs/<id>/events``: one viewer's event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Blueprint, Response, make_response, request

from services.feed import Feed
from services.resume import parse_last_event_id
from web.api import job_id_or_404
from web.context import Context, ctx
from web.errors import BROKER_RETRY_AFTER_S, error_response
from web.sse import HEADERS, KEEPALIVE_FRAME, native_frame, retry_frame

bp = Blueprint("stream", __name__)

FORMATS = ("native",)


@bp.get("/v1/jobs/<job_id>/events")
async def job_events(job_id: str) -> Response:
    context = ctx()
    after = parse_last_event_id(
        request.headers.get("Last-Event-ID"), request.args.get("last_event_id")
    )
    fmt = request.args.get("format") or "native"
    if fmt not in FORMATS:
        return error_response(
            400, "invalid_request", f"format must be one of: {', '.join(FORMATS)}", param="format"
        )
    job_id = job_id_or_404(job_id)
    refusal = _refuse_new_stream(context)
    if refusal is not None:
        return refusal
    position = await context.store.position(job_id)
    if after > position.last_event_id:
        return error_response(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID {after} is past the job's last event ({position.last_event_id})",
            param="Last-Event-ID",
        )
    if position.finished and after == position.last_event_id:
        return Response("", status=204)  # tells EventSource to stop reconnecting

    response: Response = await make_response(  # type: ignore[assignment]
        _stream(context, job_id, after), 200, HEADERS
    )
    response.timeout = None  # Quart would cut a stream after 60 s
    return response


def _refuse_new_stream(context: Context) -> Response | None:
    """A 503 (so the load balancer tries another node) when this node cannot serve."""
    headers = {"Retry-After": str(BROKER_RETRY_AFTER_S)}
    if context.draining:
        return error_response(503, "draining", "this node is shutting down", headers=headers)
    if not context.hub.healthy():
        message = "the broker is unreachable; retry shortly"
        return error_response(503, "broker_unavailable", message, headers=headers)
    if context.hub.viewer_total >= context.settings.max_streams:
        message = (
            f"this node has {context.settings.max_streams} open streams"
            " (TOKENCAST_MAX_STREAMS); retry shortly"
        )
        return error_response(503, "too_many_streams", message, headers=headers)
    return None


async def _stream(context: Context, job_id: str, after: int) -> AsyncIterator[bytes]:
    settings = context.settings
    feed = Feed(
        context.hub,
        context.log,
        context.store.exists,
        keepalive_s=settings.keepalive_s,
        grace_s=settings.broker_grace_s,
        stopping=lambda: context.draining,
    )
    yield retry_frame(settings.retry_ms)
    async for batch in feed.watch(job_id, after):
        if batch is None:
            yield KEEPALIVE_FRAME
        else:
            yield b"".join(native_frame(event) for event in batch)
