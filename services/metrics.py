"""Prometheus metrics, correct across the processes of one node.

With ``PROMETHEUS_MULTIPROC_DIR`` set (``tokencast serve --workers N`` sets
it), every process writes its samples there and ``render()`` sums them;
otherwise the process's own registry is rendered.

Hot-path metrics are counted per batch written, not per event.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

OPEN_STREAMS = Gauge(
    "tokencast_open_streams", "Event streams open on this node", multiprocess_mode="livesum"
)
EVENTS_SENT = Counter(
    "tokencast_events_sent", "Events written to viewers (a merged token event counts once)"
)
EVENTS_APPENDED = Counter(
    "tokencast_events_appended",
    "Events written to job logs, by kind (every custom event counts as kind event)",
    ["kind"],
)
BYTES_SENT = Counter("tokencast_bytes_sent", "Bytes of event streams written to viewers")
RESUMES = Counter("tokencast_resumes", "Streams opened with a Last-Event-ID after event 0")
CATCH_UPS = Counter(
    "tokencast_catch_ups",
    "Times a viewer fell behind its job's live buffer and caught up from the log",
)
PUBSUB_RECONNECTS = Counter(
    "tokencast_pubsub_reconnects", "Times a pub/sub connection to the broker was re-made"
)
JOBS_CREATED = Counter("tokencast_jobs_created", "Jobs created")
LOGS_LOST = Counter(
    "tokencast_logs_lost",
    "Streams that found their job's log gone (the broker lost its data) and ended with log_lost",
)
JOBS_FINISHED = Counter("tokencast_jobs_finished", "Jobs that reached done", ["status"])
QUEUE_DEPTH = Gauge(
    "tokencast_queue_depth", "Jobs waiting for a worker", multiprocess_mode="livemax"
)
WORKER_SLOTS = Gauge(
    "tokencast_worker_slots", "Worker job slots by state", ["state"], multiprocess_mode="livesum"
)
PUBLISH_TO_SEND = Histogram(
    "tokencast_publish_to_send_seconds",
    "From the worker's append to the web node writing the event to a viewer",
    # Fine between 10 and 150 ms, where live delivery usually lands (make bench).
    buckets=(0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
)
UPSTREAM_FIRST_TOKEN = Histogram(
    "tokencast_upstream_first_token_seconds",
    "From the request to an upstream model server to its first token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


def render() -> tuple[bytes, str]:
    """The exposition text of this node, and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
