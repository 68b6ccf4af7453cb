"""The web side of the per-client limits (``services.limits``)."""

from __future__ import annotations

from quart import request

from services.errors import RateLimited
from services.limits import over_limit
from web.auth import bearer, is_api_key
from web.context import ctx


def client_address() -> str:
    """The client's address: the last hop a trusted proxy added, else the peer."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    return address_of(ctx().settings.trust_proxy, forwarded, request.remote_addr)


def address_of(trust_proxy: bool, forwarded: str, peer: str | None) -> str:
    """The last hop in ``forwarded`` (X-Forwarded-For) when the proxy is trusted, else ``peer``."""
    if trust_proxy:
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if hops:
            return hops[-1]
    return peer or "unknown"


async def check_create_rate() -> None:
    """Raise ``RateLimited`` past TOKENCAST_CREATE_RATE_PER_MINUTE jobs created
    this minute by the request's API key (or its address, when keys are off)."""
    context = ctx()
    token = bearer()
    subject = f"key:{token}" if is_api_key(token) else f"addr:{client_address()}"
    limit = context.settings.create_rate_per_minute
    wait_s = await over_limit(context.redis, context.keys, subject, limit)
    if wait_s is not None:
        raise RateLimited(
            f"more than {limit} jobs created this minute (TOKENCAST_CREATE_RATE_PER_MINUTE)",
            wait_s,
        )
