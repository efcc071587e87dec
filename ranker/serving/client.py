"""The ranking service as a sandbox arm: `http://host:port` ranks through `POST /rank`.

    experiment.rankers = {"control": "popularity", "treatment": "http://ranker:8000"}

The sandbox keeps candidate generation and the A/B wiring; the service (`climber serve`,
ranker.http) holds the model and its own KV cache and reads user history from the same
Feast store. A batch's requests are sent concurrently, so the service's micro-batching sees
them together, as it would see many clients. A refused request (4xx) or an unreachable
service fails the ranking call loudly, naming the service and the request: an arm that
silently fell back to something else would corrupt the A/B comparison.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import httpx
import numpy as np
import orjson

from ranker.interface import RankRequest, RankResponse

HTTP_SCHEMES = ("http://", "https://")


def is_http_ranker(spec: str) -> bool:
    return spec.startswith(HTTP_SCHEMES)


def _plain(value):
    """Context values as JSON scalars (numpy scalars would be refused by the service)."""
    return value.item() if isinstance(value, np.generic) else value


def encode_request(request: RankRequest) -> bytes:
    return orjson.dumps({
        "request_id": int(request.request_id), "user_id": int(request.user_id), "scenario": request.scenario,
        "candidates": np.asarray(request.candidates, np.int64), "ts": int(request.ts),
        "context": {str(k): _plain(v) for k, v in request.context.items()},
    }, option=orjson.OPT_SERIALIZE_NUMPY)


def decode_reply(body: bytes) -> RankResponse:
    reply = orjson.loads(body)
    return RankResponse(
        request_id=reply["request_id"], user_id=reply["user_id"],
        candidates=np.asarray(reply["candidates"], np.int64),
        scores={task: np.asarray(values, np.float32) for task, values in reply["scores"].items()},
        order=np.asarray(reply["order"], np.int64), model_name=reply["model_name"],
        model_version=reply["model_version"],
    )


class HttpRanker:
    """A `Ranker` whose model lives in the ranking service at `base_url`.

    `client` replaces the HTTP client (tests pass FastAPI's TestClient); `concurrency` is
    how many requests are in flight at once (1: one after another)."""

    def __init__(self, base_url: str, timeout_s: float = 60.0, concurrency: int = 16,
                 client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = client or httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self.concurrency = max(1, concurrency)
        self._pool: ThreadPoolExecutor | None = None
        health = self._call("GET", "/health", None, "health check").json()
        if health.get("status") != "ok":
            raise RuntimeError(f"ranking service {self.base_url} is not serving: /health says {health}")
        self.name = health["model_name"]
        self.version = health["model_version"]

    def _call(self, method: str, path: str, body: bytes | None, what: str) -> httpx.Response:
        try:
            response = self.client.request(method, path, content=body,
                                           headers={"content-type": "application/json"} if body else None)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"ranking service {self.base_url}{path} unreachable ({what}): {exc!r}") from exc
        if 400 <= response.status_code < 500:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise ValueError(f"ranking service {self.base_url} refused {what} ({response.status_code}): {message}")
        if response.status_code != 200:
            raise RuntimeError(f"ranking service {self.base_url} failed {what} ({response.status_code}): "
                               f"{response.text[:200]}")
        return response

    def _rank_one(self, request: RankRequest) -> RankResponse:
        response = self._call("POST", "/rank", encode_request(request), f"request {request.request_id}")
        return decode_reply(response.content)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        if self.concurrency == 1 or len(requests) <= 1:
            return [self._rank_one(r) for r in requests]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="http-ranker")
        return list(self._pool.map(self._rank_one, requests))  # in request order

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.client.close()
