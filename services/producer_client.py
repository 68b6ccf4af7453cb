"""``tokencast publish``: standard input to a live external job.

Each read of stdin becomes one publish request of one ``token`` line, cut
where the read fell but never inside a UTF-8 character. Every request names
the event it follows (``Tokencast-After``), so after a dropped connection the
same request is sent again and nothing is doubled. While stdin is silent an
empty publish keeps the job's lease. Exit status: 0 the input ended and the
job completed, 1 failed (Ctrl-C fails the job with ``interrupted``), 2
cancelled by a viewer, 3 the server could not be reached.
"""

from __future__ import annotations

import codecs
import json
import os
import select
import sys
import time
from typing import Any, BinaryIO, TextIO

import httpx

from services.client import (
    EXIT_CANCELLED,
    EXIT_COMPLETED,
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    GIVE_UP_AFTER_S,
    _error_message,
)

READ_BYTES = 65536
# An empty publish this often while stdin is silent: well within any lease.
RENEW_EVERY_S = 1.0
RETRY_S = 0.5
INTERRUPTED = {
    "type": "error",
    "code": "interrupted",
    "message": "the producer was interrupted (Ctrl-C)",
}


class Refused(Exception):
    """The server refused a publish: ``exit_code`` says how the command ends."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


class Unreachable(Exception):
    pass


class Publisher:
    """Creates an external job and publishes a byte stream to it."""

    def __init__(self, url: str, api_key: str | None = None, err: TextIO = sys.stderr):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=10.0)
        self.err = err
        self.job: dict[str, Any] = {}
        self.last_id = 0

    def say(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def run(self, source: BinaryIO, body: dict[str, Any]) -> int:
        try:
            self._create(body)
            try:
                self._pump(source)
            except KeyboardInterrupt:
                self._send([INTERRUPTED], after=None)
                self.say("status failed: interrupted")
                return EXIT_FAILED
        except Refused as exc:
            self.say(f"error: {exc.message}")
            return exc.exit_code
        except Unreachable as exc:
            self.say(f"error: cannot reach {self.url}: {exc}")
            return EXIT_UNREACHABLE
        self.say("status completed")
        return EXIT_COMPLETED

    def _create(self, body: dict[str, Any]) -> None:
        try:
            response = self.http.post("/v1/jobs", json={**body, "producer": "external"})
        except httpx.TransportError as exc:
            raise Unreachable(str(exc)) from None
        if response.status_code != 201:
            raise Refused(EXIT_FAILED, f"{response.status_code} {_error_message(response)}")
        self.job = response.json()
        self.say(f"job {self.job['id']}")
        self.say(f"watch {self.url}{self.job['watch_url']}")

    def _pump(self, source: BinaryIO) -> None:
        """Publish each read of ``source`` as it comes, then ``done`` at its end."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = source.fileno()
        while True:
            readable, _, _ = select.select([fd], [], [], RENEW_EVERY_S)
            if not readable:
                self._send([], after=self.last_id)  # renews the lease
                continue
            chunk = os.read(fd, READ_BYTES)
            text = decoder.decode(chunk, final=not chunk)
            lines: list[dict[str, Any]] = [{"type": "token", "text": text}] if text else []
            if not chunk:
                self._send([*lines, {"type": "done"}], after=self.last_id)
                return
            if lines:
                self._send(lines, after=self.last_id)

    def _send(self, lines: list[dict[str, Any]], after: int | None) -> None:
        """One publish request, sent again until it is answered (the server
        skips what already landed). Raises ``Refused`` or ``Unreachable``."""
        body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        headers = {
            "Authorization": f"Bearer {self.job['producer_token']}",
            "Content-Type": "application/x-ndjson",
        }
        if after is not None:
            headers["Tokencast-After"] = str(after)
        failing_since: float | None = None
        while True:
            try:
                response = self.http.post(self.job["publish_url"], content=body, headers=headers)
                if response.status_code < 500:
                    break
                problem = f"{response.status_code} {_error_message(response)}"
            except httpx.TransportError as exc:
                problem = str(exc)
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > GIVE_UP_AFTER_S:
                raise Unreachable(problem)
            time.sleep(RETRY_S)
        if response.status_code != 200:
            code = response.json().get("error", {}).get("code")
            exit_code = EXIT_CANCELLED if code == "job_cancelled" else EXIT_FAILED
            raise Refused(exit_code, f"{response.status_code} {_error_message(response)}")
        self.last_id = int(response.json()["last_event_id"])
