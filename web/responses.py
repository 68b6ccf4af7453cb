"""OpenAI's Responses API, answered by tokencast jobs (API.md, "OpenAI Responses API").

``POST /v1/responses`` creates a job (``web.responses_request``) and streams
it, waits for it, or answers at once (``background``); ``GET
/v1/responses/<id>`` is the response so far, or its stream from any sequence
number, on any node; ``POST /v1/responses/<id>/cancel`` cancels it. A
response id is ``resp_<job id>``: every job is a response. Errors leave in
OpenAI's error shape, as on ``/v1/chat/completions``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, jsonify, request

from services.errors import JobFinished, JobNotFound
from services.events import CANCELLED
from services.feed import END, Batch
from services.jobs import JobSpec, JobState, is_job_id
from services.logs import set_job_id
from services.resume import InvalidLastEventId, parse_last_event_id
from web.api import read_json
from web.auth import require_api_key, require_viewer
from web.context import Context, ctx
from web.errors import BROKER_RETRY_AFTER_S, error_response
from web.limits import check_create_rate
from web.models import InvalidField
from web.openai import create_job_for, openai_error_shape
from web.openai_format import unix_seconds
from web.responses_format import (
    LAST,
    STRIDE,
    ResponseEncoder,
    ResponseHead,
    response_id,
    resume_base,
)
from web.responses_request import parse_responses, responses_tool, responses_tool_choice
from web.stream import event_stream, refuse_new_stream, stream_response

bp = Blueprint("responses", __name__)
bp.after_request(openai_error_shape)

LOG_PAGE = 1000  # events read per step when folding a job's log
CANCEL_WAIT_S = 2.0  # a cancelled job's worker ends it within 250 ms


@bp.post("/v1/responses")
async def create_response() -> Response:
    context = ctx()
    require_api_key()
    await check_create_rate()
    req, job = parse_responses(await read_json())
    # Only a request that streams or waits needs this node to serve the job's stream.
    created = await create_job_for(context, job, refuse=bool(req.stream or not req.background))
    if isinstance(created, Response):
        return created
    state, spec, headers = created
    encoder = ResponseEncoder(head_for(state, spec))
    if req.stream:
        encoding = encoder.encoding()
        return stream_response(event_stream(context, state.id, 0, encoding, None), headers)
    if req.background:
        return _json(encoder.snapshot(), headers=headers)
    body = await _wait_for_end(context, encoder, state.id)
    if body is None:
        # The node is draining or lost the broker; the job goes on without this request.
        message = f"this node stopped waiting; GET /v1/responses/{response_id(state.id)}"
        headers["Retry-After"] = str(BROKER_RETRY_AFTER_S)
        return error_response(503, "unavailable", message, headers=headers)
    return _json(body, headers=headers)


@bp.get("/v1/responses/<rid>")
async def get_response(rid: str) -> Response:
    context = ctx()
    job_id = job_of(rid)
    require_viewer(job_id)
    stream = request.args.get("stream") or "false"
    if stream not in ("true", "false"):
        raise InvalidField("stream", "stream must be true or false")
    if stream == "true":
        return await _resume(context, job_id, *_starting_after())
    head, finished = await load_head(context, job_id)
    encoder = ResponseEncoder(head)
    await fold_log(context, encoder, job_id, finished=finished)
    return _json(encoder.snapshot())


@bp.post("/v1/responses/<rid>/cancel")
async def cancel_response(rid: str) -> Response:
    context = ctx()
    require_api_key()
    job_id = job_of(rid)
    await request.get_data()  # the SDK sends no body; whatever came is read, as everywhere
    head, _ = await load_head(context, job_id)
    try:
        await context.store.cancel(job_id)
    except JobFinished:
        encoder = ResponseEncoder(head)
        await fold_log(context, encoder, job_id, finished=True)
        if encoder.status != CANCELLED:
            message = (
                f"response {rid} has already finished (status {encoder.status});"
                " only a queued or in-progress response can be cancelled"
            )
            return error_response(400, "response_finished", message)
        return _json(encoder.snapshot())
    encoder = ResponseEncoder(head)
    try:
        body = await asyncio.wait_for(_wait_for_end(context, encoder, job_id), CANCEL_WAIT_S)
    except TimeoutError:
        body = None
    if body is None:  # not ended yet: the object so far, which is cancelled all the same
        encoder = ResponseEncoder(head)
        await fold_log(context, encoder, job_id)
        body = encoder.snapshot(CANCELLED)
    return _json(body)


def job_of(rid: str) -> str:
    """The job id in a response id (``resp_<job id>``); ``JobNotFound`` unless it is one."""
    job_id = rid.removeprefix("resp_")
    if job_id == rid or not is_job_id(job_id):
        raise JobNotFound(f"no response with id {rid!r} (response ids are resp_<job id>)")
    set_job_id(job_id)
    return job_id


def _starting_after() -> tuple[int | None, str]:
    """``Last-Event-ID`` (which wins) or ``starting_after``: a sequence number or ``None``,
    and the name of the one given."""
    header, query = request.headers.get("Last-Event-ID"), request.args.get("starting_after")
    name = "Last-Event-ID" if header else "starting_after"
    if not header and not query:
        return None, name
    try:
        return parse_last_event_id(header, query), name
    except InvalidLastEventId:
        raise InvalidField(name, f"{name} must be a sequence number: 1 to 19 digits") from None


async def _resume(context: Context, job_id: str, after: int | None, name: str) -> Response:
    """The response's stream: every event, or exactly those numbered above ``after``."""
    head, _ = await load_head(context, job_id)
    refusal = refuse_new_stream(context)
    if refusal is not None:
        return refusal
    position = await context.store.position(job_id)
    base = 0 if after is None else resume_base(after)
    if after is not None and after // STRIDE > position.last_event_id and not position.finished:
        last = position.last_event_id * STRIDE + LAST
        message = f"{name} {after} is past the response's last event so far ({last})"
        raise InvalidField(name, message)
    if position.finished and base >= position.last_event_id:
        return stream_response(_nothing())  # after the final event: an empty stream, ended
    encoder = ResponseEncoder(head, after)
    await fold_log(context, encoder, job_id, base, position.finished)
    encoding = encoder.encoding()
    return stream_response(event_stream(context, job_id, base, encoding, None, position.finished))


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that ends at once


