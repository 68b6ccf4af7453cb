"""The browser pages: ``GET /`` (start a generation) and ``GET /watch/<id>`` (watch one).

Both are plain files under ``web/static/``, served as they are: no build step,
no template. The pages talk to the public API only (``/v1/models``,
``/v1/jobs``, the event stream), so they work against any web node.

Every response of this blueprint carries a strict Content-Security-Policy
(scripts and styles from this origin only, nothing inline), so text that
reached the page as HTML still could not run; and ``Referrer-Policy:
no-referrer``, so a viewer token in a watch URL never leaks to another site.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory

from services.jobs import is_job_id
from web.auth import require_viewer

STATIC = Path(__file__).resolve().parent / "static"

bp = Blueprint("pages", __name__, static_folder=str(STATIC), static_url_path="/static")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self';"
        " connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@bp.after_request
async def headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    # Revalidated on every load (a 304 when unchanged): after a deploy no
    # browser runs a stale module against a new page.
    response.headers["Cache-Control"] = "no-cache"
    response.headers.pop("Expires", None)
    return response


@bp.get("/")
async def start_page() -> Response:
    return await send_from_directory(STATIC, "index.html")


@bp.get("/watch/<job_id>")
async def watch_page(job_id: str) -> Response:
    """The watch page; it asks the API about the job itself, so an unknown or
    expired job gets the page (which says so in words). A malformed id cannot
    name any job: the same page, with status ``404``."""
    if is_job_id(job_id):
        require_viewer(job_id)
        return await send_from_directory(STATIC, "watch.html")
    response: Response = await send_from_directory(STATIC, "watch.html", conditional=False)
    response.status_code = 404
    return response


@bp.get("/favicon.ico")
async def favicon() -> Response:
    """Browsers ask for this even when the page names its icon."""
    return await send_from_directory(STATIC, "favicon.svg")
