"""The Quart application."""

from __future__ import annotations

from quart import Quart
from quart_cors import cors

from services.config import Settings
from services.core import Core
from services.logs import AccessLog
from services.redisconn import Broker
from web import api, errors, health, pages, publish, stream
from web.context import Context
from web.models import MAX_BODY_BYTES
from web.openai import bp as openai_bp
from web.responses import bp as responses_bp
from web.schemas import install_openapi
from web.stream_asgi import EventStreams


def create_app(settings: Settings, broker: Broker, core: Core | None = None) -> Quart:
    """The web tier of one process, serving from ``broker``, over ``core``
    (``services.core``) if given, else over a core of its own."""
    app = Quart(__name__, static_folder=None)  # web/pages.py serves web/static/
    app.request_class = publish.PublishRequest  # no body limit on the publish route
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    context = Context.build(settings, broker, core)
    app.extensions["tokencast"] = context

    @app.before_serving
    async def start() -> None:
        await context.start()

    @app.after_serving
    async def stop() -> None:
        await context.stop()

    for blueprint in (api.bp, stream.bp, health.bp, pages.bp, publish.bp):
        app.register_blueprint(blueprint)
    app.register_blueprint(openai_bp)
    app.register_blueprint(responses_bp)
    errors.install(app)
    install_openapi(app)
    if settings.cors_origins:
        allow_cross_origin(app, settings.cors_origins)
    # Event streams are served in front of Quart (web/stream_asgi.py says why);
    # outermost: a request id and an access line for every request, errors included.
    app.asgi_app = AccessLog(EventStreams(app.asgi_app, context))  # type: ignore[method-assign]
    return app


def allow_cross_origin(app: Quart, origins: tuple[str, ...]) -> None:
    """Let pages on ``origins`` call the API and open event streams
    (TOKENCAST_CORS_ORIGINS); other origins get no CORS headers, so browsers
    refuse them."""
    cors(
        app,
        allow_origin=list(origins),
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Tokencast-After"],
        allow_methods=["GET", "POST", "DELETE"],
        expose_headers=[
            "Location",
            "Retry-After",
            "X-Request-ID",
            "X-Tokencast-Job",
            "X-Tokencast-Viewer-Token",
        ],
        max_age=600,
    )
