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
from typing import Callable

import orjson
from fastapi import Request
from fastapi.responses import Response

JSON_TYPES = frozenset({"application/json"})


def problem(status: int, field: str, message: str, kind: str, close: bool = False) -> Response:
    """An error reply in the shape of the 422s: `message` and a structured `detail`."""
    detail = [{"loc": [field] if field else [], "msg": message, "type": kind}]
    body = {"message": f"{field}: {message}" if field else message, "detail": detail}
    headers = {"connection": "close"} if close else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def read_json_body(request: Request, max_bytes: int, timeout_s: float,
                         busy_seconds: Callable[[], float] = lambda: 0.0) -> bytes | Response:
    """The raw body, or the error reply that refuses it (see the module docstring).

    The timeout is the client's: `busy_seconds()` (the seconds the loop has spent blocked
    in scoring) is taken out of the time waited, so bytes that arrived while the loop was
    busy with other clients' batches never turn into a 408."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() not in JSON_TYPES:
        return problem(415, "content-type", f"expected application/json, got {content_type or 'none'!r}",
                       "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return problem(413, "body", f"{int(declared):,} bytes is over the {max_bytes:,}-byte limit",
                       "too_large", close=True)
    started, busy_at_start = time.perf_counter(), busy_seconds()
    chunks, size, more = [], 0, True
    while more:
        waiter = asyncio.ensure_future(request.receive())  # ASGI receive: safe to cancel and call again
        try:
            while not waiter.done():
                left = timeout_s - (time.perf_counter() - started) + (busy_seconds() - busy_at_start)
                if left <= 0:
                    return problem(408, "body", f"not received within {timeout_s:g} s ({size:,} bytes arrived)",
                                   "timeout", close=True)
                await asyncio.wait({waiter}, timeout=left)
        finally:
            waiter.cancel()  # no-op once done
        message = waiter.result()
        if message["type"] == "http.disconnect":
            return problem(400, "body", "the client closed the connection mid-body", "disconnect", close=True)
        size += len(message.get("body", b""))
        if size > max_bytes:
            return problem(413, "body", f"over the {max_bytes:,}-byte limit", "too_large", close=True)
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)
