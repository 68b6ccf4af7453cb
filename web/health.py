"""``/healthz`` (the process is up), ``/readyz`` (it can serve: not
draining, its pub/sub connections up, and the broker takes a scripted write
through the pool the requests use) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response, jsonify

from services import metrics
from services.errors import BrokerUnavailable
from web.context import ctx
from web.errors import error_response

bp = Blueprint("health", __name__)

PING_TIMEOUT_S = 1.0


@bp.get("/healthz")
async def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/metrics")
async def prometheus_metrics() -> Response:
    """Prometheus text format; the queue depth is read from the broker at scrape time."""
    try:
        metrics.QUEUE_DEPTH.set(await ctx().store.queue.depth())
    except BrokerUnavailable:
        pass  # keep the last known depth; the other metrics still matter
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


@bp.get("/readyz")
async def readyz() -> Response:
    """200 only when this node's next requests would succeed (API.md, "Broker outage")."""
    context = ctx()
    if context.draining:
        return error_response(503, "draining", "this node is shutting down")
    if not context.hub.healthy():  # new streams are refused until it reconnects
        return error_response(503, "broker_unavailable", "the pub/sub connection is down")
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await context.ready.check()
    except (TimeoutError, BrokerUnavailable):
        return error_response(503, "broker_unavailable", "the broker is unreachable")
    return jsonify({"status": "ready"})
