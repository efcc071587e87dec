"""The /rank path outside the model, in one process (`climber bench http-path`).

One client sends requests one at a time through the FastAPI app over an in-memory ASGI
transport (no socket, no uvicorn, no second process), for each batching wait setting of the
service in interleaved turns, and the same requests go to `NeuralRanker.rank_timed`
directly. The difference of the p50s is what the app and the batching task add to a lone
request; CPU time beside wall time, because a shared box stretches wall time (a timed wait
most of all: a 1 ms timer wakes late when the cores are busy). `climber bench load` measures
the real server over TCP; this isolates the app.

    climber bench http-path --waits 1 0 --turns 3      # bench/results/http_path.json
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.serve_common import N_TRACKS, console, service_files


def _turn(checkpoint: Path, feast_dir: Path, wait_ms: float, bodies: list[bytes], warm: int) -> dict:
    import httpx
    import orjson

    from ranker.interface import RankRequest
    from ranker.serving.http import build_service, create_app
    from ranker.serving.service import ServingSettings

    service = build_service(ServingSettings(checkpoint=checkpoint, feast_dir=feast_dir, max_wait_ms=wait_ms))
    app = create_app(service)

    async def through_the_app() -> tuple[list[float], float]:
        await service.start()  # the ASGI transport runs no lifespan
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
                post = lambda b: client.post("/rank", content=b, headers={"content-type": "application/json"})  # noqa: E731
                for body in bodies[:warm]:
                    (await post(body)).raise_for_status()
                walls, cpu = [], time.process_time()
                for body in bodies:
                    start = time.perf_counter()
                    (await post(body)).raise_for_status()
                    walls.append(time.perf_counter() - start)
                return walls, time.process_time() - cpu
        finally:
            await service.stop()

    walls, cpu = asyncio.run(through_the_app())
    requests = [RankRequest(request_id=i, user_id=int(orjson.loads(b)["user_id"]), scenario="home_feed",
                            candidates=np.array(orjson.loads(b)["candidates"])) for i, b in enumerate(bodies)]
    direct, direct_cpu = [], time.process_time()
    for request in requests:
        start = time.perf_counter()
        service.ranker.rank_timed([request])
        direct.append(time.perf_counter() - start)
    direct_cpu = time.process_time() - direct_cpu
    k = len(bodies)
    p50, direct_p50 = 1e3 * float(np.median(walls)), 1e3 * float(np.median(direct))
    return {"max_wait_ms": wait_ms, "app_p50_ms": p50, "app_cpu_ms": 1e3 * cpu / k, "direct_p50_ms": direct_p50,
            "direct_cpu_ms": 1e3 * direct_cpu / k, "added_p50_ms": p50 - direct_p50,
            "added_cpu_ms": 1e3 * (cpu - direct_cpu) / k}


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


def run_bench_http_path(waits: tuple[float, ...] = (1.0, 0.0), turns: int = 3, size: str = "s", n: int = 256,
                        M: int = 200, users: int = 50, requests: int = 200, save_as: str | None = "http_path") -> dict:
    import orjson

    from bench.common import save

    torch.set_num_threads(1)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-http-path-") as tmp:
        checkpoint, feast_dir = service_files(tmp, users, n, size)
        rng = np.random.default_rng(1)
        bodies = [orjson.dumps({"user_id": i % users, "scenario": "home_feed",
                                "candidates": rng.choice(N_TRACKS, M, replace=False).tolist()}) for i in range(requests)]
        rows = [_turn(checkpoint, feast_dir, wait, bodies, warm=users)
                for turn in range(turns) for wait in waits]
    for row in rows:
        console.print(f"max wait {row['max_wait_ms']:g} ms: app p50 {row['app_p50_ms']:.2f} ms, in process "
                      f"{row['direct_p50_ms']:.2f} ms: added {row['added_p50_ms']:+.2f} ms p50, "
                      f"{row['added_cpu_ms']:+.2f} ms CPU per request")
    parts = body_and_reply_cpu_us(bodies[0])
    console.print(f"M = {M}: body validation {parts['validate_body_us']:.0f} us, reply encoding "
                  f"{parts['encode_reply_us']:.0f} us CPU per request")
    summary = {str(w): {key: float(np.median([r[key] for r in rows if r["max_wait_ms"] == w]))
                        for key in ("added_p50_ms", "added_cpu_ms")} for w in waits}
    figures = {"size": size, "n": n, "M": M, "turns": rows, "median_by_wait": summary, **parts, "wall_seconds": time.time() - started}
    if save_as:
        console.print(f"written {save(save_as, figures)}")
    return figures
