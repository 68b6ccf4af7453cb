"""The jobs API: create, read, cancel, and the model list."""

from __future__ import annotations

import json
import time
from typing import Any

from quart import Blueprint, Response, jsonify, request
from quart_schema import document_request, document_response
from werkzeug.exceptions import UnsupportedMediaType

from services.errors import JobNotFound
from services.jobs import JobSpec, JobState, is_job_id
from services.logs import job_created, set_job_id
from services.producers import EXTERNAL, new_producer_token
from web.auth import require_api_key, require_viewer
from web.context import ctx
from web.errors import error_response
from web.limits import check_create_rate
from web.models import InvalidField, JobRequest, NamedToolChoice, parse_json_body, validate_job
from web.schemas import ErrorBody, JobCreated, JobStateBody, ModelList

bp = Blueprint("api", __name__)

STARTED_AT = int(time.time())


async def read_json() -> dict[str, Any]:
    """The request's JSON object: ``415`` unless it is JSON, ``413`` past 1 MiB.

    The body is read before any refusal, so the connection stays clean for
    the next request a load balancer sends on it.
    """
    raw: bytes = await request.get_data(cache=False, as_text=False)  # type: ignore[assignment]
    if request.mimetype != "application/json":
        raise UnsupportedMediaType("Content-Type must be application/json")
    return parse_json_body(raw)


def job_id_or_404(job_id: str) -> str:
    if not is_job_id(job_id):
        raise JobNotFound("no job with that id (job ids are 22 URL-safe characters)")
    set_job_id(job_id)
    return job_id


async def models_listed() -> list[str]:
    """What ``GET /v1/models`` lists: the configured models, then those
    workers advertise (``services.catalog``)."""
    configured = ctx().settings.models
    advertised = await ctx().catalog.advertised()
    return [*configured, *(name for name in advertised if name not in configured)]


async def model_or_404(requested: str | None) -> str | Response:
    settings = ctx().settings
    model = requested or settings.default_model
    if model not in settings.models and model not in await ctx().catalog.advertised():
        listed = ", ".join(await models_listed())
        return error_response(
            404,
            "model_not_found",
            f"model {model!r} does not exist; GET /v1/models lists: {listed}",
            param="model",
        )
    return model


def spec_from(req: JobRequest, model: str) -> JobSpec:
    if req.demo is not None and model != "demo":
        raise InvalidField("demo", "demo options apply to the demo model only")
    choice = req.tool_choice
    return JobSpec(
        prompt=req.prompt,
        model=model,
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        seed=req.seed,
        metadata=dict(req.metadata),
        demo=req.demo.model_dump(exclude_none=True) if req.demo else {},
        messages=[message.as_sent() for message in req.messages] if req.messages else None,
        # An empty list says nothing, and some servers refuse one.
        tools=[tool.model_dump(exclude_unset=True) for tool in req.tools] if req.tools else None,
        tool_choice=choice.model_dump() if isinstance(choice, NamedToolChoice) else choice,
        producer=req.producer,
    )


def logged_prompt(spec: JobSpec) -> str:
    """What the creation log line shows as the prompt (when prompts are logged)."""
    if spec.prompt is None and spec.messages is None:
        return ""  # an external job's record may have neither
    return spec.prompt if spec.prompt is not None else json.dumps(spec.messages, ensure_ascii=False)


def viewer_token_for(job_id: str) -> str | None:
    """A new job's viewer token, when viewer authentication is on."""
    tokens = ctx().viewer_tokens
    return tokens.issue(job_id) if tokens else None


def created_body(state: JobState, producer_token: str | None = None) -> dict[str, Any]:
    token = viewer_token_for(state.id)
    query = f"?token={token}" if token else ""
    body = {
        "id": state.id,
        "status": state.status,
        "model": state.model,
        "created_at": state.created_at,
        "events_url": f"/v1/jobs/{state.id}/events{query}",
        "watch_url": f"/watch/{state.id}{query}",
        "viewer_token": token,
    }
    if producer_token is not None:
        body["producer"] = EXTERNAL
        body["publish_url"] = f"/v1/jobs/{state.id}/publish"
        body["producer_token"] = producer_token
    return body


@bp.post("/v1/jobs")
@document_request(JobRequest)
@document_response(JobCreated, 201)
@document_response(ErrorBody, 400)
async def create_job() -> Response:
    require_api_key()
    await check_create_rate()
    req = validate_job(await read_json())
    external = req.producer == EXTERNAL
    # An external job's model is a free label: no backend needs to know it.
    if external:
        model: str | Response = req.model or ctx().settings.default_model
    else:
        model = await model_or_404(req.model)
    if isinstance(model, Response):
        return model
    spec = spec_from(req, model)
    producer_token = new_producer_token() if external else None
    state = await ctx().store.create(spec, producer_token)
    job_created(state.id, state.model, logged_prompt(spec))
    response = jsonify(created_body(state, producer_token))
    response.status_code = 201
    response.headers["Location"] = f"/v1/jobs/{state.id}"
    return response


@bp.get("/v1/jobs/<job_id>")
@document_response(JobStateBody)
@document_response(ErrorBody, 404)
async def get_job(job_id: str) -> Response:
    job_id = job_id_or_404(job_id)
    require_viewer(job_id)
    state = await ctx().store.get(job_id)
    return jsonify(state.to_api())


@bp.delete("/v1/jobs/<job_id>")
@document_response(JobStateBody, 202)
@document_response(ErrorBody, 409)
async def cancel_job(job_id: str) -> Response:
    require_api_key()
    state = await ctx().store.cancel(job_id_or_404(job_id))
    response = jsonify(state.to_api())
    response.status_code = 202
    return response


@bp.get("/v1/models")
@document_response(ModelList)
async def list_models() -> Response:
    data = [
        {"id": name, "object": "model", "created": STARTED_AT, "owned_by": "tokencast"}
        for name in await models_listed()
    ]
    return jsonify({"object": "list", "data": data})
