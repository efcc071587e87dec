"""`climber serve` (also `python -m ranker.serving.http`): flags -> ServingSettings."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import typer

serve_app = typer.Typer(add_completion=False)


@serve_app.command("serve")
def serve(
    checkpoint: Path = typer.Option(...),
    feast_dir: Path = typer.Option(...),
    host: Optional[str] = typer.Option(None),
    port: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None),
    max_batch: Optional[int] = typer.Option(None),
    max_wait_ms: Optional[float] = typer.Option(None, help="the longest a batch waits for more requests (default 1)"),
    batching: Optional[Literal["adaptive", "fixed"]] = typer.Option(
        None, help="adaptive (default): wait only while other requests are on their way in; fixed: always wait"),
    rank_route: Optional[Literal["lean", "fastapi"]] = typer.Option(
        None, help="POST /rank by a bare ASGI handler (lean, default) or FastAPI's route (the reference)"),
    scoring: Optional[Literal["loop", "thread"]] = typer.Option(
        None, help="rank each batch on the event loop (default) or in one worker thread while the loop reads requests"),
    malloc: Optional[Literal["keep", "glibc"]] = typer.Option(
        None, help="keep (default): fix glibc's malloc thresholds so a batch reuses the pages the last one freed; "
        "glibc: its own dynamic thresholds"),
    stage_two: Optional[Literal["fast", "reference"]] = typer.Option(
        None, help="candidates against the cached history: fast (default; same scores, smaller fixed cost per "
        "batch) or reference (the model's own)"),
    torch_threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default 1; 0: "
                                                "torch's default, one per core)"),
    max_candidates: Optional[int] = typer.Option(None, help="422 for a request with more candidates (default 100,000)"),
    candidate_chunk: Optional[int] = typer.Option(None, help="candidates scored per pass over the cached history; "
                                                  "more are scored in chunks, same scores (default 1,024)"),
    max_body_bytes: Optional[int] = typer.Option(None, help="413 for a /rank body over this (default 1 MiB)"),
    body_timeout_s: Optional[float] = typer.Option(None, help="408 for a body not received within this (default 5)"),
    kv_storage: Optional[Literal["fp32", "bf16", "int8"]] = typer.Option(
        None, help="K/V cache entries at rest: fp32 (default), bf16, or int8 with a per-row scale"),
    window_hop: Optional[int] = typer.Option(None, help="move the served history window's start in steps of this "
                                             "many events (1: slide it with every event)"),
    duplicate_candidates: Optional[Literal["score", "reject"]] = typer.Option(
        None, help="score every occurrence of a repeated candidate (default) or reject the request"),
    trace: Optional[bool] = typer.Option(None, "--trace/--no-trace", help="per-request timestamps in /rank replies "
                                         "and GC pauses in /metrics (for `climber bench load --breakdown`)"),
) -> None:
    """The ranking service over HTTP: POST /rank, GET /health, GET /metrics.

    Flags left out come from the environment (ServingSettings), then the defaults."""
    from ranker.serving.http import serve as run_service
    from ranker.serving.service import ServingSettings

    flags = {"checkpoint": checkpoint, "feast_dir": feast_dir, "host": host, "port": port, "device": device,
             "max_batch": max_batch, "max_wait_ms": max_wait_ms, "torch_threads": torch_threads,
             "max_candidates": max_candidates, "candidate_chunk": candidate_chunk,
             "max_body_bytes": max_body_bytes, "body_timeout_s": body_timeout_s,
             "duplicate_candidates": duplicate_candidates, "kv_storage": kv_storage,
             "window_hop": window_hop, "batching": batching, "rank_route": rank_route,
             "trace": trace, "scoring": scoring, "malloc": malloc,
             "stage_two": stage_two}
    run_service(ServingSettings(**{k: v for k, v in flags.items() if v is not None}))
