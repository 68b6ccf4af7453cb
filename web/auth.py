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
from web.context import ctx

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
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def is_api_key(candidate: str | None) -> bool:
    if candidate is None:
        return False
    given = candidate.encode()
    # Every configured key is compared, so the time taken says nothing about which matched.
    matches = [hmac.compare_digest(given, key.encode()) for key in ctx().settings.api_keys]
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
    tokens = ctx().viewer_tokens
    if tokens is None:
        return
    token = request.args.get("token") or bearer()
    if token is None:
        raise AccessDenied(
            401,
            "viewer_token_required",
            "watching this job needs its viewer token: ?token=<viewer_token>"
            " or Authorization: Bearer <viewer_token>",
        )
    if is_api_key(token):
        return
    verdict = tokens.check(token, job_id)
    if verdict is not Verdict.VALID:
        raise AccessDenied(403, "forbidden", REFUSALS[verdict])
