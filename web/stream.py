"""``GET /v1/jobs/<id>/events``: one viewer's event stream."""

from __future__ import annotations

from collections.abc import AsyncIterator

from quart import Blueprint, Response, request
from quart_schema import document_querystring, document_response

from services import metrics
from services.feed import END, Batch
from services.logs import count_events
from services.redisconn import raise_lost_cancel
from services.resume import parse_last_event_id
from web.api import job_id_or_404
from web.auth import require_viewer
from web.context import Context, ctx
from web.errors import BROKER_RETRY_AFTER_S, error_response
from web.limits import client_address
from web.openai_format import ChunkEncoder, include_usage_param
from web.schemas import ErrorBody, EventsQuery
from web.sse import HEADERS, NATIVE_ENCODING, Encoding, retry_frame

bp = Blueprint("stream", __name__)

FORMATS = ("native", "openai")


@bp.get("/v1/jobs/<job_id>/events")
@document_querystring(EventsQuery)
@document_response(ErrorBody, 400)
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
    require_viewer(job_id)
    refusal = refuse_new_stream(context)
    if refusal is not None:
        return refusal
    position = context.feed.known_position(job_id, after) or await context.store.position(job_id)
    # Right after a failover the log may end before what viewers saw, until
    # its writer restores it: such a viewer waits (``Feed.open``) instead.
    ahead = after > position.last_event_id
    grace_s = context.settings.broker_grace_s
    if ahead and (position.finished or not context.hub.back_within(grace_s)):
        return error_response(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID {after} is past the job's last event ({position.last_event_id})",
            param="Last-Event-ID",
        )
    if position.finished and after == position.last_event_id:
        return Response("", status=204)  # tells EventSource to stop reconnecting
    if fmt == "openai":
        include_usage = include_usage_param(request.args.get("include_usage"))
        state = await context.store.get(job_id)
        encoding, retry_ms = ChunkEncoder.for_job(state, include_usage).encoding(), None
    else:
        encoding, retry_ms = NATIVE_ENCODING, context.settings.retry_ms
    return stream_response(
        event_stream(context, job_id, after, encoding, retry_ms, position.finished, ahead=ahead)
    )


def stream_response(body: AsyncIterator[bytes], headers: dict[str, str] | None = None) -> Response:
    """A ``200`` event stream with the SSE headers, never cut by Quart's response timeout.

    Built directly rather than with ``make_response``: that path converts the
    headers through a pydantic ``TypeAdapter`` made per call (quart-schema),
    a noticeable part of the cost of opening a stream.
    """
    response = Response(body, 200, {**HEADERS, **(headers or {})})
    response.timeout = None  # Quart would cut a stream after 60 s
    return response


def refuse_new_stream(context: Context) -> Response | None:
    """A 503 (so the load balancer tries another node) when this node cannot serve."""
    headers = {"Retry-After": str(BROKER_RETRY_AFTER_S)}
    if context.draining:
        return error_response(503, "draining", "this node is shutting down", headers=headers)
    if not context.hub.healthy():
        message = "the broker is unreachable; retry shortly"
        return error_response(503, "broker_unavailable", message, headers=headers)
    context.client_streams.check(client_address())
    if context.hub.viewer_total >= context.settings.max_streams:
        message = (
            f"this node has {context.settings.max_streams} open streams"
            " (TOKENCAST_MAX_STREAMS); retry shortly"
        )
        return error_response(503, "too_many_streams", message, headers=headers)
    return None


def event_stream(
    context: Context,
    job_id: str,
    after: int,
    encoding: Encoding,
    retry_ms: int | None,
    finished: bool = False,
    *,
    ahead: bool = False,
) -> AsyncIterator[bytes]:
    """The job's events after ``after``, in ``encoding``; ``ahead``: ``after``
    is past the log's end (see ``Feed.open``).

    Opens with a ``retry:`` line unless ``retry_ms`` is ``None`` (the OpenAI
    format: its official client cannot parse a block without ``data``).
    """
    # Read now: the generator runs after the handler returns, outside the request.
    address = client_address()
    return _event_stream(context, job_id, after, encoding, retry_ms, finished, ahead, address)


async def _event_stream(
    context: Context,
    job_id: str,
    after: int,
    encoding: Encoding,
    retry_ms: int | None,
    finished: bool,
    ahead: bool,
    address: str,
) -> AsyncIterator[bytes]:
    context.client_streams.opened(address)
    session = None
    try:
        if retry_ms is not None:
            yield retry_frame(retry_ms)
            raise_lost_cancel()
        session = await context.feed.open(job_id, after, finished, ahead)
        while session is not None:
            step = await session.next()
            if isinstance(step, Batch):
                frames = encoding.frames(step.events, step.after)
                metrics.BYTES_SENT.inc(len(frames))
                count_events(len(step.events))
                yield frames
            elif step is END:
                return
            else:
                yield encoding.keepalive
            raise_lost_cancel()
    finally:
        if session is not None:
            session.close()
        context.client_streams.closed(address)
