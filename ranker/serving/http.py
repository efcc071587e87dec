"""The ranking service over HTTP (FastAPI + uvicorn).

    POST /rank     {user_id, scenario, candidates, context?, ts?, request_id?}
                   -> scores per task, order (best first), model name and version, timing
    GET  /health   model and cache state
    GET  /metrics  Prometheus text

    python -m ranker.serving.http --checkpoint models/astro-s --feast-dir runs/<id>/feast [--port 8000]

Bad requests get a 422 whose `message` names the field and the problem: an empty or
oversized candidate list, an unknown scenario, a non-integer id, a NaN or infinite context
value, a track outside the model's catalogue, an id or timestamp outside int64. Each request
is checked on its own, so a bad one never fails its batch-mates. Bodies that are not JSON,
too large or too slow get a 415, 413 or 408 before parsing (`ranker.serving.http_limits`). Binds
127.0.0.1 unless told otherwise.

Why /rank reads raw bytes instead of declaring a body parameter: FastAPI would decode the
JSON into Python objects and then validate them, and validate the reply model again
before encoding it. Here pydantic validates the raw bytes in one pass (the same model, so
the same 422 messages), and the reply is encoded straight from the numpy arrays with
orjson (float32 scores at float32 precision, about half the bytes). Measured in-process
at M = 200, the /rank path outside the scoring service went from 0.46-0.49 ms to
0.27-0.32 ms per request (best of 300). `RankReply` still documents the reply in the
OpenAPI schema, and the tests check replies against it.

Why POST /rank skips FastAPI by default (`ServingSettings.rank_route` "lean"): the hot
route needs none of the framework's work per request (its middleware stack, routing, a
Request and a Response object), so `RankingApp` hands it to a bare ASGI handler before
FastAPI sees it. Both fronts call the same `RankHandler` (limits, validation, ranking,
encoding), so they answer alike, which the tests check on both; "fastapi" keeps the
framework's route, the reference path. Every other route is FastAPI's.
"""
# No `from __future__ import annotations`: FastAPI must see the request model built in create_app.

import contextlib
import gc
import logging
import math
import time
from pathlib import Path
from typing import Annotated, Literal, Sequence

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator

from ranker.interface import RankRequest
from ranker.serving.http_limits import Reply, read_json_body
from ranker.serving.ranker import INT64_MAX
from ranker.serving.service import ScoredResponse, ScoringService, ServingSettings
from streaming.events import SCENARIOS

# Ids and timestamps are int64 everywhere behind the edge (Feast keys, DuckDB, the model), so
# a value outside [0, 2^63) is refused here, per request, and never reaches a batch.
Id = Annotated[StrictInt, Field(ge=0, le=INT64_MAX)]  # JSON integers, never "7" or 7.5


class RankReply(BaseModel):
    request_id: int
    user_id: int
    model_name: str
    model_version: str
    candidates: list[int]
    order: list[int]  # indices into candidates, best first
    scores: dict[str, list[float]]  # "score" (ranked by) and one probability per task
    timing_ms: dict[str, float]
    # only with the `trace` setting: perf_counter seconds (CLOCK_MONOTONIC on Linux) when the
    # handler started, the body was read and checked, the request was queued, its batch started
    # and ended, and the reply was encoded; gc_s: GC pause seconds in the server meanwhile
    trace: dict[str, float] | None = None


def rank_body_model(max_candidates: int, duplicates: str = "score") -> type[BaseModel]:
    """The POST /rank body; the candidate limit and the duplicate rule are settings, so the
    model is built per app."""

    class RankBody(BaseModel):
        model_config = ConfigDict(extra="forbid")
        user_id: Id
        scenario: Literal[SCENARIOS]  # type: ignore[valid-type]
        candidates: Annotated[list[Id], Field(min_length=1, max_length=max_candidates)]
        context: dict[str, StrictInt | StrictFloat | StrictStr] = {}
        ts: Id | None = None  # epoch ms of the request; default: now
        request_id: Id | None = None

        @field_validator("candidates")
        @classmethod
        def _distinct(cls, candidates: list[int]) -> list[int]:
            if duplicates == "reject" and len(set(candidates)) < len(candidates):
                first: dict[int, int] = {}
                for i, track in enumerate(candidates):
                    if track in first:
                        raise ValueError(f"track {track} is repeated (positions {first[track]} and {i}); "
                                         "this service refuses duplicated candidates")
                    first[track] = i
            return candidates

        @field_validator("context")
        @classmethod
        def _finite(cls, context: dict) -> dict:
            for key, value in context.items():  # JSON has no NaN, but Python clients send it
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"context[{key!r}] must be a finite number, got {value}")
            return context

    return RankBody


