"""Training wall time: dense against masked and sliced growth and pruning, side by side.

Three variants of the same run (same data order, same steps): `dense` (plain training),
`masked` (grow-and-prune through full-size masked matmuls, the reference path) and `sliced`
(grow-and-prune on the active units' weights only). Each repeat runs the three in turn, so
load drifts hit them alike, and the best repeat is kept. The FLOP counter is off in the timed
runs (its hook costs time); one extra, untimed, run per variant counts the Linear FLOPs.

    climber bench growth --db runs/<id>/sandbox.duckdb [--family astro --size m --steps 100 --repeats 3]
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.common import save
from ranker.training.data import DAY_MS, TimeSplit, load_request_log, split_by_time
from ranker.training.growth import GrowthConfig
from ranker.training.train import TrainConfig, train

VARIANTS = ("dense", "masked", "sliced")


def variant_config(base: TrainConfig, name: str, growth: GrowthConfig) -> TrainConfig:
    if name == "dense":
        return replace(base, growth=None)
    return replace(base, growth=replace(growth, implementation=name))


def run_bench_growth(db_path: Path, family: str, size: str, steps: int, repeats: int, batch_size: int,
                     max_len: int, overrides: dict[str, Any] | None = None,
                     growth: GrowthConfig | None = None) -> dict:
    growth = growth or GrowthConfig()
    data = split_by_time(load_request_log(db_path), DAY_MS)
    data = TimeSplit(data.train, data.eval.select(np.arange(min(256, len(data.eval)))), data.cutoff_ts)  # eval untimed
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    flops: dict[str, dict[str, float]] = {}
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as bar:
        base = TrainConfig(family, size, None, tmp, steps=steps, batch_size=batch_size, max_len=max_len, device="cpu",
                           checkpoint_every=0, model_overrides=overrides, count_linear_flops=False)
        task = bar.add_task("bench growth", total=len(VARIANTS) * (repeats + 1))
        for repeat in range(repeats):
            for name in VARIANTS:
                config = replace(variant_config(base, name, growth), out_dir=Path(tmp) / f"{name}-{repeat}")
                seconds[name].append(train(config, data=data, progress=False).train_seconds)
                bar.advance(task)
        for name in VARIANTS:  # untimed: the counter's hook runs in these only
            config = replace(variant_config(base, name, growth), out_dir=Path(tmp) / f"{name}-flops",
                             count_linear_flops=True)
            flops[name] = train(config, data=data, progress=False).linear_flops
            bar.advance(task)
    best = {name: min(times) for name, times in seconds.items()}
    dense_flops = flops["dense"]["linear_flops_done"]
    figures = {"config": {"db": str(db_path), "family": family, "size": size, "steps": steps, "repeats": repeats,
                          "batch_size": batch_size, "max_len": max_len, "growth": growth.to_dict(),
                          "overrides": overrides or {}},
               "run_seconds": seconds, "best_run_seconds": best,
               "best_ms_per_step": {name: 1e3 * best[name] / steps for name in VARIANTS},
               "vs_dense": {name: best[name] / best["dense"] for name in VARIANTS},
               "linear_flops": flops,
               "linear_flops_vs_dense": {name: flops[name]["linear_flops_done"] / dense_flops for name in VARIANTS}}
    table = Table(title=f"bench growth: {family}-{size}, {steps} steps of {batch_size}, best of {repeats}")
    for column in ("variant", "s/run", "ms/step", "all runs (s)", "time vs dense", "FLOPs vs dense"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in VARIANTS:
        table.add_row(name, f"{best[name]:.1f}", f"{figures['best_ms_per_step'][name]:.1f}",
                      " / ".join(f"{t:.1f}" for t in seconds[name]), f"{figures['vs_dense'][name]:.3f}",
                      f"{figures['linear_flops_vs_dense'][name]:.3f}")
    console.print(table)
    console.print("Linear FLOPs of the training forwards (counted in separate, untimed runs); "
                  "wall time is the training loop, batching included, evaluation not.")
    console.print(f"written {save('growth', figures)}")
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m bench.growth`: the `climber bench growth` command."""
    from bench.cli import bench_growth_app
    from sandbox.cli_options import run_command

    return run_command(bench_growth_app, argv, "python -m bench.growth")


if __name__ == "__main__":
    main()
