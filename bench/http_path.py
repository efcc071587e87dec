"""The /rank path outside the model, in one process (`climber bench http-path`).

One client sends requests one at a time straight into the ASGI app (a bare ASGI call: no
socket, no HTTP parsing, no client library), for each variant of the service's front
(`rank_route`: the lean handler or FastAPI's route; `batching`: adaptive or fixed; the
batching wait) in interleaved turns. Each request through the app is paired with the same
request ranked by `NeuralRanker.rank_timed` directly, right after it, so the two see the
same load: the median of the paired differences is what the app and the batching task add
to a lone request. Then the same app with the model's answers replayed (each user's first
reply, computed once, returned by `rank_timed` at no cost) and no direct calls: the app's
own floor, free of how the model's cost varies on a shared box. CPU time beside wall time, because a shared box stretches wall time (a
timed wait most of all: a 1 ms timer wakes late when the cores are busy). `climber bench
load` measures the real server over TCP; this isolates the app.

    climber bench http-path --turns 3      # bench/results/http_path.json
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.serve_common import N_TRACKS, console, service_files

# (rank_route, batching, max_wait_ms): before this work (FastAPI's route, a fixed 1 ms wait), each change alone, both.
DEFAULT_VARIANTS = (("fastapi", "fixed", 1.0), ("lean", "fixed", 1.0), ("fastapi", "adaptive", 1.0),
                    ("lean", "adaptive", 1.0))


def asgi_post(app, path: str, body: bytes):
    """One POST through the ASGI app; returns (status, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])
    out: list[dict] = []

    async def receive() -> dict:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict) -> None:
        out.append(message)

    async def call():
        await app(scope, receive, send)
        return out[0]["status"], b"".join(m.get("body", b"") for m in out[1:])

    return call()


def _turn(checkpoint: Path, feast_dir: Path, variant: tuple, bodies: list[bytes], warm: int) -> dict:
    import orjson

    from ranker.interface import RankRequest
    from ranker.serving.http import build_service, create_app
    from ranker.serving.service import ServingSettings

    route, batching, wait_ms = variant
    service = build_service(ServingSettings(checkpoint=checkpoint, feast_dir=feast_dir, max_wait_ms=wait_ms,
                                            batching=batching, rank_route=route))
    app = create_app(service)
    requests = [RankRequest(request_id=i, user_id=int(orjson.loads(b)["user_id"]), scenario="home_feed",
                            candidates=np.array(orjson.loads(b)["candidates"])) for i, b in enumerate(bodies)]

    async def paired() -> tuple[list[float], list[float], float, float]:
        await service.start()  # a bare ASGI call runs no lifespan
        try:
            for body in bodies[:warm]:
                status, reply = await asgi_post(app, "/rank", body)
                assert status == 200, reply[:300]
            walls, direct, cpu, direct_cpu = [], [], 0.0, 0.0
            for body, request in zip(bodies, requests):
                c, start = time.process_time(), time.perf_counter()
                status, _ = await asgi_post(app, "/rank", body)
                walls.append(time.perf_counter() - start)
                c2 = time.process_time()
                cpu += c2 - c
                start = time.perf_counter()
                service.ranker.rank_timed([request])
                direct.append(time.perf_counter() - start)
                direct_cpu += time.process_time() - c2
                assert status == 200
            return walls, direct, cpu, direct_cpu
        finally:
            await service.stop()

    walls, direct, cpu, direct_cpu = asyncio.run(paired())
    k = len(bodies)
    added = 1e3 * (np.asarray(walls) - np.asarray(direct))
    return {"rank_route": route, "batching": batching, "max_wait_ms": wait_ms,
            "app_p50_ms": 1e3 * float(np.median(walls)), "direct_p50_ms": 1e3 * float(np.median(direct)),
            "added_p50_ms": float(np.median(added)), "app_cpu_ms": 1e3 * cpu / k, "direct_cpu_ms": 1e3 * direct_cpu / k,
            "added_cpu_ms": 1e3 * (cpu - direct_cpu) / k}


def _floor(checkpoint: Path, feast_dir: Path, variant: tuple, bodies: list[bytes], warm: int) -> dict:
    """The app's own cost per lone request: `rank_timed` replays each user's first answer."""
    from ranker.serving.http import build_service, create_app
    from ranker.serving.service import ServingSettings

    route, batching, wait_ms = variant
    service = build_service(ServingSettings(checkpoint=checkpoint, feast_dir=feast_dir, max_wait_ms=wait_ms,
                                            batching=batching, rank_route=route))
    app, rank_timed, answers = create_app(service), service.ranker.rank_timed, {}

    def replay(requests):  # one request per batch here (one client, one at a time)
        user = requests[0].user_id
        if user not in answers:
            answers[user] = rank_timed(requests)
        return answers[user]

    service.ranker.rank_timed = replay

    async def lone() -> tuple[list[float], float]:
        await service.start()
        try:
            for body in bodies[:warm]:
                await asgi_post(app, "/rank", body)
            walls, cpu = [], time.process_time()
            for body in bodies:
                start = time.perf_counter()
                status, _ = await asgi_post(app, "/rank", body)
                walls.append(time.perf_counter() - start)
                assert status == 200
            return walls, time.process_time() - cpu
        finally:
            await service.stop()

    walls, cpu = asyncio.run(lone())
    return {"rank_route": route, "batching": batching, "max_wait_ms": wait_ms,
            "floor_p50_us": 1e6 * float(np.median(walls)), "floor_cpu_us": 1e6 * cpu / len(bodies)}


