"""Building and running a worker process."""

from __future__ import annotations

import asyncio
import signal

from prometheus_client import start_http_server

from services.config import Settings
from services.core import Core, build_core
from services.redisconn import Broker
from services.runtime import tune_gc
from worker.backends.base import Backend
from worker.backends.demo import MODEL, DemoBackend
from worker.backends.plugin import load_backends
from worker.runner import Worker


def backends_for(settings: Settings) -> dict[str, Backend]:
    """Model name → the backend that serves it: ``demo``, the upstream models
    if configured, and those of ``TOKENCAST_BACKENDS``.

    Raises ``BackendLoadError`` (a ``SettingsError``) for a backend that
    cannot be loaded, or that would serve a model already served.
    """
    backends: dict[str, Backend] = {}
    if settings.upstream_base_url and settings.upstream_models:
        # Imported here: the SDK takes a noticeable part of a second to load.
        from worker.backends.openai import OpenAIBackend

        # Its generations yield items and end with Finish (services.items), where
        # Backend still describes text with a finish_reason attribute.
        upstream = OpenAIBackend(settings)
        backends.update((name, upstream) for name in upstream.models())
    demo = DemoBackend()
    backends.update((name, demo) for name in demo.models())
    served = {
        name: "the demo backend" if name == MODEL else "TOKENCAST_UPSTREAM_MODELS"
        for name in backends
    }
    for plugin in load_backends(settings.backends, served):
        backends.update((name, plugin) for name in plugin.models())
    return backends


def build_worker(settings: Settings, broker: Broker, core: Core) -> Worker:
    """A worker on ``core``, the process's shared objects (``services.core``)."""
    backends = backends_for(settings)  # first: a backend that cannot load stops the worker
    return Worker(core, settings, backends, blocking_reads=broker.blocking_reads)


def worker_core(settings: Settings, broker: Broker) -> Core:
    """The core of a process that runs a worker: its reaper is the worker's."""
    return build_core(settings, broker, reaper_owner=f"reaper-{settings.node_id}")


async def run_worker(settings: Settings, broker: Broker) -> None:
    """Run until SIGTERM/SIGINT: stop claiming, finish held jobs within the drain time, exit."""
    core = worker_core(settings, broker)
    worker = build_worker(settings, broker, core)
    if settings.worker_metrics_port:
        # Workers serve no HTTP otherwise: Prometheus scrapes them here.
        start_http_server(settings.worker_metrics_port, addr=settings.host)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    tune_gc()
    try:
        await worker.run()
    finally:
        await core.aclose()
