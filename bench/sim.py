"""Simulated events/s of the embedded closed loop with the baseline rankers.

Runs the real sandbox (simulator, bus, validation, DuckDB recorder, Feast SQLite pushes,
candidate generation, ranking) into a temporary folder and reports throughput and where
the time went. Goal: >= 50,000 events/s on 2 cores.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import save
from sandbox.loop import run_sandbox
from sandbox.settings import SandboxSettings
from simulator.config import SimConfig


def run_bench_sim(users: int, tracks: int, days: float, seed: int, repeats: int = 1) -> dict:
    console = Console()
    runs = []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            settings = SandboxSettings(sim=SimConfig(n_users=users, n_tracks=tracks, days=days, seed=seed),
                                       out=Path(tmp), run_id=f"bench-{repeat}")
            result = run_sandbox(settings)
            runs.append({"events": result.events, "wall_seconds": result.wall_seconds,
                         "events_per_second": result.events_per_second, "timings": result.timings,
                         "event_log_hash": result.event_log_hash})
        # One line per repeat rather than a live bar: a refreshing bar would share the cores it measures.
        console.print(f"repeat {repeat + 1}/{repeats}: {result.events_per_second:,.0f} events/s "
                      f"in {result.wall_seconds:.1f} s")
    best = max(runs, key=lambda r: r["events_per_second"])
    rates = [r["events_per_second"] for r in runs]
    if len({r["event_log_hash"] for r in runs}) != 1:  # same seed, same log: anything else is a bug
        raise RuntimeError(f"bench sim: repeats of one seed gave different event logs: "
                           f"{sorted({r['event_log_hash'][:16] for r in runs})}")
    table = Table(title=f"bench sim: {users} users, {tracks} tracks, {days} days, seed {seed}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("events", f"{best['events']:,}")
    table.add_row("wall seconds", f"{best['wall_seconds']:.1f}")
    table.add_row("events/s (best of %d)" % repeats, f"{best['events_per_second']:,.0f}")
    if repeats > 1:  # these boxes vary by a third from minute to minute: the spread says how much
        table.add_row("events/s (median, range)",
                      f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})")
    table.add_row("goal events/s", "50,000")
    table.add_row("event log hash", best["event_log_hash"][:16])
    for name, seconds in sorted(best["timings"].items()):
        table.add_row(f"  share of time: {name}", f"{seconds / best['wall_seconds']:.0%} ({seconds:.1f} s)")
    console.print(table)
    figures = {"config": {"users": users, "tracks": tracks, "days": days, "seed": seed}, "runs": runs,
               "best_events_per_second": best["events_per_second"],
               "median_events_per_second": statistics.median(rates), "goal_events_per_second": 50_000}
    console.print(f"written {save('sim', figures)}")
    return figures
