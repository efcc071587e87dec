"""Training time per step: dense against alternate growth and pruning, side by side.

Masked growth and pruning (ranker.training.growth) runs the full matmuls, so it is not expected to
be faster here; this measures what it costs instead: the masks' bookkeeping and the FLOP
counter's hook. Three variants, interleaved `repeats` times so load drifts hit them alike:
`dense` (plain training), `dense+counter` (the hook alone) and `grow-prune`.

    python -m bench.growth --db runs/<id>/sandbox.duckdb [--family astro --size s --steps 100]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import save
from ranker.training.data import DAY_MS, load_request_log, split_by_time
from ranker.training.growth import GrowthConfig
from ranker.training.train import TrainConfig, train

VARIANTS = {"dense": dict(), "dense+counter": dict(count_linear_flops=True), "grow-prune": dict(growth=GrowthConfig())}


def run_bench_growth(db_path: Path, family: str, size: str, steps: int, repeats: int, batch_size: int,
                     max_len: int, overrides: dict[str, Any] | None = None) -> dict:
    data = split_by_time(load_request_log(db_path), DAY_MS)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    shares: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for name, extra in VARIANTS.items():
                result = train(TrainConfig(family, size, None, Path(tmp) / f"{name}-{repeat}", steps=steps,
                                           batch_size=batch_size, max_len=max_len, device="cpu",
                                           checkpoint_every=0, eval_batch_size=256, model_overrides=overrides,
                                           **extra), progress=False, data=data)
                seconds[name].append(result.train_seconds / steps)
                if result.growth is not None:
                    shares.append(result.linear_flops["linear_flops_share_done"])
    best = {name: min(times) for name, times in seconds.items()}
    figures = {"config": {"db": str(db_path), "family": family, "size": size, "steps": steps, "repeats": repeats,
                          "batch_size": batch_size, "max_len": max_len, "growth": GrowthConfig().to_dict(),
                          "overrides": overrides or {}},
               "seconds_per_step": seconds, "best_seconds_per_step": best,
               "grow_prune_vs_dense": best["grow-prune"] / best["dense"],
               "counter_vs_dense": best["dense+counter"] / best["dense"],
               "linear_flops_share_done": float(np.mean(shares))}
    table = Table(title=f"bench growth: {family}-{size}, {steps} steps of {batch_size}, best of {repeats}")
    for column in ("variant", "ms/step (best)", "ms/step (all)", "vs dense"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name in VARIANTS:
        table.add_row(name, f"{best[name] * 1e3:.1f}", " / ".join(f"{t * 1e3:.1f}" for t in seconds[name]),
                      f"{best[name] / best['dense']:.3f}")
    console = Console()
    console.print(table)
    console.print(f"grow-prune counted {figures['linear_flops_share_done']:.3f} of the dense run's Linear FLOPs")
    console.print(f"written {save('growth', figures)}")
    return figures


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m bench.growth`: the `climber bench growth` command."""
    from bench.cli import bench_growth_app
    from sandbox.cli_options import run_command

    return run_command(bench_growth_app, argv, "python -m bench.growth")


if __name__ == "__main__":
    main()