async def _wait_for_end(context: Context, encoder: ResponseEncoder, job_id: str) -> dict | None:
    """Fold the job's events as they come; the whole response once it ends.

    ``None`` when this node stops first (draining, or the broker gone too long).
    """
    session = await context.feed.open(job_id, 0)
    try:
        while session is not None:
            step = await session.next()
            if step is END:
                return None
            if isinstance(step, Batch):
                for event in step.events:
                    encoder.apply(event)
            if encoder.finished:
                return encoder.snapshot()
    finally:
        if session is not None:
            session.close()
    return None


async def fold_log(
    context: Context,
    encoder: ResponseEncoder,
    job_id: str,
    through: int | None = None,
    finished: bool = False,
) -> None:
    """Fold the job's logged events up to id ``through`` (all of them without it).

    A ``finished`` job's log comes from the node's cache of finished logs, so
    a storm of resumes reads it from Redis once.
    """
    finished_log = await context.history.get(job_id) if finished and context.history else None
    if finished_log is not None:
        for event in finished_log.events[:through]:
            encoder.apply(event)
        return
    sent = 0
    while through is None or sent < through:
        limit = LOG_PAGE if through is None else min(LOG_PAGE, through - sent)
        events = await context.log.read(job_id, sent, limit)
        for event in events:
            encoder.apply(event)
        if len(events) < limit:
            return
        sent = events[-1].id


async def load_head(context: Context, job_id: str) -> tuple[ResponseHead, bool]:
    """The job's response head, and whether the job has finished; raises ``JobNotFound``."""
    state = await context.store.get(job_id)
    return head_for(state, await context.store.spec(job_id)), state.finished


def head_for(state: JobState, spec: JobSpec | None) -> ResponseHead:
    """What the response object echoes of the request, from the job it made."""
    if spec is None:
        return ResponseHead(state.id, state.model, unix_seconds(state.created_at))
    messages = spec.messages or []
    first = messages[0] if messages else {}
    system = first.get("role") == "system" and isinstance(first.get("content"), str)
    return ResponseHead(
        state.id,
        state.model,
        unix_seconds(state.created_at),
        instructions=first["content"] if system else None,
        tools=[responses_tool(tool) for tool in spec.tools or []],
        tool_choice=responses_tool_choice(spec.tool_choice),
        temperature=spec.temperature,
        max_output_tokens=spec.max_tokens,
        metadata=dict(spec.metadata),
    )


def _json(body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
    response = jsonify(body)
    response.headers.update(headers or {})
    return response
