"""What one batch of the server's scoring costs, by batch size: `climber bench batch-cost`.

`NeuralRanker.rank_timed` in process (the work the server's batching task does per batch:
feature read, cache lookups and stacking, stage two, responses), warm cache, at each batch
size, with stage two's "fast" and "reference" paths called in turns. A batch's cost is
fixed + B x per-request; the least-squares line through the medians splits the two, per
stage. Why it matters: under an open loop at half the ceiling the server forms batches of
about 3, so the fixed cost decides how close that load is to the server's own capacity.
Wall time and the process's CPU time of every call (CPU is less disturbed by other jobs on
a shared box); the two paths alternate which goes first, and malloc's thresholds are fixed
as the server fixes them (ranker.serving.malloc), so neither pays for the other's pages.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.serve_common import N_TRACKS, service_files

STAGES = ("features", "cache", "model", "other")


def measure(size: str = "s", n: int = 256, M: int = 200, users: int = 200, batches: tuple[int, ...] = (1, 2, 3, 4, 8, 16),
            paths: tuple[str, ...] = ("reference", "fast"), turns: int = 30, threads: int = 1, progress=None) -> dict:
    """The benchmark's own set-up (bench.serve_common.service_files: a Feast store of `users`
    random n-event histories, an untrained ASTRO checkpoint) timed by `time_batches`."""
    from features.store import FeatureStoreClient
    from ranker.interface import RankRequest
    from ranker.serving.malloc import keep_freed_pages
    from ranker.serving.ranker import NeuralRanker

    malloc = keep_freed_pages()  # as the server does at start (ServingSettings.malloc "keep")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-batch-cost-") as tmp:
            model_dir, feast_dir = service_files(Path(tmp), users, n, size)
            ranker = NeuralRanker.from_checkpoint(model_dir, FeatureStoreClient(feast_dir), device="cpu")
            rng = np.random.default_rng(5)
            scenarios = ("home_feed", "daily_mix", "radio")
            # Users spread over the store, as the load's random users are.
            requests = [RankRequest(request_id=i, user_id=(7 * i) % users, scenario=scenarios[i % 3],
                                    candidates=rng.integers(0, N_TRACKS, M), ts=1_800_000_000_000)
                        for i in range(max(batches))]
            timed = time_batches(ranker, requests, batches, paths, turns, progress)
    finally:
        torch.set_num_threads(previous)
    return {"size": size, "n": n, "M": M, "users": users, "threads": threads, "turns": turns,
            "malloc_thresholds_fixed": malloc.applied, **timed}


def time_batches(ranker, requests: list, batches: tuple[int, ...], paths: tuple[str, ...] = ("reference", "fast"),
                 turns: int = 30, progress=None) -> dict:
    """`ranker.rank_timed(requests[:b])` for every batch size b and stage-two path, in turns
    (each path first every other turn; turn 0 warms up and is dropped), every history cached
    first. Per (path, batch): median and best wall ms per call, median CPU ms, median stage ms;
    and each path's fixed and per-request costs (`split_fixed`)."""
    ranker.rank(requests[:max(batches)])
    calls: dict[tuple[str, int], list[tuple[float, float, dict]]] = {(p, b): [] for p in paths for b in batches}
    for turn in range(turns + 1):
        for b in batches:
            for path in (paths if turn % 2 else paths[::-1]):
                ranker.stage_two = path
                cpu, wall = time.process_time(), time.perf_counter()
                _, stages = ranker.rank_timed(requests[:b])
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if turn:
                    calls[path, b].append((wall, cpu, stages))
        if progress is not None:
            progress()
    rows = []
    for (path, b), runs in calls.items():
        wall = np.array([r[0] for r in runs]) * 1e3
        stage = {s: 1e3 * float(np.median([r[2][s] for r in runs])) for s in STAGES[:3]}
        stage["other"] = float(np.median(wall - 1e3 * np.array([sum(r[2].values()) for r in runs])))
        rows.append({"path": path, "batch": b, "wall_ms": float(np.median(wall)), "best_wall_ms": float(wall.min()),
                     "cpu_ms": 1e3 * float(np.median([r[1] for r in runs])), "stage_ms": stage})
    return {"rows": rows, "fits": {path: split_fixed(rows, path) for path in paths}}


def split_fixed(rows: list[dict], path: str) -> dict:
    """Least-squares fixed (ms per batch) and per-request (ms) cost of one path, for the
    median wall, the median CPU and each stage's median."""
    mine = [r for r in rows if r["path"] == path]
    B = np.array([r["batch"] for r in mine], float)

    def fit(values) -> dict:
        slope, intercept = np.polyfit(B, np.array(values, float), 1)
        return {"fixed_ms": float(intercept), "per_request_ms": float(slope)}

    out = {"wall": fit([r["wall_ms"] for r in mine]), "cpu": fit([r["cpu_ms"] for r in mine])}
    out.update({stage: fit([r["stage_ms"][stage] for r in mine]) for stage in STAGES})
    return out


def table(result: dict) -> list[str]:
    """Terminal/markdown lines (under 80 columns): ms per request by batch (median wall /
    median CPU, and the wall ratio of the first path to the last), then the fits."""
    paths = list(result["fits"])
    by = {(r["path"], r["batch"]): r for r in result["rows"]}
    batches = sorted({r["batch"] for r in result["rows"]})
    lines = ["| batch | " + " | ".join(f"{p}: wall / CPU" for p in paths) + f" | {paths[0]} / {paths[-1]} |",
             "|---:|" + "---|" * len(paths) + "---:|"]
    for b in batches:
        cells = [f"{by[p, b]['wall_ms'] / b:.3f} / {by[p, b]['cpu_ms'] / b:.3f}" for p in paths]
        ratio = by[paths[0], b]["wall_ms"] / by[paths[-1], b]["wall_ms"]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    lines += ["", "| path | cost | " + " | ".join(("wall", "CPU", *STAGES)) + " |", "|---|---|" + "---:|" * (2 + len(STAGES))]
    for p in paths:
        fit = result["fits"][p]
        for part, label in (("fixed_ms", "fixed/batch"), ("per_request_ms", "per request")):
            lines.append(f"| {p} | {label} | " + " | ".join(f"{fit[k][part]:.3f}" for k in ("wall", "cpu", *STAGES)) + " |")
    return lines


def run_bench_batch_cost(size: str = "s", n: int = 256, M: int = 200, users: int = 200,
                         batches: tuple[int, ...] = (1, 2, 3, 4, 8, 16), turns: int = 30, threads: int = 1,
                         save_as: str | None = "batch_cost") -> dict:
    from rich.progress import Progress

    from bench.common import save
    from bench.serve_common import console

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("turns", total=turns + 1)
        result = measure(size, n, M, users, batches, turns=turns, threads=threads, progress=lambda: bar.advance(task))
    console.print(f"astro-{size}, n={n}, M={M}, {threads} torch thread(s), in process, warm cache; medians of "
                  f"{turns} calls per (path, batch), the paths in turns; ms per request, then the line fixed + "
                  f"B x per request through the medians", highlight=False)
    for line in table(result):
        console.print(line, highlight=False, markup=False)
    if save_as:
        console.print(f"saved {save(save_as, result)}", highlight=False)
    return result
