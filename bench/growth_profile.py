"""Where a training step's time goes, dense against sliced grow-and-prune: by phase, and the
forward by part of the model, each marked prunable or not.

    climber bench growth-profile --db runs/<id>/sandbox.duckdb [--size m --steps 60 --density 0.5]

The same loop as `ranker.training.train` (same batches, same lookups into the track table,
the same clip and fused AdamW), run step by step with the CPU time of each phase taken
around it. Steady sparse steps only: the first update step's widening and the update
steps themselves (full-size, masked) are left out, so "sliced" is the step a sparse phase
repeats. Forward parts are timed by wrapping the model's methods for the run (restored
after); the backward is timed whole. Why: `bench growth` says how much a run saves; this
says which part of a step no density reaches.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console
from rich.table import Table

from bench.common import save
from ranker.models import build_model
from ranker.models.astro import AstroModel, BlockFusion
from ranker.models.embedding import TokenEmbedding
from ranker.models.hstu import HSTULayer
from ranker.models.layers import TaskHeads
from ranker.training.data import DAY_MS, iterate_batches, load_request_log, split_by_time
from ranker.training.growth import GrowPrune, GrowthConfig
from ranker.training.step_cost import TrackGradient, clip_gradients
from ranker.training.train import adamw, config_overrides, learning_rate, masked_bce_sum

# (class, method, label, prunable): the forward's parts. HSTU's projections and attention
# shrink with the heads kept; the norm before them, the embeddings, the gate and the
# output's norm/dropout/residual do not. `finish` holds f2 (prunable) and the rest (not).
PARTS: tuple[tuple[type, str, str, str], ...] = (
    (TokenEmbedding, "history", "history tokens: lookups, dropout", "no"),
    (HSTULayer, "project_kv", "history K/V: norm, f1, SiLU", "not norm"),
    (TokenEmbedding, "candidates", "candidate tokens", "no"),
    (AstroModel, "temperatures", "temperature table", "no"),
    (HSTULayer, "project", "candidates: norm, f1, SiLU", "not norm"),
    (HSTULayer, "attention", "pointwise attention", "yes"),
    (HSTULayer, "self_attention", "candidate self-attention", "yes"),
    (HSTULayer, "finish", "output: norm, *U, f2, dropout", "f2 only"),
    (BlockFusion, "forward", "block fusion gate", "no"),
    (TaskHeads, "forward", "task heads", "hidden"),
)
REST = "rest: blocks, gather, buckets, loss"
PHASES = ("batch", "narrow/widen", "forward", "backward", "clip", "AdamW", "grow back")


def _wrapped(method: Callable, label: str, totals: dict[str, float]) -> Callable:
    @functools.wraps(method)
    def timed(*args, **kwargs):
        started = time.process_time()
        try:
            return method(*args, **kwargs)
        finally:
            totals[label] += time.process_time() - started
    return timed


def profile_steps(db_path: Path, variant: str, family: str = "astro", size: str = "m", steps: int = 60,
                  batch_size: int = 64, max_len: int = 64, growth: GrowthConfig | None = None,
                  threads: int = 1) -> dict[str, Any]:
    """CPU ms per steady step by phase and by forward part, for `variant` "dense" or "sliced"."""
    if family != "astro":
        raise ValueError("the forward's parts are ASTRO's (pointwise blocks): use --family astro")
    if variant not in ("dense", "sliced"):
        raise ValueError(f"variant must be dense or sliced, got {variant!r}")
    torch.set_num_threads(threads)
    log = split_by_time(load_request_log(db_path), DAY_MS).train
    torch.manual_seed(0)
    model = build_model(family, size, log.n_tracks, **config_overrides(max_len, None))
    optimizer = adamw(model.parameters(), 1e-3, 0.0, torch.device("cpu"))
    growth = growth or GrowthConfig()
    grow = GrowPrune(model, growth, steps, optimizer) if variant == "sliced" else None
    if grow is not None:
        grow.start(0)
    track = TrackGradient(model)
    model.train()
    batches = [rows for rows in iterate_batches(len(log), batch_size, shuffle=True, seed=0, epoch=0)][:steps]
    if len(batches) < steps:
        raise ValueError(f"the log has {len(batches)} batches of {batch_size}, fewer than {steps} steps")
    first_counted = growth.update_every + 2  # after the first update and the step that narrows again
    phases: dict[str, float] = defaultdict(float)
    parts: dict[str, float] = defaultdict(float)
    step_parts: dict[str, float] = defaultdict(float)
    saved = [(cls, name, getattr(cls, name)) for cls, name, *_ in PARTS]
    counted = 0
    try:
        for cls, name, label, _ in PARTS:
            setattr(cls, name, _wrapped(getattr(cls, name), label, step_parts))
        for step, rows in enumerate(batches):
            step_parts.clear()
            keep = step >= first_counted and (grow is None or not grow._is_update(step)) and \
                (grow is None or step < grow.dense_step)
            marks = [time.process_time()]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, 1e-3, min(100, steps // 10 + 1))
            count = int(log.candidate_count[rows].sum())
            batch = log.batch(rows, max_len)
            marks.append(time.process_time())
            if grow is not None:
                grow.prepare(step)
            marks.append(time.process_time())
            loss = masked_bce_sum(model(batch), batch) / count
            marks.append(time.process_time())
            optimizer.zero_grad(set_to_none=True)
            track.attach()
            loss.backward()
            marks.append(time.process_time())
            if grow is not None:
                grow.before_step(step)
            clip_gradients(model.parameters(), 1.0)
            marks.append(time.process_time())
            optimizer.step()
            marks.append(time.process_time())
            if grow is not None:
                grow.after_step(step + 1)
            marks.append(time.process_time())
            if keep:
                counted += 1
                for phase, start, end in zip(PHASES, marks, marks[1:]):
                    phases[phase] += end - start
                for label, seconds in step_parts.items():
                    parts[label] += seconds
                parts[REST] += (marks[3] - marks[2]) - sum(step_parts.values())
    finally:
        for cls, name, method in saved:
            setattr(cls, name, method)
        track.close()
    if counted == 0:
        raise ValueError(f"no steady step to count in {steps} steps: give more --steps")
    return {"variant": variant, "steps_counted": counted,
            "phase_ms": {k: 1e3 * v / counted for k, v in phases.items()},
            "forward_part_ms": {k: 1e3 * v / counted for k, v in parts.items()}}


def run_bench_growth_profile(db_path: Path, family: str = "astro", size: str = "m", steps: int = 60,
                             batch_size: int = 64, max_len: int = 64, growth: GrowthConfig | None = None,
                             threads: int = 1, rounds: int = 2, result_name: str = "growth-profile") -> dict:
    """Dense and sliced in turns, `rounds` times; each figure is the lower of its rounds
    (the box's load only adds). Prints the two tables and writes bench/results/NAME.json."""
    growth = growth or GrowthConfig()
    runs: dict[str, list[dict]] = {"dense": [], "sliced": []}
    for _ in range(rounds):
        for variant in runs:
            runs[variant].append(profile_steps(db_path, variant, family, size, steps, batch_size, max_len, growth, threads))
    best = {variant: {key: {k: min(r[key][k] for r in found) for k in found[0][key]}
                      for key in ("phase_ms", "forward_part_ms")} for variant, found in runs.items()}
    console = Console()
    for key, title, kinds in (("phase_ms", "step phases", None), ("forward_part_ms", "forward by part", PARTS)):
        table = Table(title=f"{family}-{size}, {title}: CPU ms per steady step, lower of {rounds}; "
                            f"sliced at density {growth.density}")
        for column in ("part", "prunable", "dense", "sliced", "ratio"):
            table.add_column(column, justify="left" if column in ("part", "prunable") else "right")
        prunable = {label: kind for _, _, label, kind in (kinds or ())}
        names = list(best["dense"][key])
        for name in names + ["total"]:
            dense = sum(best["dense"][key].values()) if name == "total" else best["dense"][key][name]
            sliced = sum(best["sliced"][key].values()) if name == "total" else best["sliced"][key].get(name, 0.0)
            table.add_row(name, prunable.get(name, "" if kinds is None or name == "total" else "no"),
                          f"{dense:.2f}", f"{sliced:.2f}", f"{sliced / dense:.2f}" if dense else "-")
        console.print(table)
    figures = {"config": {"db": str(db_path), "family": family, "size": size, "steps": steps, "batch_size": batch_size,
                          "max_len": max_len, "growth": growth.to_dict(), "threads": threads, "rounds": rounds},
               "torch": torch.__version__, "runs": runs, "best": best,
               "prunable": {label: kind for _, _, label, kind in PARTS}}
    console.print("ratio: sliced / dense. Totals are sums of the lowest figures, not one run's. Steady steps: "
                  "update steps and the steps that widen or narrow are left out; the backward is timed whole.")
    console.print(f"written {save(result_name, figures)}")
    return figures