def _problem(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


def unprocessable(errors: Sequence[dict], prefix: tuple = ()) -> Reply:
    """The 422 reply: `message` names each field and problem, `detail` is the structured list.
    `prefix` ("body",) gives body errors the locations FastAPI's own validation uses."""
    detail = [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in errors]
    content = {"message": "; ".join(map(_problem, detail)), "detail": detail}
    return Reply(422, orjson.dumps(content))


def as_response(reply: Reply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type="application/json",
                    headers={"connection": "close"} if reply.close else None)


def encode_reply(scored: ScoredResponse, trace: dict[str, float] | None = None) -> bytes:
    """The /rank reply (the RankReply shape) as JSON bytes, straight from the numpy arrays."""
    response = scored.response
    reply = {
        "request_id": response.request_id, "user_id": response.user_id, "model_name": response.model_name,
        "model_version": response.model_version, "candidates": response.candidates, "order": response.order,
        "scores": dict(response.scores), "timing_ms": scored.timing_ms,
    }
    if trace is not None:
        reply["trace"] = trace
    return orjson.dumps(reply, option=orjson.OPT_SERIALIZE_NUMPY)


class RankHandler:
    """POST /rank from headers and the ASGI `receive` to a Reply, for either front: body
    limits, validation from raw bytes, the batching service, the reply's encoding."""

    def __init__(self, service: ScoringService) -> None:
        self.service, self.settings = service, service.settings
        self.body_model = rank_body_model(self.settings.max_candidates, self.settings.duplicate_candidates)
        self.counter = iter(range(1, 2**62))
        self.busy_seconds = lambda: service.busy_seconds

    async def __call__(self, headers, receive) -> Reply:
        service, settings = self.service, self.settings
        if settings.trace:
            received, gc_at_start = time.perf_counter(), service.gc_pauses.total_s
        with service.arriving():  # the adaptive batching wait holds the batch while this is read
            raw = await read_json_body(headers, receive, settings.max_body_bytes, settings.body_timeout_s,
                                       busy_seconds=self.busy_seconds)
            if isinstance(raw, Reply):  # 415, 413 or 408, before any parsing
                return raw
            try:  # raw bytes -> validated body in one pass (see the module docstring)
                body = self.body_model.model_validate_json(raw)
            except ValidationError as error:
                return unprocessable(error.errors(include_url=False), prefix=("body",))
            request = RankRequest(
                request_id=body.request_id if body.request_id is not None else next(self.counter),
                user_id=body.user_id, scenario=body.scenario, candidates=body.candidates,
                context=body.context, ts=body.ts if body.ts is not None else int(time.time() * 1000),
            )
            read = time.perf_counter()
        try:
            scored = await service.rank_one(request)
        except ValueError as error:  # beyond what the body schema can say, e.g. unknown track
            return unprocessable([{"loc": [], "msg": str(error), "type": "value_error"}])
        if settings.trace:  # read = body read and checked; queued = handed to the batching task
            trace = {"received": received, "read": read, **scored.stamps, "replied": time.perf_counter(),
                     "gc_s": service.gc_pauses.total_s - gc_at_start}
            return Reply(200, encode_reply(scored, trace))
        return Reply(200, encode_reply(scored))


_JSON = (b"content-type", b"application/json")


class RankingApp(FastAPI):
    """FastAPI, with POST /rank answered by a bare ASGI handler when `lean_rank` is set."""

    lean_rank: RankHandler | None = None

    async def __call__(self, scope, receive, send) -> None:
        if self.lean_rank is not None and scope["type"] == "http" and scope["path"] == "/rank" \
                and scope["method"] == "POST":
            headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
            reply = await self.lean_rank(headers, receive)
            response_headers = [_JSON, (b"content-length", str(len(reply.body)).encode())]
            if reply.close:
                response_headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": reply.status, "headers": response_headers})
            await send({"type": "http.response.body", "body": reply.body})
            return
        await super().__call__(scope, receive, send)


def create_app(service: ScoringService, freeze_gc: bool = False) -> FastAPI:
    """An app over `service`; its lifespan starts and stops the batching task.

    `freeze_gc` (the server process, `serve`): after warm-up, everything alive (modules, the
    model, the app) moves to the permanent generation, so a full collection during serving no
    longer walks it, which is what makes such a pause a latency spike. Not for processes that
    build many apps (tests): what is frozen is never collected."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        if freeze_gc:
            gc.collect()
            gc.freeze()
            if service.gc_pauses is not None:  # what serving costs, not this start-up collection
                service.gc_pauses.reset()
        yield
        await service.stop()

    app = RankingApp(title="Climber ranking service", lifespan=lifespan)
    app.state.service = service
    handler = RankHandler(service)
    if service.settings.rank_route == "lean":
        app.lean_rank = handler

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        return as_response(unprocessable(exc.errors()))

    schema = handler.body_model.model_json_schema()
    body_schema = {"content": {"application/json": {"schema": schema}}, "required": True}

    # The reference front of POST /rank (rank_route "fastapi"), and its OpenAPI entry either way.
    @app.post("/rank", response_model=None, responses={200: {"model": RankReply}},
              openapi_extra={"requestBody": body_schema})
    async def rank(http_request: Request) -> Response:
        return as_response(await handler(http_request.headers, http_request.receive))

    @app.get("/health")
    async def health() -> dict:
        stats = service.ranker.cache.stats
        return {"status": "ok" if service.running else "stopped", "model_name": service.ranker.name,
                "model_version": service.ranker.version, "device": str(service.ranker.device),
                "cache_entries": stats.entries, "cache_bytes": stats.bytes}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics_text(), media_type=CONTENT_TYPE_LATEST)

    return app


def process_settings(settings: ServingSettings) -> dict:
    """The serving process's own settings (torch threads, malloc), so here and not in the
    service, which tests and the sandbox build inside processes of their own."""
    applied: dict = {}
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
        applied["torch_threads"] = settings.torch_threads
    if settings.malloc == "keep":
        from ranker.serving.malloc import keep_freed_pages

        applied["malloc"] = keep_freed_pages()
        if not applied["malloc"].applied:
            logging.getLogger(__name__).warning("malloc thresholds not set: %s", applied["malloc"].reason)
    return applied


def build_service(settings: ServingSettings) -> ScoringService:
    """Checkpoint + the run's Feast store -> a ready (not yet started) service."""
    from features.store import FeatureStoreClient
    from ranker.serving.ranker import NeuralRanker

    if settings.checkpoint is None or settings.feast_dir is None:
        raise ValueError("serving needs a checkpoint folder and a Feast data folder (--checkpoint, --feast-dir)")
    store = FeatureStoreClient(settings.feast_dir, settings.online_store, settings.redis_url)
    ranker = NeuralRanker.from_checkpoint(settings.checkpoint, store, cache_bytes=settings.cache_bytes,
                                          max_candidates=settings.max_candidates,
                                          candidate_chunk=settings.candidate_chunk, device=settings.device,
                                          kv_storage=settings.kv_storage, window_hop=settings.window_hop,
                                          stage_two=settings.stage_two)
    return ScoringService(ranker, settings)


def serve(settings: ServingSettings) -> None:
    process_settings(settings)
    uvicorn.run(create_app(build_service(settings), freeze_gc=True), host=settings.host, port=settings.port,
                log_level="warning", access_log=False)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m ranker.serving.http`: the `climber serve` command."""
    from ranker.serving.cli import serve_app
    from sandbox.cli_options import run_command

    run_command(serve_app, argv, "python -m ranker.serving.http")


if __name__ == "__main__":
    main()
