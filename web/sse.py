"""Server-Sent Events framing: how events become bytes on the wire."""

from __future__ import annotations

from services.events import Event

NATIVE = "native"

HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

KEEPALIVE_FRAME = b": keepalive\n\n"


def retry_frame(retry_ms: int) -> bytes:
    return f"retry: {retry_ms}\n\n".encode()


def native_frame(event: Event) -> bytes:
    """``id``, ``event`` and one ``data`` line; cached on the event, so encoded once per node."""
    frame = event.frames.get(NATIVE)
    if frame is None:
        frame = f"id: {event.id}\nevent: {event.name}\ndata: {event.data}\n\n".encode()
        event.frames[NATIVE] = frame
    return frame
