"""Running the app under Hypercorn, with a graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

from services.runtime import tune_gc
from services.supervisor import BACKLOG
from web.context import Context

log = logging.getLogger(__name__)


def hypercorn_config(host: str, port: int, drain_s: float, fd: int | None = None) -> Config:
    """Hypercorn's settings; with ``fd``, serve on that inherited listening socket."""
    config = Config()
    config.bind = [f"fd://{fd}"] if fd is not None else [f"{host}:{port}"]
    config.graceful_timeout = max(drain_s, 0.1)
    config.keep_alive_timeout = 75  # longer than a load balancer's idle upstream timeout
    config.backlog = BACKLOG
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve_app(
    app: Quart,
    host: str,
    port: int,
    on_shutdown: Callable[[], None] | None = None,
    fd: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain.

    Draining: ``/readyz`` fails and new streams get ``503`` at once, open
    streams end (their clients reconnect and resume on another node), and the
    process exits within ``TOKENCAST_DRAIN_SECONDS``.
    """
    context: Context = app.extensions["tokencast"]
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)

    async def trigger() -> None:
        await shutdown.wait()
        context.start_draining()
        if on_shutdown is not None:
            on_shutdown()
        # Streams end at once; half the drain time is left for them to flush.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(context.settings.drain_s / 2):
                await context.hub.idle.wait()
        log.info("drained; %d streams left", context.hub.viewer_total)

    config = hypercorn_config(host, port, context.settings.drain_s, fd)
    tune_gc()
    await serve(app, config, shutdown_trigger=trigger)
