"""What a /rank body must be before it is parsed: JSON, not too large, not too slow.

One client's body must cost no other client anything. Parsing runs on the event loop that
also batches and scores every request, so a 50 MB candidate list held all of them for
seconds, and a connection that sent one byte a second was held open forever. So, before
any parsing:
  - 415 unless the content type is application/json (parameters such as charset allowed);
  - 413 when Content-Length says the body is over `max_bytes`, without reading it, or as
    soon as the bytes read pass `max_bytes` (chunked bodies have no length);
  - 408 when the whole body has not arrived within `timeout_s` of the handler starting.
413 and 408 replies close the connection (the unread rest of the body cannot be skipped).
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi import Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

JSON_TYPES = frozenset({"application/json"})


def problem(status: int, field: str, message: str, kind: str, close: bool = False) -> Response:
    """An error reply in the shape of the 422s: `message` and a structured `detail`."""
    detail = [{"loc": [field] if field else [], "msg": message, "type": kind}]
    body = {"message": f"{field}: {message}" if field else message, "detail": detail}
    headers = {"connection": "close"} if close else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


async def read_json_body(request: Request, max_bytes: int, timeout_s: float) -> bytes | Response:
    """The raw body, or the error reply that refuses it (see the module docstring)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() not in JSON_TYPES:
        return problem(415, "content-type", f"expected application/json, got {content_type or 'none'!r}",
                       "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        return problem(413, "body", f"{int(declared):,} bytes is over the {max_bytes:,}-byte limit",
                       "too_large", close=True)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    return problem(413, "body", f"over the {max_bytes:,}-byte limit", "too_large", close=True)
                chunks.append(chunk)
    except TimeoutError:
        return problem(408, "body", f"not received within {timeout_s:g} s ({size:,} bytes arrived)",
                       "timeout", close=True)
    except ClientDisconnect:
        return problem(400, "body", "the client closed the connection mid-body", "disconnect", close=True)
    return b"".join(chunks)
