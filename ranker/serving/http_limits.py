"""What a /rank body must be before it is parsed: JSON, not too large, not too slow.

One client's body must cost no other client anything. Parsing runs on the event loop that
also batches and scores every request, so a 50 MB candidate list held all of them for
seconds, and a connection that sent one byte a second was held open forever. So, before
any parsing:
  - 415 unless the content type is application/json (parameters such as charset allowed);
  - 413 when Content-Length says the body is over `max_bytes`, without reading it, or as
    soon as the bytes read pass `max_bytes` (chunked bodies have no length);
  - 408 when the whole body has not arrived within `timeout_s` of the handler starting,
    not counting the time the loop spent scoring other clients' batches.
413 and 408 replies close the connection (the unread rest of the body cannot be skipped).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping, NamedTuple

import orjson

JSON_TYPES = frozenset({"application/json"})


class Reply(NamedTuple):
    """A reply's status and JSON body, for either front of /rank (the FastAPI route or the
    bare ASGI one in ranker.serving.http): `close` asks the server to close the connection."""

    status: int
    body: bytes
    close: bool = False


def problem(status: int, field: str, message: str, kind: str, close: bool = False) -> Reply:
    """An error reply in the shape of the 422s: `message` and a structured `detail`."""
    detail = [{"loc": [field] if field else [], "msg": message, "type": kind}]
    body = {"message": f"{field}: {message}" if field else message, "detail": detail}
    return Reply(status, orjson.dumps(body), close)


async def receive_within(receive: Callable[[], Awaitable[dict]], seconds_left: Callable[[], float]) -> dict | None:
    """`await receive()`, or None once `seconds_left()` reaches 0 first.

    One timer on the loop, re-armed while time is left, instead of a task per receive: an
    ASGI server hands over a body that has already arrived without suspending, so the
    common case costs a timer set and cancelled, and no extra passes of the event loop."""
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    expired = False

    def check() -> None:
        nonlocal timer, expired
        left = seconds_left()
        if left > 0:
            timer = loop.call_later(left, check)
        else:
            expired = True
            task.cancel()

    left = seconds_left()
    if left <= 0:
        return None
    timer = loop.call_later(left, check)
    try:
        return await receive()  # ASGI receive: safe to cancel
    except asyncio.CancelledError:
        if expired and task.uncancel() == 0:
            return None
        raise
    finally:
        timer.cancel()


async def read_json_body(headers: Mapping[str, str], receive: Callable[[], Awaitable[dict]], max_bytes: int,
                         timeout_s: float, busy_seconds: Callable[[], float] = lambda: 0.0) -> bytes | Reply:
    """The raw body, or the error reply that refuses it (see the module docstring).

    `headers`: lower-case names. The timeout is the client's: `busy_seconds()` (the seconds
    the loop has spent blocked in scoring) is taken out of the time waited, so bytes that
    arrived while the loop was busy with other clients' batches never turn into a 408."""
    content_type = headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() not in JSON_TYPES:
        return problem(415, "content-type", f"expected application/json, got {content_type or 'none'!r}",
                       "unsupported_media_type")
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return problem(413, "body", f"{int(declared):,} bytes is over the {max_bytes:,}-byte limit",
                       "too_large", close=True)
    started, busy_at_start = time.perf_counter(), busy_seconds()
    left = lambda: timeout_s - (time.perf_counter() - started) + (busy_seconds() - busy_at_start)  # noqa: E731
    chunks, size, more = [], 0, True
    while more:
        message = await receive_within(receive, left)
        if message is None:
            return problem(408, "body", f"not received within {timeout_s:g} s ({size:,} bytes arrived)",
                           "timeout", close=True)
        if message["type"] == "http.disconnect":
            return problem(400, "body", "the client closed the connection mid-body", "disconnect", close=True)
        body = message.get("body", b"")
        size += len(body)
        if size > max_bytes:
            return problem(413, "body", f"over the {max_bytes:,}-byte limit", "too_large", close=True)
        chunks.append(body)
        more = message.get("more_body", False)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
