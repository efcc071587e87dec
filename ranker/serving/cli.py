"""`climber serve` (also `python -m ranker.serving.http`): flags -> ServingSettings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    max_wait_ms: Optional[float] = typer.Option(None),
    torch_threads: Optional[int] = typer.Option(None, "--threads", help="torch intra-op threads (default 1; 0: "
                                                "torch's default, one per core)"),
) -> None:
    """The ranking service over HTTP: POST /rank, GET /health, GET /metrics.

    Flags left out come from the environment (ServingSettings), then the defaults."""
    from ranker.serving.http import serve as run_service
    from ranker.serving.service import ServingSettings

    flags = {"checkpoint": checkpoint, "feast_dir": feast_dir, "host": host, "port": port, "device": device,
             "max_batch": max_batch, "max_wait_ms": max_wait_ms, "torch_threads": torch_threads}
    run_service(ServingSettings(**{k: v for k, v in flags.items() if v is not None}))
