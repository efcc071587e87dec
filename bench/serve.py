"""TURBO serving benchmarks: every figure a ratio of two paths timed side by side in one run.

1. Batched SUMI scoring vs per-pair scoring (one forward per user-candidate pair, pairs
   batched), candidates/s at n in {128, 512}, M in {16, 128, 512}: cold (history encoded in
   the same call) and warm (history K/V cached, stage two only).
2. Incremental update of one new event vs a full re-encode at n = 512, for the model step
   alone (extend_history vs encode_history) and through the cache (lookup included).
3. Multi-scale partitioning Nb = 4 vs Nb = 1 at n = 2048: history attention and encode, for
   each block attention kind (two layers per stack: one layer has no history attention).
4. The HTTP service (uvicorn in a subprocess, bench/load.py) under 32 concurrent closed-loop
   clients, one client, and an open loop (Poisson arrivals below saturation), driven by the
   lean load generator of bench/service_load.py: latency p50/p99, requests/s, CPU per request of
   server and load generator; and the ceiling the scoring work alone allows.

    python -m bench.serve [--quick]       # written to bench/results/serve.json

Timings are best-of-N with the two sides of each ratio called in turns (see best_seconds);
the model is an untrained ASTRO (weights do not change cost), CPU serving configuration.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from rich.table import Table

from bench.common import save
from bench.load import bench_service, service_markdown
from bench.serve_common import (N_TRACKS, best_seconds, console, prefix, random_sequence, repeat_rows,  # noqa: F401
                                serving_model)
from ranker.batch import RankBatch, random_batch
from ranker.serving.cache import HistoryBuffer, UserKVCache, history_batch
from ranker.models.astro import BLOCK_ATTENTIONS, AstroConfig
from ranker.models.hstu import relative_buckets
from ranker.serving.incremental import extend_history

FOUR_GROUPS = (("full_play", "like"), ("play",), ("skip", "dislike"), ("share", "add_to_playlist"))


# ----------------------------------------------------------------------------- 1. SUMI vs per pair

def bench_sumi(size: str, ns: tuple[int, ...], ms: tuple[int, ...], pair_chunk: int = 64,
               overrides: dict | None = None) -> list[dict]:
    model = serving_model(size, max(ns), **(overrides or {}))
    rows = []
    with torch.inference_mode():
        for n in ns:
            for M in ms:
                batch = random_batch(1, n, M, N_TRACKS, seed=n + M, min_length=n)
                cache = model.encode_history(batch)
                # Pairs are batched `pair_chunk` at a time; every full chunk costs the same (one
                # history, one candidate each), so one full chunk is timed and counted M // chunk times.
                full_chunks, rest = divmod(M, pair_chunk)
                pairs = {rows: repeat_rows(batch, rows) for rows in {pair_chunk * bool(full_chunks), rest} if rows}

                def warm_with(kind: str) -> Callable[[], object]:
                    def run():
                        model.set_candidate_attention(kind)
                        return model.score_candidates(cache, batch)
                    return run

                t = best_seconds({"cold": lambda: model(batch), "warm_sdpa": warm_with("sdpa"),
                                  "warm_split": warm_with("split"),
                                  **{f"pairs_{rows}": (lambda b=b: model(b)) for rows, b in pairs.items()}},
                                 min_seconds=3.0, min_reps=5)
                model.set_candidate_attention("split")  # the CPU serving choice
                cold, warm = t["cold"], t["warm_split"]
                kinds = {"sdpa": t["warm_sdpa"], "split": t["warm_split"]}
                per_pair = full_chunks * t.get(f"pairs_{pair_chunk}", 0.0) + (t[f"pairs_{rest}"] if rest else 0.0)
                rows.append({
                    "n": n, "M": M, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3, "per_pair_ms": per_pair * 1e3,
                    "warm_sdpa_ms": kinds["sdpa"] * 1e3, "warm_split_ms": kinds["split"] * 1e3,
                    "cold_candidates_per_s": M / cold, "warm_candidates_per_s": M / warm,
                    "per_pair_candidates_per_s": M / per_pair,
                    "cold_speedup": per_pair / cold, "warm_speedup": per_pair / warm,
                    # What the arithmetic allows (analytic FLOPs; SDPA's M x M block counted as computed):
                    "cold_flop_ratio": M * model.flops_per_request(n, 1) / model.flops_per_request(n, M),
                    "warm_flop_ratio": M * model.flops_per_request(n, 1)
                    / (model.flops_per_request(n, M) - model.flops_per_request(n, 0)),
                })
                console.print(f"  sumi n={n} M={M}: cold {rows[-1]['cold_speedup']:.0f}x, warm {rows[-1]['warm_speedup']:.0f}x")
    return rows


# ----------------------------------------------------------------------------- 2. incremental vs full

def bench_incremental(size: str, n: int, reps: int = 500, overrides: dict | None = None) -> dict:
    model = serving_model(size, n, **(overrides or {}))
    seq = random_sequence(n, seed=1)
    before, after = prefix(seq, n - 1), seq
    with torch.inference_mode():
        full_batch = history_batch([after], N_TRACKS)
        encoded_before = model.encode_history(history_batch([before], N_TRACKS))
        # Fresh buffers (the cached prefix) made up front, so only the update itself is timed.
        buffers = [HistoryBuffer(encoded_before, 0, max_len=n) for _ in range(reps + 1)]
        t = best_seconds({"full": lambda: model.encode_history(full_batch),
                          "extend": lambda: extend_history(model, buffers.pop(), full_batch)},
                         min_seconds=0.0, min_reps=reps, max_reps=reps)
        # Through the cache (window compare, tensors from numpy, extend or rebuild, view),
        # the two in turns, set-up untimed.
        cache = UserKVCache(model, "bench", budget_bytes=2**30)
        rebuild, incremental = [], []
        for _ in range(max(reps // 10, 20)):
            cache.clear()
            start = time.perf_counter()
            cache.histories([1], [after])
            rebuild.append(time.perf_counter() - start)
            cache.clear()
            cache.histories([1], [before])
            start = time.perf_counter()
            cache.histories([1], [after])
            incremental.append(time.perf_counter() - start)
    full, step_s, rebuild_s, cache_s = t["full"], t["extend"], min(rebuild), min(incremental)
    return {"n": n, "full_encode_ms": full * 1e3, "extend_one_ms": step_s * 1e3, "model_speedup": full / step_s,
            "cache_rebuild_ms": rebuild_s * 1e3, "cache_incremental_ms": cache_s * 1e3,
            "cache_speedup": rebuild_s / cache_s}


# ----------------------------------------------------------------------------- 3. Nb = 4 vs Nb = 1

PARTITION_LAYERS = 2  # a one-layer stack has no history attention (its last layer is K/V only)


def history_attention(model, batch: RankBatch) -> tuple[Callable[[], None], list[int]]:
    """The history attention encode_history runs (n_layers - 1 layers per block) on the
    real block lengths of `batch`, with each block stack's own attention: causal SDPA for
    softmax stacks, SiLU(alpha q.k + rab) / N with the relative bias for pointwise (HSTU)
    stacks. Projections and FFNs are left out: attention is what partitioning divides."""
    blocks = model.encode_history(batch).blocks
    cfg = model.config
    calls = []
    for stack, block in zip(model.stacks, blocks):
        width = block.keys[0].shape[2]
        q, k, v = torch.randn(3, 1, cfg.n_heads, width, cfg.d_head)
        if cfg.block_attention == "pointwise":
            buckets = relative_buckets(block.positions, block.timestamps, block.positions, block.timestamps,
                                       stack.n_buckets)
            calls += [lambda layer=layer, q=q, k=k, v=v, b=buckets: layer.attention(q, k, v, b)
                      for layer in stack.layers[:-1]]
        else:
            calls += [lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                      for _ in stack.layers[:-1]]

    def attend() -> None:
        for call in calls:
            call()

    return attend, [block.keys[0].shape[2] for block in blocks]


def bench_partition(size: str, n: int, overrides: dict | None = None) -> dict:
    """Nb = 4 (behaviour groups) vs Nb = 1 for each block attention kind, two layers per
    stack; the headline figure is the default kind's. `overrides` apply to both models
    except the fields this comparison sets (partition, groups, layers, block attention)."""
    batch = random_batch(1, n, 1, N_TRACKS, seed=3, min_length=n)
    result: dict = {"n": n, "n_layers": PARTITION_LAYERS, "kinds": {}}
    for kind in BLOCK_ATTENTIONS:
        common = {**(overrides or {}), "n_layers": PARTITION_LAYERS, "block_attention": kind}
        four = serving_model(size, n, **{**common, "partition": "behaviour", "behaviour_groups": FOUR_GROUPS})
        one = serving_model(size, n, **{**common, "partition": "none"})
        with torch.inference_mode():
            attend_four, widths = history_attention(four, batch)
            attend_one, _ = history_attention(one, batch)
            t = best_seconds({"attention_four": attend_four, "attention_one": attend_one,
                              "encode_four": lambda: four.encode_history(batch),
                              "encode_one": lambda: one.encode_history(batch)},
                             min_seconds=3.0, min_reps=10)
        result["kinds"][kind] = {
            "block_lengths": widths, "attention_nb4_ms": t["attention_four"] * 1e3,
            "attention_nb1_ms": t["attention_one"] * 1e3, "attention_speedup": t["attention_one"] / t["attention_four"],
            "flops_ratio": n**2 / sum(w * w for w in widths), "encode_nb4_ms": t["encode_four"] * 1e3,
            "encode_nb1_ms": t["encode_one"] * 1e3, "encode_speedup": t["encode_one"] / t["encode_four"]}
    default = AstroConfig(n_tracks=1).block_attention
    return {**result, "default_kind": default, **result["kinds"][default]}


# ----------------------------------------------------------------------------- report

GOALS = {"cold": 50, "warm": 200, "incremental": 30, "partition": 3, "p99_ms": 20}


def markdown(figures: dict) -> str:
    lines = ["### TURBO serving (`climber bench serve`)", "",
             f"Machine: {figures['machine_note']}. Command: `{figures['command']}`.", "",
             "Batched SUMI scoring vs per-pair scoring (candidates/s ratio; goal at n=512, M=128: cold >= 50x, warm >= 200x):",
             "", "| n | M | cold ms | warm ms | per-pair ms | cold x (FLOP ratio) | warm x (FLOP ratio) | warm sdpa / split ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in figures["sumi"]:
        lines.append(f"| {r['n']} | {r['M']} | {r['cold_ms']:.2f} | {r['warm_ms']:.2f} | {r['per_pair_ms']:.1f} | "
                     f"{r['cold_speedup']:.0f}x ({r['cold_flop_ratio']:.0f}) | {r['warm_speedup']:.0f}x "
                     f"({r['warm_flop_ratio']:.0f}) | {r['warm_sdpa_ms']:.2f} / {r['warm_split_ms']:.2f} |")
    inc, part, svc = figures["incremental"], figures["partition"], figures["service"]
    lines += ["", f"Incremental update of one event vs full re-encode, n={inc['n']} (goal >= 30x): model step "
              f"{inc['extend_one_ms']:.3f} ms vs {inc['full_encode_ms']:.2f} ms = **{inc['model_speedup']:.1f}x**; "
              f"through the cache {inc['cache_incremental_ms']:.3f} ms vs {inc['cache_rebuild_ms']:.2f} ms = "
              f"{inc['cache_speedup']:.1f}x.", "",
              f"Partitioning Nb=4 vs Nb=1 at n={part['n']}, {part['n_layers']} layers per stack (goal attention >= 3x; "
              f"headline: the default kind, {part['default_kind']}):", "",
              "| block attention | Nb=4 ms | Nb=1 ms | attention x | FLOP ratio | whole encode x |", "|---|---|---|---|---|---|",
              *[f"| {kind} | {r['attention_nb4_ms']:.1f} | {r['attention_nb1_ms']:.1f} | **{r['attention_speedup']:.1f}x** | "
                f"{r['flops_ratio']:.2f} (blocks {r['block_lengths']}) | {r['encode_speedup']:.1f}x |"
                for kind, r in part["kinds"].items()], "",
              *service_markdown(svc, GOALS["p99_ms"])]
    return "\n".join(lines)


def run_bench_serve(quick: bool = False, size: str = "s", threads: int | None = None,
                    service_seconds: float = 15.0, service_users: int = 200, overrides: dict | None = None) -> dict:
    """All four benchmarks; `quick` shrinks sizes for a smoke run (not for reported figures).
    `overrides` (`--set`) change the ASTRO config of every model, so a frozen config can pin
    the defaults its figures were measured on."""
    overrides = dict(overrides or {})
    if threads:
        torch.set_num_threads(threads)
    ns, ms = ((64, 128), (16, 64)) if quick else ((128, 512), (16, 128, 512))
    started = time.time()
    console.print("bench serve: 1/4 SUMI vs per-pair")
    sumi = bench_sumi(size, ns, ms, overrides=overrides)
    console.print("bench serve: 2/4 incremental update")
    incremental = bench_incremental(size, 128 if quick else 512, overrides=overrides)
    console.print("bench serve: 3/4 partitioning")
    partition = bench_partition(size, 256 if quick else 2048, overrides)
    console.print("bench serve: 4/4 HTTP service")
    service = bench_service(size, 64 if quick else 256, 50 if quick else 200, 32,
                            3.0 if quick else service_seconds, 50 if quick else service_users, threads,
                            open_seconds=2.0 if quick else 10.0, overrides=overrides)
    load = os.getloadavg()
    figures = {
        "quick": quick, "size": size, "overrides": overrides, "torch_threads": torch.get_num_threads(),
        "load_average_at_end": load, "wall_seconds": time.time() - started,
        "machine_note": f"{os.cpu_count()} CPU cores, torch {torch.__version__}, torch threads: {torch.get_num_threads()}, "
                        f"load average {load[0]:.1f} at the end (other jobs shared the cores)",
        "command": "python -m bench.serve" + (" --quick" if quick else "") + (f" --threads {threads}" if threads else "")
                   + "".join(f" --set '{k}={json.dumps(v)}'" for k, v in overrides.items()),
        "goals": GOALS, "sumi": sumi, "incremental": incremental, "partition": partition, "service": service,
    }
    figures["markdown"] = markdown(figures)
    table = Table(title="bench serve (ratios measured side by side)")
    for column in ("figure", "measured", "goal"):
        table.add_column(column)
    headline = next((r for r in sumi if (r["n"], r["M"]) == (512, 128)), sumi[-1])
    table.add_row(f"SUMI cold n={headline['n']} M={headline['M']}", f"{headline['cold_speedup']:.0f}x", ">= 50x")
    table.add_row(f"SUMI warm n={headline['n']} M={headline['M']}", f"{headline['warm_speedup']:.0f}x", ">= 200x")
    table.add_row(f"incremental vs full, n={incremental['n']}", f"{incremental['model_speedup']:.1f}x", ">= 30x")
    table.add_row(f"attention Nb=4 vs Nb=1, n={partition['n']} ({partition['default_kind']})", f"{partition['attention_speedup']:.1f}x", ">= 3x")
    table.add_row(f"service p99, {service['clients']} clients", f"{service['loaded']['p99_ms']:.1f} ms", "<= 20 ms")
    console.print(table)
    console.print(figures["markdown"])
    console.print(f"written {save('serve', figures)}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    """`python -m bench.serve`: the `climber bench serve` command."""
    from bench.cli import bench_serve_app
    from sandbox.cli_options import run_command

    return run_command(bench_serve_app, argv, "python -m bench.serve")


if __name__ == "__main__":
    main()
