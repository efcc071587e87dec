"""TURBO serving benchmarks: every figure a ratio of two paths timed side by side in one run.

1. Batched SUMI scoring vs per-pair scoring (one forward per user-candidate pair, pairs
   batched), candidates/s at n in {128, 512}, M in {16, 128, 512}: cold (history encoded in
   the same call) and warm (history K/V cached, stage two only).
2. Incremental update of one new event vs a full re-encode at n = 512, for the model step
   alone (extend_history vs encode_history) and through the cache (lookup included).
3. Multi-scale partitioning Nb = 4 vs Nb = 1 at n = 2048: history attention and encode, for
   each block attention kind (two layers per stack: one layer has no history attention).
4. The HTTP service (uvicorn in a subprocess) under 32 concurrent closed-loop clients, one
   client, and an open loop (Poisson arrivals below saturation), driven by the lean load
   generator of bench/service_load.py: latency p50/p99, requests/s, CPU per request of
   server and load generator; and the ceiling the scoring work alone allows.

    python -m bench.serve [--quick]       # written to bench/results/serve.json

Timings are best-of-N with the two sides of each ratio called in turns (see best_seconds);
the model is an untrained ASTRO (weights do not change cost), CPU serving configuration.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from bench.common import save
from bench.service_load import (LoadRun, closed_loop, open_loop, own_cpu_seconds, process_cpu_seconds,
                                request_bodies, run_async, summary)
from features.sequence import UserSequence
from ranker.batch import RankBatch, random_batch
from ranker.serving.cache import HistoryBuffer, UserKVCache, history_batch
from ranker.models.astro import BLOCK_ATTENTIONS, AstroConfig
from ranker.models.hstu import relative_buckets
from ranker.models import build_model
from ranker.serving.incremental import extend_history
from ranker.serving.ranker import prepare_for_serving

REPO = Path(__file__).resolve().parent.parent
N_TRACKS = 50_000
FOUR_GROUPS = (("full_play", "like"), ("play",), ("skip", "dislike"), ("share", "add_to_playlist"))
console = Console()


def best_seconds(fns: dict[str, Callable[[], object]], min_seconds: float = 0.5, min_reps: int = 5,
                 max_reps: int = 200) -> dict[str, float]:
    """Best-of-N wall time of each function, the functions called in turns.

    Side by side and in turns because the cores are shared: whatever else runs slows both
    paths of a ratio alike, and the minimum is the run least disturbed by it (as `timeit`
    advises). Each function is called once first to warm up.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    spent, reps = 0.0, 0
    while reps < min_reps or (spent < min_seconds and reps < max_reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed
        reps += 1
    return best


def serving_model(size: str, max_len: int, /, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_for_serving(build_model("astro", size, N_TRACKS, **{"dropout": 0.0, **overrides, "max_len": max_len}),
                               torch.device("cpu"))


def repeat_rows(batch: RankBatch, rows: int) -> RankBatch:
    """`rows` copies of a one-row batch's history, each with one candidate (per-pair input)."""
    pick = lambda t: t.expand(rows, *t.shape[1:]).contiguous()  # noqa: E731
    return RankBatch(
        history_tracks=pick(batch.history_tracks), history_behaviours=pick(batch.history_behaviours),
        history_scenarios=pick(batch.history_scenarios), history_ts=pick(batch.history_ts),
        history_lengths=pick(batch.history_lengths), candidate_tracks=batch.candidate_tracks[0, :rows, None],
        candidate_mask=batch.candidate_mask[0, :rows, None], scenario=pick(batch.scenario), request_ts=pick(batch.request_ts),
    )


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

def random_sequence(n: int, seed: int) -> UserSequence:
    rng = np.random.default_rng(seed)
    return UserSequence(rng.integers(0, N_TRACKS, n), rng.integers(1, 8, n).astype(np.int8),
                        rng.integers(0, 5, n).astype(np.int8),
                        1_700_000_000_000 + np.cumsum(rng.integers(1, 3_600_000, n)), n - 1)


def prefix(seq: UserSequence, n: int) -> UserSequence:
    return UserSequence(seq.track_ids[:n], seq.behaviours[:n], seq.scenarios[:n], seq.timestamps[:n], n - 1)


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


# ----------------------------------------------------------------------------- 4. the HTTP service

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            label = ",".join(f"{v}" for v in sample.labels.values() if sample.name != "climber_model_info")
            out[sample.name + (f"[{label}]" if label else "")] = sample.value
    return out


def service_ceiling(checkpoint: Path, feast_dir: Path, users: int, M: int, threads: int,
                    batches: tuple[int, ...] = (1, 4, 8, 16, 32)) -> dict:
    """What the server's scoring work allows: `NeuralRanker.rank_timed` (feature read, cache
    lookups and stacking, stage two) in this process, warm cache, best of N per batch size.

    No HTTP, no load generator, one process: an upper bound on requests/s for the server's
    torch threads, so a reader can tell an overhead from the model's own cost.
    """
    from features.store import FeatureStoreClient
    from ranker.interface import RankRequest
    from ranker.serving.ranker import NeuralRanker

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ranker = NeuralRanker.from_checkpoint(checkpoint, FeatureStoreClient(feast_dir), device="cpu")
        rng = np.random.default_rng(5)
        requests = [RankRequest(request_id=i, user_id=i % users, scenario="home_feed",
                                candidates=rng.integers(0, N_TRACKS, M), ts=1_800_000_000_000)
                    for i in range(max(batches))]
        ranker.rank(requests)  # warm: every user's history is cached, as in the loaded server
        t = best_seconds({b: (lambda b=b: ranker.rank_timed(requests[:b])) for b in batches},
                         min_seconds=3.0, min_reps=3)
    finally:
        torch.set_num_threads(previous)
    rows = [{"batch": b, "ms_per_batch": s * 1e3, "ms_per_request": s * 1e3 / b, "requests_per_s": b / s,
             "candidates_per_s": b * M / s} for b, s in t.items()]
    best = max(rows, key=lambda r: r["requests_per_s"])
    return {"threads": threads, "rows": rows, "best_requests_per_s": best["requests_per_s"],
            "best_candidates_per_s": best["candidates_per_s"], "best_batch": best["batch"]}


def measured_run(url: str, server_pid: int, load: Callable[[], LoadRun]) -> dict:
    """One load run with what it cost: latency summary, the server's batches and stage times
    (from /metrics), and CPU per request of the server process and of this process (the
    load generator)."""
    before, server_cpu, client_cpu = scrape(url), process_cpu_seconds(server_pid), own_cpu_seconds()
    run = load()
    client_cpu = own_cpu_seconds() - client_cpu
    server_cpu = None if server_cpu is None else process_cpu_seconds(server_pid) - server_cpu
    after = scrape(url)
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)  # noqa: E731
    batches, requests = delta("climber_rank_batch_size_count"), len(run.latencies)
    stages = {stage: delta(f"climber_rank_stage_seconds_sum[{stage}]") for stage in ("features", "cache", "model")}
    per_request = {f"{stage}_wall": 1e3 * seconds / requests for stage, seconds in stages.items()}
    if server_cpu is not None:
        per_request["server_cpu"] = 1e3 * server_cpu / requests
        # Everything else the server process spends: HTTP parsing, body validation, reply
        # encoding, the event loop, metrics (stage times are wall: under CPU contention this can go below 0).
        per_request["server_other_cpu"] = per_request["server_cpu"] - sum(per_request[f"{s}_wall"] for s in stages)
    per_request["load_generator_cpu"] = 1e3 * client_cpu / requests
    return {**summary(run), "mean_batch_size": delta("climber_rank_batch_size_sum") / max(batches, 1),
            "per_batch_stage_ms": {stage: 1e3 * seconds / max(batches, 1) for stage, seconds in stages.items()},
            "ms_per_request": per_request,
            "cache_lookups": {k: delta(f"climber_kv_cache_lookups_total[{k}]")
                              for k in ("hits", "incremental", "rebuilds", "cold")}}


def bench_service(size: str, n: int, M: int, clients: int, seconds: float, users: int, threads: int | None,
                  max_batch: int = 16, max_wait_ms: float = 1.0, open_fractions: tuple[float, ...] = (0.25, 0.5),
                  open_seconds: float = 10.0, overrides: dict | None = None) -> dict:
    """The HTTP service (uvicorn subprocess) under the lean load generator of bench.service_load.

    Closed loop with `clients` and with 1 client (saturation behaviour), then open loop:
    Poisson arrivals at `open_fractions` of the closed-loop throughput just measured, over
    `clients` connections (latency at a stated load below saturation).
    """
    import httpx

    from features.store import FeatureStoreClient
    from ranker.training.checkpoint import save_checkpoint

    server_threads = threads or 1
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        root = Path(tmp)
        store = FeatureStoreClient(root / "feast")
        store.apply()
        store.write_sequences({user: random_sequence(n, seed=100 + user) for user in range(users)})
        torch.manual_seed(0)
        model = build_model("astro", size, N_TRACKS, **{**(overrides or {}), "max_len": n})
        save_checkpoint(root / "model", model, torch.optim.AdamW(model.parameters()), "astro", size, 0, {})
        ceiling = service_ceiling(root / "model", root / "feast", users, M, server_threads)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(
            [sys.executable, "-m", "ranker.serving.http", "--checkpoint", str(root / "model"), "--feast-dir",
             str(root / "feast"), "--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
             "--threads", str(server_threads)],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise RuntimeError("the ranking server did not come up within 60 s")
            for user in range(users):  # fill the cache: the steady state of a warm server
                httpx.post(url + "/rank", json={"user_id": user, "scenario": "home_feed", "candidates": [1]}).raise_for_status()
            bodies = request_bodies(users, M, seed=1, n_tracks=N_TRACKS)
            closed = lambda k, s: lambda: run_async(closed_loop("127.0.0.1", port, k, s, bodies))  # noqa: E731
            loaded = measured_run(url, server.pid, closed(clients, seconds))
            single = measured_run(url, server.pid, closed(1, min(seconds, 5.0)))
            open_runs = []
            for fraction in open_fractions:
                rate = fraction * loaded["requests_per_s"]
                run = measured_run(url, server.pid, lambda rate=rate: run_async(
                    open_loop("127.0.0.1", port, rate, clients, open_seconds, bodies, seed=3)))
                open_runs.append({"fraction_of_saturation": fraction, **run})
            cache_bytes = scrape(url).get("climber_kv_cache_bytes")
        finally:
            server.terminate()
            server.wait(timeout=30)

    return {"n": n, "M": M, "size": size, "clients": clients, "users": users, "seconds": seconds,
            "open_seconds": open_seconds, "server_threads": server_threads, "max_batch": max_batch,
            "max_wait_ms": max_wait_ms,
            "load_generator": "bench.service_load: asyncio HTTP/1.1, one keep-alive connection per client, "
                              "bodies encoded up front, in the bench process on the same cores as the server",
            "loaded": loaded, "single_client": single, "open_loop": open_runs, "ceiling": ceiling,
            # kept at the top level for readers of earlier serve.json files
            "mean_batch_size": loaded["mean_batch_size"], "per_batch_stage_ms": loaded["per_batch_stage_ms"],
            "cache_lookups": loaded["cache_lookups"], "cache_bytes": cache_bytes}


def service_markdown(svc: dict, goal_p99_ms: float) -> list[str]:
    """The service figures: load table, per-request budget, the ceiling and what the goal needs."""
    need_rps = svc["clients"] / (goal_p99_ms / 1e3)
    ceiling = svc["ceiling"]
    rows = [(f"closed loop, {svc['clients']} clients", svc["loaded"]), ("closed loop, 1 client", svc["single_client"])]
    rows += [(f"open loop, Poisson {run['offered_per_s']:.0f}/s offered ({run['fraction_of_saturation']:.0%} of the "
              f"closed-loop throughput), {svc['clients']} connections", run) for run in svc["open_loop"]]
    lines = [f"Service, astro-{svc['size']}, n={svc['n']}, M={svc['M']}: uvicorn server in a subprocess (torch threads "
             f"{svc['server_threads']}, max batch {svc['max_batch']}, max wait {svc['max_wait_ms']} ms); the load "
             f"generator ({svc['load_generator']}). Goal: p99 <= {goal_p99_ms:.0f} ms at {svc['clients']} concurrent "
             "clients.", "",
             "| load | requests/s | p50 ms | p99 ms | server p50 / p99 ms | mean batch |", "|---|---|---|---|---|---|"]
    lines += [f"| {label} | {run['requests_per_s']:.0f} | {run['p50_ms']:.1f} | {run['p99_ms']:.1f} | "
              f"{run['server_p50_ms']:.1f} / {run['server_p99_ms']:.1f} | {run['mean_batch_size']:.1f} |"
              for label, run in rows]
    budget = svc["loaded"]["ms_per_request"]
    stages = (f"features {budget['features_wall']:.2f} + cache {budget['cache_wall']:.2f} + model "
              f"{budget['model_wall']:.2f} ms (wall)")
    if budget.get("server_other_cpu", -1.0) >= 0:
        lines += ["", f"Per request at {svc['clients']} clients: server process {budget['server_cpu']:.2f} ms CPU = "
                  f"{stages} + HTTP, validation, encoding, event loop {budget['server_other_cpu']:.2f}; "
                  f"load generator {budget['load_generator_cpu']:.2f} ms CPU."]
    elif "server_cpu" in budget:  # stage wall times above the process CPU: the cores were contended
        lines += ["", f"Per request at {svc['clients']} clients: server process {budget['server_cpu']:.2f} ms CPU; "
                  f"scoring stages {stages}, more than the CPU the process got (other jobs held the cores), "
                  f"so the HTTP share cannot be told apart in this run; load generator "
                  f"{budget['load_generator_cpu']:.2f} ms CPU."]
    best_rps = ceiling["best_requests_per_s"]
    per_batch = ", ".join(f"batch {r['batch']} {r['ms_per_request']:.2f} ms/request" for r in ceiling["rows"])
    lines += ["", f"Ceiling (in-process `rank_timed`, warm cache, {ceiling['threads']} torch thread(s), no HTTP): "
              f"{per_batch}; best {best_rps:.0f} requests/s = {ceiling['best_candidates_per_s']:,.0f} candidates/s "
              f"(batch {ceiling['best_batch']}). p99 <= {goal_p99_ms:.0f} ms with {svc['clients']} closed-loop clients "
              f"needs >= {need_rps:,.0f} requests/s (Little's law), {need_rps / best_rps:.1f}x this ceiling; at the "
              f"ceiling, {svc['clients']} clients wait at least {1e3 * svc['clients'] / best_rps:.0f} ms."]
    return lines


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
