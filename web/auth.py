"""Who may do what (API.md, "Security").

- ``TOKENCAST_API_KEYS``: creating and cancelling jobs, and chat completions,
  need ``Authorization: Bearer <key>``; keys are compared in constant time.
- ``TOKENCAST_SECRET``: watching a job (events, state, watch page) needs its
  viewer token, as ``?token=`` or a Bearer header. An API key is accepted
  too: whoever may create jobs may watch them.
"""

from __future__ import annotations

import hmac

from quart import request

from services.viewer_tokens import Verdict
from web.context import Context, ctx

REFUSALS = {
    Verdict.EXPIRED: "the viewer token has expired",
    Verdict.WRONG_JOB: "the viewer token is for another job",
    Verdict.INVALID: "the viewer token is not valid",
}


class AccessDenied(Exception):
    """A ``401`` (no credentials) or ``403`` (wrong ones); ``web.errors`` answers it."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bearer() -> str | None:
    return bearer_of(request.headers.get("Authorization", ""))


def bearer_of(authorization: str) -> str | None:
    """The credentials of an ``Authorization: Bearer …`` header value."""
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def is_api_key(candidate: str | None, api_keys: tuple[str, ...] | None = None) -> bool:
    """``candidate`` is one of ``api_keys`` (the node's, by default)."""
    if candidate is None:
        return False
    given = candidate.encode()
    keys = ctx().settings.api_keys if api_keys is None else api_keys
    # Every configured key is compared, so the time taken says nothing about which matched.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


def require_api_key() -> None:
    """Raise ``AccessDenied`` unless API keys are off or the request carries one."""
    if not ctx().settings.api_keys:
        return
    token = bearer()
    if token is None:
        raise AccessDenied(
            401, "unauthorized", "this endpoint needs an API key: Authorization: Bearer <key>"
        )
    if not is_api_key(token):
        raise AccessDenied(401, "invalid_api_key", "the API key is not valid")


def require_viewer(job_id: str) -> None:
    """Raise ``AccessDenied`` unless viewer tokens are off or the request may watch ``job_id``."""
    check_viewer(ctx(), job_id, request.args.get("token") or bearer())


def check_viewer(context: Context, job_id: str, token: str | None) -> None:
    """Raise ``AccessDenied`` unless viewer tokens are off or ``token`` (the
    request's ``?token=`` or Bearer credentials) may watch ``job_id``."""
    tokens = context.viewer_tokens
    if tokens is None:
        return
    if token is None:
        raise AccessDenied(
            401,
            "viewer_token_required",
            "watching this job needs its viewer token: ?token=<viewer_token>"
            " or Authorization: Bearer <viewer_token>",
        )
    if is_api_key(token, context.settings.api_keys):
        return
    verdict = tokens.check(token, job_id)
    if verdict is not Verdict.VALID:
        raise AccessDenied(403, "forbidden", REFUSALS[verdict])
