"""`climber worker` (also `python -m streaming.worker`, how `spawn_worker` starts one)."""

from __future__ import annotations

from typing import Literal, Optional

import typer

worker_app = typer.Typer(add_completion=False)


@worker_app.command("worker")
def worker(
    settings: Optional[str] = typer.Option(None, help="StreamSettings as JSON; otherwise from the environment"),
    role: Literal["all", "sequences", "tracks"] = typer.Option(
        "all", help="both agents, or one (see streaming.faust_app.create_app)"),
    loglevel: Literal["crit", "error", "warn", "info", "debug"] = typer.Option("info"),
) -> None:
    """A Faust worker (sequence_builder + track_stats) until SIGINT/SIGTERM."""
    from streaming.settings import StreamSettings
    from streaming.worker import run_worker

    stream = StreamSettings.model_validate_json(settings) if settings else StreamSettings()
    run_worker(stream, role, loglevel)
