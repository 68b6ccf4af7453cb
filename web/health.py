"""``/healthz`` (the process is up), ``/readyz`` (it can serve: broker
reachable, not draining) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio

from quart import Blueprint, Response, jsonify

from services import metrics
from services.errors import BrokerUnavailable
from services.redisconn import BROKER_IO_ERRORS
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
    context = ctx()
    if context.draining:
        return error_response(503, "draining", "this node is shutting down")
    try:
        # The same pool the requests use: 200 means requests can reach the broker.
        async with asyncio.timeout(PING_TIMEOUT_S):
            await context.redis.ping()
    except (TimeoutError, *BROKER_IO_ERRORS):
        return error_response(503, "broker_unavailable", "the broker is unreachable")
    return jsonify({"status": "ready"})
