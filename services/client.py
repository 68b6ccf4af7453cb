"""The terminal client: ``tokencast submit`` and ``tokencast watch``.

Text goes to stdout as it arrives; the job id and status lines go to stderr.
A dropped connection is resumed with ``Last-Event-ID``. Exit status: 0
completed, 1 failed (or refused), 2 cancelled, 3 the server could not be reached.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

import httpx
from httpx_sse import SSEError, connect_sse

EXIT_COMPLETED, EXIT_FAILED, EXIT_CANCELLED, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_BY_STATUS = {"completed": EXIT_COMPLETED, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}

GIVE_UP_AFTER_S = 30.0  # of consecutive failures to reach the server
READ_TIMEOUT_S = 60.0  # several keepalive intervals


class Client:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
    ):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.out = out
        self.err = err
        self.http = httpx.Client(
            base_url=self.url,
            headers=self.headers,
            timeout=httpx.Timeout(10.0, read=READ_TIMEOUT_S),
        )

    def say(self, line: str) -> None:
        print(line, file=self.err, flush=True)

    def submit(self, body: dict[str, Any], watch: bool) -> int:
        try:
            response = self.http.post("/v1/jobs", json=body)
        except httpx.TransportError as exc:
            self.say(f"error: cannot reach {self.url}: {exc}")
            return EXIT_UNREACHABLE
        if response.status_code != 201:
            self.say(f"error: {response.status_code} {_error_message(response)}")
            return EXIT_FAILED
        job_id = response.json()["id"]
        self.say(f"job {job_id}")
        if not watch:
            print(job_id, file=self.out, flush=True)
            return EXIT_COMPLETED
        return self._follow(job_id)

    def watch(self, job_id: str) -> int:
        self.say(f"job {job_id}")
        return self._follow(job_id)

    def _follow(self, job_id: str) -> int:
        """Print the job's text until its ``done`` event, resuming after drops."""
        last_id: str | None = None
        failing_since: float | None = None
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with connect_sse(
                    self.http, "GET", f"/v1/jobs/{job_id}/events", headers=headers
                ) as source:
                    response = source.response
                    if response.status_code == 204:
                        return self._final_status(job_id)
                    if response.status_code >= 500:
                        raise httpx.TransportError(f"{response.status_code}")
                    if response.status_code != 200:
                        response.read()
                        self.say(f"error: {response.status_code} {_error_message(response)}")
                        return EXIT_FAILED
                    failing_since = None
                    for sse in source.iter_sse():
                        if not sse.data:
                            continue  # e.g. the retry: block, which dispatches no event
                        if sse.id:
                            last_id = sse.id
                        code = self._show(sse.event, sse.data)
                        if code is not None:
                            return code
            except (httpx.TransportError, SSEError) as exc:
                failing_since = failing_since or time.monotonic()
                if time.monotonic() - failing_since > GIVE_UP_AFTER_S:
                    self.say(f"error: cannot reach {self.url}: {exc}")
                    return EXIT_UNREACHABLE
                time.sleep(1.0)
            self.say("reconnecting…")

    def _show(self, event: str, data: str) -> int | None:
        payload = json.loads(data)
        if event == "token":
            self.out.write(payload["text"])
            self.out.flush()
        elif event == "start":
            self.say("status running")
        elif event == "done":
            self.out.write("\n")
            self.out.flush()
            return self._report(payload)
        return None

    def _report(self, done: dict[str, Any]) -> int:
        status = done["status"]
        line = f"status {status}"
        if done.get("finish_reason"):
            line += f" ({done['finish_reason']}, {done.get('tokens', 0)} tokens)"
        if done.get("error"):
            line += f": {done['error']['code']}: {done['error']['message']}"
        self.say(line)
        return EXIT_BY_STATUS.get(status, EXIT_FAILED)

    def _final_status(self, job_id: str) -> int:
        state = self.http.get(f"/v1/jobs/{job_id}").json()
        return self._report({**state, "status": state["status"]})


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
