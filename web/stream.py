"""``GET /v1/jobs/<id>/events``: one viewer's event stream."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

from quart import Blueprint, Response, request
from quart_schema import document_querystring, document_response

from services import metrics
from services.feed import END, Batch
from services.logs import count_events
from services.redisconn import raise_lost_cancel
from services.resume import parse_last_event_id
from web.api import job_id_or_404
from web.auth import bearer_of, check_viewer
from web.context import Context, ctx
from web.errors import BROKER_RETRY_AFTER_S, error_response
from web.limits import client_address
from web.openai_format import ChunkEncoder, include_usage_param
from web.schemas import ErrorBody, EventsQuery
from web.sse import HEADERS, NATIVE_ENCODING, Encoding, retry_frame

bp = Blueprint("stream", __name__)

FORMATS = ("native", "openai")


@dataclass(frozen=True, slots=True)
class StreamAsk:
    """What a request for a job's events asks, read off its path, headers and
    query by whichever serves it (this route, or ``web.stream_asgi``)."""

    job_id: str
    last_event_id: str | None  # the Last-Event-ID header
    query: Mapping[str, str]
    authorization: str  # the Authorization header, "" without one
    address: str  # the client's, as ``web.limits.client_address`` tells it

    @classmethod
    def of_request(cls, job_id: str) -> StreamAsk:
        """The current Quart request's."""
        return cls(
            job_id,
            request.headers.get("Last-Event-ID"),
            request.args,
            request.headers.get("Authorization", ""),
            client_address(),
        )


@dataclass(frozen=True, slots=True)
class StreamPlan:
    """A stream to open (``planned_stream`` gives its bytes)."""

    job_id: str
    after: int
    encoding: Encoding
    retry_ms: int | None
    finished: bool
    ahead: bool
    address: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error answer instead of a stream (``web.errors.error_response``'s arguments)."""

    status: int
    code: str
    message: str
    param: str | None = None
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class NoContent:
    """The job has ended and the viewer has every event: ``204``."""


NO_CONTENT = NoContent()


@bp.get("/v1/jobs/<job_id>/events")
@document_querystring(EventsQuery)
@document_response(ErrorBody, 400)
async def job_events(job_id: str) -> Response:
    context = ctx()
    plan = await plan_stream(context, StreamAsk.of_request(job_id))
    if isinstance(plan, Refusal):
        return refusal_response(plan)
    if isinstance(plan, NoContent):
        return Response("", status=204)  # tells EventSource to stop reconnecting
    return stream_response(planned_stream(context, plan))


async def plan_stream(context: Context, ask: StreamAsk) -> StreamPlan | Refusal | NoContent:
    """Decide what a request for a job's events gets: a stream, a refusal,
    or ``NO_CONTENT``. Raises what ``web.errors`` answers (an unknown job, a
    wrong token, a malformed Last-Event-ID, the broker unreachable)."""
    after = parse_last_event_id(ask.last_event_id, ask.query.get("last_event_id"))
    fmt = ask.query.get("format") or "native"
    if fmt not in FORMATS:
        message = f"format must be one of: {', '.join(FORMATS)}"
        return Refusal(400, "invalid_request", message, param="format")
    job_id = job_id_or_404(ask.job_id)
    check_viewer(context, job_id, ask.query.get("token") or bearer_of(ask.authorization))
    refusal = stream_refusal(context, ask.address)
    if refusal is not None:
        return refusal
    position = context.feed.known_position(job_id, after) or await context.store.position(job_id)
    # Right after a failover the log may end before what viewers saw, until
    # its writer restores it: such a viewer waits (``Feed.open``) instead.
    ahead = after > position.last_event_id
    grace_s = context.settings.broker_grace_s
    if ahead and (position.finished or not context.hub.back_within(grace_s)):
        return Refusal(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID {after} is past the job's last event ({position.last_event_id})",
            param="Last-Event-ID",
        )
    if position.finished and after == position.last_event_id:
        return NO_CONTENT
    if fmt == "openai":
        include_usage = include_usage_param(ask.query.get("include_usage"))
        head = await context.store.head(job_id)
        encoding, retry_ms = ChunkEncoder.for_job(head, include_usage).encoding(), None
    else:
        encoding, retry_ms = NATIVE_ENCODING, context.settings.retry_ms
    return StreamPlan(job_id, after, encoding, retry_ms, position.finished, ahead, ask.address)


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
    """The answer refusing the current request a new stream, if this node cannot serve it."""
    refusal = stream_refusal(context, client_address())
    return None if refusal is None else refusal_response(refusal)


def refusal_response(refusal: Refusal) -> Response:
    return error_response(
        refusal.status, refusal.code, refusal.message, param=refusal.param, headers=refusal.headers
    )


def stream_refusal(context: Context, address: str) -> Refusal | None:
    """A 503 (so the load balancer tries another node) when this node cannot serve."""
    headers = {"Retry-After": str(BROKER_RETRY_AFTER_S)}
    if context.draining:
        return Refusal(503, "draining", "this node is shutting down", headers=headers)
    if not context.hub.healthy():
        message = "the broker is unreachable; retry shortly"
        return Refusal(503, "broker_unavailable", message, headers=headers)
    context.client_streams.check(address)
    if context.hub.viewer_total >= context.settings.max_streams:
        message = (
            f"this node has {context.settings.max_streams} open streams"
            " (TOKENCAST_MAX_STREAMS); retry shortly"
        )
        return Refusal(503, "too_many_streams", message, headers=headers)
    return None


def planned_stream(context: Context, plan: StreamPlan) -> AsyncGenerator[bytes, None]:
    """The bytes of the stream ``plan`` describes."""
    return _event_stream(
        context,
        plan.job_id,
        plan.after,
        plan.encoding,
        plan.retry_ms,
        plan.finished,
        plan.ahead,
        plan.address,
    )


def event_stream(
    context: Context,
    job_id: str,
    after: int,
    encoding: Encoding,
    retry_ms: int | None,
    finished: bool = False,
) -> AsyncIterator[bytes]:
    """The job's events after ``after``, in ``encoding``, for the current request.

    Opens with a ``retry:`` line unless ``retry_ms`` is ``None`` (the OpenAI
    format: its official client cannot parse a block without ``data``).
    """
    # Read now: the generator runs after the handler returns, outside the request.
    address = client_address()
    return _event_stream(context, job_id, after, encoding, retry_ms, finished, False, address)


async def _event_stream(
    context: Context,
    job_id: str,
    after: int,
    encoding: Encoding,
    retry_ms: int | None,
    finished: bool,
    ahead: bool,
    address: str,
) -> AsyncGenerator[bytes, None]:
    """``ahead``: ``after`` is past the log's end (see ``Feed.open``)."""
    context.client_streams.opened(address)
    session = None
    # The retry line goes out with the first frames: one write to the socket
    # per stream opened instead of two.
    opening = b"" if retry_ms is None else retry_frame(retry_ms)
    try:
        session = await context.feed.open(job_id, after, finished, ahead)
        while session is not None:
            step = await session.next()
            if isinstance(step, Batch):
                frames = encoding.frames(step.events, step.after)
                metrics.BYTES_SENT.inc(len(frames))
                count_events(len(step.events))
                chunk = opening + frames if opening else frames
            elif step is END:
                break
            else:
                chunk = opening + encoding.keepalive
            opening = b""
            yield chunk
            raise_lost_cancel()
        if opening:
            yield opening  # the stream ends before anything else was sent
    finally:
        if session is not None:
            session.close()
        context.client_streams.closed(address)
