"""``POST /v1/chat/completions``: OpenAI's chat API, answered by a tokencast job.

The request creates a job like ``POST /v1/jobs``, with its ``messages``,
``tools`` and ``tool_choice`` as they are; ``stream: true`` answers with the
job's event stream in OpenAI's chunk format (``web.openai_format``),
``stream: false`` with one ``chat.completion`` once the job ends. Either way
``X-Tokencast-Job`` names the job, so others can watch it, and a client that
goes away does not cancel it (``DELETE /v1/jobs/<id>`` does). Every error on
this route leaves in OpenAI's error shape.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from quart import Blueprint, Response, jsonify
from quart_schema import document_request

from services.events import DONE, FAILED
from services.feed import END, Batch
from services.jobs import JobSpec, JobState
from services.logs import job_created
from web.api import logged_prompt, model_or_404, read_json, spec_from, viewer_token_for
from web.auth import require_api_key
from web.context import Context, ctx
from web.errors import BROKER_RETRY_AFTER_S, error_response
from web.limits import check_create_rate
from web.models import (
    MAX_MESSAGES,
    MAX_TOOLS,
    InvalidField,
    JobRequest,
    Message,
    NamedToolChoice,
    Tool,
    describe,
    validate_job,
)
from web.openai_format import ChunkEncoder, completion_body, error_body
from web.stream import event_stream, refuse_new_stream, stream_response

bp = Blueprint("openai", __name__)

JOB_HEADER = "X-Tokencast-Job"
VIEWER_TOKEN_HEADER = "X-Tokencast-Viewer-Token"

# Fields a chat request shares with POST /v1/jobs, validated by the same rules.
JOB_FIELDS = (
    "model",
    "messages",
    "tools",
    "tool_choice",
    "max_tokens",
    "temperature",
    "seed",
    "metadata",
    "demo",
)

CHAT_RULES = {
    "stream": "true or false",
    "stream_options": 'an object such as {"include_usage": true}',
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool | None = None


class ChatRequest(BaseModel):
    """OpenAI's request; its other optional fields are ignored.

    ``messages``, ``tools`` and ``tool_choice`` are the job's (``JobRequest``),
    declared here too so the OpenAPI document shows them.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    max_completion_tokens: int | None = Field(None, ge=1, le=32_768)
    stream: bool | None = None
    stream_options: StreamOptions | None = None


def parse_chat(body: dict[str, Any]) -> tuple[ChatRequest, JobRequest]:
    """The chat request and the job it asks for; raises ``InvalidField``."""
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _describe_chat(exc) from None
    fields = {name: body[name] for name in JOB_FIELDS if body.get(name) is not None}
    if chat.max_completion_tokens is not None:
        fields["max_tokens"] = chat.max_completion_tokens
    return chat, validate_job(fields)


def _describe_chat(exc: ValidationError) -> InvalidField:
    field = str(exc.errors()[0]["loc"][0])
    if field in CHAT_RULES:
        return InvalidField(field, f"{field} must be {CHAT_RULES[field]}")
    return describe(exc)


@bp.post("/v1/chat/completions")
@document_request(ChatRequest)
async def chat_completions() -> Response:
    context = ctx()
    require_api_key()
    await check_create_rate()
    chat, job = parse_chat(await read_json())
    created = await create_job_for(context, job)
    if isinstance(created, Response):
        return created
    state, _, headers = created
    if chat.stream:
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        encoding = ChunkEncoder.for_job(state, include_usage).encoding()
        return stream_response(event_stream(context, state.id, 0, encoding, None), headers)
    return await _completion(context, state, headers)


class NewJob(NamedTuple):
    state: JobState
    spec: JobSpec
    headers: dict[str, str]  # the ones naming the job to its creator


async def create_job_for(
    context: Context, job: JobRequest, refuse: bool = True
) -> NewJob | Response:
    """Create the job an OpenAI-style request asks for, or the answer refusing it.

    With ``refuse``, a node that cannot serve the job's stream refuses before
    the job exists, so a retry elsewhere does not leave a twin.
    """
    model = await model_or_404(job.model)
    if isinstance(model, Response):
        return model
    spec = spec_from(job, model)
    refusal = refuse_new_stream(context) if refuse else None
    if refusal is not None:
        return refusal
    state = await context.store.create(spec)
    job_created(state.id, state.model, logged_prompt(spec))
    headers = {JOB_HEADER: state.id}
    if token := viewer_token_for(state.id):
        headers[VIEWER_TOKEN_HEADER] = token
    return NewJob(state, spec, headers)


async def _completion(context: Context, state: JobState, headers: dict[str, str]) -> Response:
    """Wait for the job's ``done``, then answer with the whole completion."""
    done = None
    session = await context.feed.open(state.id, 0)
    try:
        while session is not None:
            step = await session.next()
            if step is END:
                break
            if isinstance(step, Batch) and step.events[-1].name == DONE:
                done = step.events[-1].payload()
    finally:
        if session is not None:
            session.close()
    if done is None:
        # The node is draining or lost the broker; the job goes on without this request.
        message = f"this node stopped waiting for job {state.id}; GET /v1/jobs/{state.id}"
        headers = {**headers, "Retry-After": str(BROKER_RETRY_AFTER_S)}
        return error_response(503, "unavailable", message, headers=headers)
    if done["status"] == FAILED:
        error = done.get("error") or {}
        body = error_body(502, error.get("message", "the job failed"), error.get("code"))
        return _json(body, 502, headers)
    finished = await context.store.get(state.id)
    body = completion_body(finished, int(done.get("reasoning_tokens", 0)))
    return _json(body, 200, headers)


def _json(body: dict[str, Any], status: int, headers: dict[str, str]) -> Response:
    response = jsonify(body)
    response.status_code = status
    response.headers.update(headers)
    return response


@bp.after_request
async def openai_error_shape(response: Response) -> Response:
    """Turn tokencast's error body into OpenAI's, whichever handler made it.

    Clients of this route expect ``{"error": {"message", "type", "param",
    "code"}}``; rewriting here covers every error path, present and future,
    without a second set of handlers.
    """
    if response.status_code < 400 or not response.is_json:
        return response
    body = await response.get_json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "type" not in error:
        shaped = error_body(
            response.status_code, error.get("message", ""), error.get("code"), error.get("param")
        )
        response.set_data(json.dumps(shaped, ensure_ascii=False))
    return response
