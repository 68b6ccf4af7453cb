"""The ``tokencast`` command.

This is the composition root: the one module that imports both the web
tier and the workers (``dev`` runs them in one process; ``serve --workers``
leaves its processes to ``services.supervisor``). Each subcommand imports
only what it runs, so the terminal client starts quickly and the rest of
``services`` never depends on Quart or a model SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from services import logs
from services.config import Settings
from services.errors import SettingsError

if TYPE_CHECKING:
    from services.redisconn import RedisBroker

DEFAULT_URL = "http://127.0.0.1:8000"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("submit", "watch", "publish"):
        return _client_command(args)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"tokencast: bad setting: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings)
    try:
        return _run_command(args, settings)
    except SettingsError as exc:  # found while starting, e.g. a backend that cannot load
        print(f"tokencast: bad setting: {exc}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace, settings: Settings) -> int:
    host = getattr(args, "host", None) or settings.host
    port = getattr(args, "port", None) or settings.port
    if args.command == "dev":
        _run(_dev(settings, host, port))
    elif args.command == "serve":
        _raise_fd_limit()
        if args.workers > 1 and args.fd is None:
            from services.supervisor import serve_workers

            return serve_workers(settings, host, port, args.workers)
        _run(_serve(settings, host, port, args.fd))
    elif args.command == "worker":
        _run(_worker(settings))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("dev", "the whole service in one process (embedded broker unless TOKENCAST_REDIS_URL)"),
        ("serve", "one web node, against Redis"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--host", help="default: TOKENCAST_HOST or 127.0.0.1")
        command.add_argument("--port", type=int, help="default: TOKENCAST_PORT or 8000")
    serve = sub.choices["serve"]
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="web processes sharing the listening socket, each its own node (default 1)",
    )
    # Set by `serve --workers N` on its children: the listening socket they inherit.
    serve.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    sub.add_parser("worker", help="one worker process, against Redis")
    submit = sub.add_parser("submit", help="create a job; with --watch, print its tokens")
    submit.add_argument("prompt")
    submit.add_argument("--watch", action="store_true", help="print the tokens as they come")
    submit.add_argument("--model", help="default: the server's default model")
    submit.add_argument("--max-tokens", type=int)
    submit.add_argument("--seed", type=int)
    watch = sub.add_parser("watch", help="print a job's tokens as they come")
    watch.add_argument("job_id")
    publish = sub.add_parser("publish", help="publish standard input to a new external job")
    publish.add_argument("--model", help="a label for the job (default: the server's default)")
    publish.add_argument("--prompt", help="the prompt, for the record")
    for command in (submit, watch, publish):
        command.add_argument("--url", help=f"default: TOKENCAST_URL or {DEFAULT_URL}")
    return parser


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _raise_fd_limit() -> None:
    """Every open stream holds a socket: allow as many open files as the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # stay at the soft limit; TOKENCAST_MAX_STREAMS must fit within it


def _run(main_coro: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


def _client_command(args: argparse.Namespace) -> int:
    from services.client import Client

    url = args.url or os.environ.get("TOKENCAST_URL") or DEFAULT_URL
    api_key = os.environ.get("TOKENCAST_API_KEY") or None
    if args.command == "publish":
        from services.producer_client import Publisher

        record = {"model": args.model, "prompt": args.prompt}
        given = {field: value for field, value in record.items() if value is not None}
        try:
            return Publisher(url, api_key).run(sys.stdin.buffer, given)
        except KeyboardInterrupt:
            return 130
    client = Client(url, api_key=api_key)
    try:
        if args.command == "watch":
            return client.watch(args.job_id)
        body: dict[str, Any] = {"prompt": args.prompt}
        for field in ("model", "max_tokens", "seed"):
            if getattr(args, field) is not None:
                body[field] = getattr(args, field)
        return client.submit(body, watch=args.watch)
    except KeyboardInterrupt:
        return 130


async def _dev(settings: Settings, host: str, port: int) -> None:
    from services.redisconn import EmbeddedBroker
    from web.app import create_app
    from web.server import serve_app
    from worker.main import build_worker, worker_core

    broker = _redis_broker(settings) if settings.redis_url else EmbeddedBroker()
    where = settings.redis_url or "the embedded broker"
    logging.getLogger("tokencast").info("tokencast dev on http://%s:%d (%s)", host, port, where)
    # One process, one core: the web tier and the worker share its client,
    # its appender and its reaper (which the worker runs).
    core = worker_core(settings, broker)
    worker = build_worker(settings, broker, core)
    worker_task = asyncio.create_task(worker.run())
    try:
        await serve_app(create_app(settings, broker, core), host, port, on_shutdown=worker.stop)
        await worker_task
    finally:
        await core.aclose()


async def _serve(settings: Settings, host: str, port: int, fd: int | None = None) -> None:
    from web.app import create_app
    from web.server import serve_app

    await serve_app(create_app(settings, _redis_broker(settings)), host, port, fd=fd)


async def _worker(settings: Settings) -> None:
    from worker.main import run_worker

    await run_worker(settings, _redis_broker(settings))


def _redis_broker(settings: Settings) -> RedisBroker:
    from services.redisconn import RedisBroker
    from services.sentinel import SentinelMaster

    sentinel = None
    if settings.redis_sentinels:
        sentinel = SentinelMaster(
            settings.redis_sentinels, settings.redis_sentinel_master, settings.broker_url
        )
    return RedisBroker(settings.broker_url, cluster=settings.redis_cluster, sentinel=sentinel)


if __name__ == "__main__":
    sys.exit(main())
