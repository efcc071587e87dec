"""Training wall time: dense against masked and sliced growth and pruning, side by side.

Three variants of the same run (same data order, same steps): `dense` (plain training),
`masked` (grow-and-prune through full-size masked matmuls, the reference path) and `sliced`
(grow-and-prune on the active units' weights only). Each repeat runs the three in turn, so
load drifts hit them alike, and the best repeat is kept. The FLOP counter is off in the timed
runs (its hook costs time); one extra, untimed, run per variant counts the Linear FLOPs.

    climber bench growth --db runs/<id>/sandbox.duckdb [--family astro --size m --steps 100 --repeats 3]

`sliced-floor` (on unless --no-floor) runs the sliced schedule with one unit per group: what
is left is the part of the step no density reaches (embeddings, dropout, the blocks' gather,
the unpruned layers, the dense phase and the optimizer over what stays full-size).

`--track-gradient` picks the track table's gradient path (ranker.training.step_cost):
`sparse` (the reference and the trainer's default) or `rows` (the option); `both` times
`rows` as dense and sliced and adds `dense-sparse` and `sliced-sparse` (the reference path)
to the same rounds, the two paths side by side.
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from bench.common import save
from ranker.training.data import DAY_MS, TimeSplit, load_request_log, split_by_time
from ranker.training.growth import GrowthConfig
from ranker.training.train import TrainConfig, train

VARIANTS = ("dense", "masked", "sliced")
FLOOR = "sliced-floor"  # sliced with one unit per group: the part of the step pruning cannot reach
REFERENCE_TRACK = "-sparse"  # suffix: the variant with the track table's reference gradient path
TRACK_GRADIENT_CHOICES = ("rows", "sparse", "both")


def variant_config(base: TrainConfig, name: str, growth: GrowthConfig) -> TrainConfig:
    if name.endswith(REFERENCE_TRACK):
        return replace(variant_config(base, name.removesuffix(REFERENCE_TRACK), growth), track_gradient="sparse")
    if name == "dense":
        return replace(base, growth=None)
    if name == FLOOR:
        return replace(base, growth=replace(growth, implementation="sliced", density=1e-6))
    return replace(base, growth=replace(growth, implementation=name))


def run_bench_growth(db_path: Path, family: str, size: str, steps: int, repeats: int, batch_size: int,
                     max_len: int, overrides: dict[str, Any] | None = None,
                     growth: GrowthConfig | None = None, floor: bool = True, threads: int = 1,
                     masked: bool = True, result_name: str = "growth", track_gradient: str = "sparse") -> dict:
    """`masked=False` leaves out the reference variant (it costs what dense does; schedule
    sweeps time dense against sliced only); `result_name`: bench/results/NAME.json;
    `track_gradient`: "rows", "sparse" or "both" (see the module's docstring)."""
    if track_gradient not in TRACK_GRADIENT_CHOICES:
        raise ValueError(f"track_gradient must be one of {TRACK_GRADIENT_CHOICES}, got {track_gradient!r}")
    growth = growth or GrowthConfig()
    torch.set_num_threads(threads)
    variants = tuple(v for v in VARIANTS if masked or v != "masked") + ((FLOOR,) if floor else ())
    if track_gradient == "both":
        variants += ("dense" + REFERENCE_TRACK, "sliced" + REFERENCE_TRACK)
    data = split_by_time(load_request_log(db_path), DAY_MS)
    data = TimeSplit(data.train, data.eval.select(np.arange(min(256, len(data.eval)))), data.cutoff_ts)  # eval untimed
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    flops: dict[str, dict[str, float]] = {}
    console = Console()
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console, transient=True) as bar:
        base = TrainConfig(family, size, None, tmp, steps=steps, batch_size=batch_size, max_len=max_len, device="cpu",
                           checkpoint_every=0, model_overrides=overrides, count_linear_flops=False,
                           track_gradient="sparse" if track_gradient == "sparse" else "rows")
        task = bar.add_task("bench growth", total=len(variants) * (repeats + 1))
        for repeat in range(repeats):
            for name in variants:
                config = replace(variant_config(base, name, growth), out_dir=Path(tmp) / f"{name}-{repeat}")
                result = train(config, data=data, progress=False)
                seconds[name].append(result.train_seconds)
                cpu[name].append(result.train_cpu_seconds)
                bar.advance(task)
        for name in variants:  # untimed: the counter's hook runs in these only
            if name.endswith(REFERENCE_TRACK):  # the same FLOPs as its variant
                bar.advance(task)
                continue
            config = replace(variant_config(base, name, growth), out_dir=Path(tmp) / f"{name}-flops",
                             count_linear_flops=True)
            flops[name] = train(config, data=data, progress=False).linear_flops
            bar.advance(task)
    for name in variants:
        flops.setdefault(name, flops.get(name.removesuffix(REFERENCE_TRACK), {}))
    best = {name: min(times) for name, times in seconds.items()}
    best_cpu = {name: min(times) for name, times in cpu.items()}
    dense_flops = flops["dense"]["linear_flops_done"]
    figures = {"config": {"db": str(db_path), "family": family, "size": size, "steps": steps, "repeats": repeats,
                          "batch_size": batch_size, "max_len": max_len, "growth": growth.to_dict(),
                          "overrides": overrides or {}, "threads": threads,
                          "track_gradient": track_gradient},
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "run_seconds": seconds, "best_run_seconds": best,
               "run_cpu_seconds": cpu, "best_run_cpu_seconds": best_cpu,
               "best_ms_per_step": {name: 1e3 * best[name] / steps for name in variants},
               "vs_dense": {name: best[name] / best["dense"] for name in variants},
               "cpu_vs_dense": {name: best_cpu[name] / best_cpu["dense"] for name in variants},
               "round_vs_dense": {name: [t / d for t, d in zip(seconds[name], seconds["dense"])] for name in variants},
               "linear_flops": flops,
               "linear_flops_vs_dense": {name: flops[name]["linear_flops_done"] / dense_flops for name in variants}}
    if track_gradient == "both":  # the reference path's own sliced/dense ratio, in the same rounds
        figures["reference_track_cpu_sliced_vs_dense"] = best_cpu["sliced" + REFERENCE_TRACK] / best_cpu["dense" + REFERENCE_TRACK]
    table = Table(title=f"bench growth: {family}-{size}, {steps} steps of {batch_size}, best of {repeats}; "
                        f"against dense; density {growth.density}, dense from {growth.dense_from}")
    for column in ("variant", "ms/step", "wall", "wall, rounds", "CPU", "Linear FLOPs"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in variants:
        rounds = figures["round_vs_dense"][name]
        table.add_row(name, f"{figures['best_ms_per_step'][name]:.1f}", f"{figures['vs_dense'][name]:.3f}",
                      f"{min(rounds):.2f}-{max(rounds):.2f}", f"{figures['cpu_vs_dense'][name]:.3f}",
                      f"{figures['linear_flops_vs_dense'][name]:.3f}")
    console.print(table)
    console.print("Best run of each variant (wall, and CPU time of the process); rounds: each round's wall time "
                  "against that round's dense run. Linear FLOPs of the training forwards, counted in separate, "
                  "untimed runs. The training loop, batching included, evaluation not.")
    if floor:
        console.print(f"{FLOOR}: one unit per group, the rest of the schedule unchanged: no density reaches below it.")
    if track_gradient == "both":
        console.print(f"-sparse: the track table's reference gradient path (sparse rows, whole buffer zeroed); "
                      f"sliced{REFERENCE_TRACK} against dense{REFERENCE_TRACK}, CPU: "
                      f"{figures['reference_track_cpu_sliced_vs_dense']:.3f}")
    console.print(f"written {save(result_name, figures)}")
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m bench.growth`: the `climber bench growth` command."""
    from bench.cli import bench_growth_app
    from sandbox.cli_options import run_command

    return run_command(bench_growth_app, argv, "python -m bench.growth")


if __name__ == "__main__":
    main()