def body_and_reply_cpu_us(body: bytes, calls: int = 3000) -> dict[str, float]:
    """CPU microseconds per call of the /rank body's validation from raw bytes and of the
    reply's encoding, at this body's candidate count: the parts of the path that grow with M."""
    import orjson

    from ranker.interface import RankResponse
    from ranker.serving.http import encode_reply, rank_body_model
    from ranker.serving.service import ScoredResponse

    body_model = rank_body_model(100_000)
    m = len(orjson.loads(body)["candidates"])
    scores = {name: np.linspace(0, 1, m, dtype=np.float32) for name in ("score", "full_play", "like", "skip", "share")}
    scored = ScoredResponse(RankResponse(request_id=1, user_id=1, candidates=np.arange(m), scores=scores,
                                         order=np.arange(m), model_name="astro", model_version="v"),
                            {"queue_ms": 0.1, "total_ms": 2.0})
    out = {}
    for name, fn in (("validate_body_us", lambda: body_model.model_validate_json(body)),
                     ("encode_reply_us", lambda: encode_reply(scored))):
        fn()
        start = time.process_time()
        for _ in range(calls):
            fn()
        out[name] = 1e6 * (time.process_time() - start) / calls
    return out


def label(variant: tuple) -> str:
    route, batching, wait = variant
    return f"{route}, {batching} {wait:g} ms"


def run_bench_http_path(variants: tuple[tuple, ...] = DEFAULT_VARIANTS, turns: int = 3, size: str = "s", n: int = 256,
                        M: int = 200, users: int = 50, requests: int = 200, save_as: str | None = "http_path",
                        validate_calls: int = 3000) -> dict:
    import orjson

    from bench.common import save

    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-http-path-") as tmp:
        checkpoint, feast_dir = service_files(tmp, users, n, size)
        rng = np.random.default_rng(1)
        bodies = [orjson.dumps({"user_id": i % users, "scenario": "home_feed",
                                "candidates": rng.choice(N_TRACKS, M, replace=False).tolist()}) for i in range(requests)]
        rows = [_turn(checkpoint, feast_dir, variant, bodies, warm=users)
                for _, variant in itertools.product(range(turns), variants)]
        floors = [_floor(checkpoint, feast_dir, variant, bodies * 5, warm=users)
                  for _, variant in itertools.product(range(turns), variants)]
    def of(v: tuple, key: str, table: list[dict]) -> float:
        return float(np.median([r[key] for r in table if (r["rank_route"], r["batching"], r["max_wait_ms"]) == v]))

    summary = {label(v): {**{key: of(v, key, rows) for key in ("added_p50_ms", "added_cpu_ms", "app_p50_ms",
                                                                 "direct_p50_ms")},
                          **{key: of(v, key, floors) for key in ("floor_p50_us", "floor_cpu_us")}} for v in variants}
    console.print(f"astro-{size}, n={n}, M={M}: added to a lone request by the app and the batching task "
                  f"(median of {turns} turns of {requests} paired requests; ms)")
    console.print(f"{'variant':<24}{'app p50':>8}{'direct':>8}{'added':>8}{'CPU':>7}{'floor p50':>11}{'CPU':>7}")
    for name, row in summary.items():
        console.print(f"{name:<24}{row['app_p50_ms']:>8.2f}{row['direct_p50_ms']:>8.2f}{row['added_p50_ms']:>+8.2f}"
                      f"{row['added_cpu_ms']:>+7.2f}{row['floor_p50_us'] / 1e3:>11.3f}{row['floor_cpu_us'] / 1e3:>7.3f}")
    console.print("added: app p50 minus the paired in-process call's, and CPU per request the same way; floor: "
                  "the app alone, the model's answers replayed (ms)")
    parts = body_and_reply_cpu_us(bodies[0], validate_calls)
    console.print(f"M = {M}: body validation {parts['validate_body_us']:.0f} us, reply encoding "
                  f"{parts['encode_reply_us']:.0f} us CPU per request")
    figures = {"size": size, "n": n, "M": M, "requests_per_turn": requests, "turns": rows, "floors": floors,
               "median_by_variant": summary,
               **parts, "wall_seconds": time.time() - started}
    if save_as:
        console.print(f"written {save(save_as, figures)}")
    return figures
