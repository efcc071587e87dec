"""The per-user KV cache's economics (`climber bench cache`): what fits, and what a miss costs.

3. The cache in the closed loop: an experiment run (experiments/examples/model_sizes.yaml by
   default), whose record keeps every neural arm's cache lookups (user, outcome, the entry's
   bytes: the kv_cache_lookups table) under a budget that evicted nothing. An LRU replay of
   that log gives the hit, extend and rebuild rates at any budget, from 1% to 100% of the
   working set (every user's entry kept): with an entry present a lookup has the outcome it
   had in the run, without one it is a rebuild.
4. Storage precision: K/V at rest in fp32, bf16 and int8 (per-row scale), bytes per user and
   the score error against fp32 over M = 200 candidates (max abs, Kendall tau of the
   ranking), on the run's trained models and on an untrained size-l model at n = 1024.

    climber bench cache [--set sim.n_users=500 ...]    # bench/results/cache.json, cache_budget.png
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.serve_common import N_TRACKS, console, random_sequence
from ranker.serving.cache import UserKVCache, _token_bytes
from ranker.serving.kv_storage import STORAGES

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "experiments" / "examples" / "model_sizes.yaml"
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
OUTCOMES = ("hit", "incremental", "rebuild")


@dataclass
class Lookup:
    user: int
    outcome: str  # one of OUTCOMES, as served in the run
    nbytes: int  # the entry's bytes after the lookup


def replay_lru(log: list[Lookup], budget: float) -> dict:
    """The cache's outcomes at `budget` bytes (LRU, an entry over the budget never stored).

    Entry sizes are those logged in the unbounded run: an entry rebuilt after an eviction
    gets fresh headroom where the logged one grew by extension, so the replay differs from
    a real cache at that budget by up to ~3% of lookups (tests/test_cache_economics.py)."""
    lru: OrderedDict[int, int] = OrderedDict()
    total, counts, evictions = 0, dict.fromkeys(OUTCOMES, 0), 0
    for lookup in log:
        present = lookup.user in lru
        counts[lookup.outcome if present else "rebuild"] += 1
        total -= lru.pop(lookup.user, 0)
        if lookup.nbytes <= budget:
            lru[lookup.user] = lookup.nbytes
            total += lookup.nbytes
        while total > budget:
            _, dropped = lru.popitem(last=False)
            total -= dropped
            evictions += 1
    n = max(len(log), 1)
    return {**{f"{k}_rate": v / n for k, v in counts.items()}, "evictions": evictions}


def working_set(log: list[Lookup]) -> tuple[int, int]:
    """(bytes with every user's latest entry kept, users)."""
    latest = {lookup.user: lookup.nbytes for lookup in log}
    return sum(latest.values()), len(latest)


def experiment_run(spec_file: Path, overrides: list[str], out: Path) -> Path:
    """The experiment as `climber experiment run` runs it, in a subprocess (bench sits beside
    experiments in the layering, not above it); returns the run folder."""
    command = [sys.executable, "-m", "sandbox.cli", "experiment", "run", str(spec_file), "--out", str(out),
               *[arg for o in overrides for arg in ("--set", o)]]
    subprocess.run(command, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    (run_dir,) = [p.parent for p in out.glob("*/sandbox.duckdb")]
    return run_dir


def read_lookups(run_dir: Path) -> dict[str, dict]:
    """Per neural arm: its model, the cache's counters and its lookup log (kv_cache_lookups)."""
    import duckdb

    con = duckdb.connect(str(run_dir / "sandbox.duckdb"), read_only=True)
    try:
        counters = con.execute("SELECT * FROM kv_cache ORDER BY arm").df()
        models = con.execute("SELECT arm, family, size FROM arm_models").df().set_index("arm")
        rows = con.execute("SELECT arm, user_id, outcome, bytes FROM kv_cache_lookups ORDER BY arm, seq").fetchall()
    finally:
        con.close()
    arms = {}
    for record in counters.to_dict("records"):
        arm = record["arm"]
        if record["evictions"]:  # the log then holds budget-limited outcomes, not the unbounded ones
            raise RuntimeError(f"{arm}: the run's cache evicted {record['evictions']} entries at "
                               f"{record['budget_bytes']:,} bytes; rerun with a larger cache budget")
        arms[arm] = {"model": f"{models.loc[arm, 'family']}-{models.loc[arm, 'size']}", "counters": record,
                     "log": [Lookup(int(u), o, int(b)) for a, u, o, b in rows if a == arm]}
    return arms


def closed_loop_figures(arms_in: dict[str, dict], fractions=FRACTIONS) -> dict:
    arms = {}
    for arm, a in arms_in.items():
        log = a["log"]
        total, users = working_set(log)
        arms[arm] = {"model": a["model"], "lookups": len(log), "users": users, "working_set_bytes": total,
                     # a user's first lookup is a rebuild at any budget; the other rebuilds
                     # with no budget are windows that slid (or changed) since the last one
                     "first_lookup_rate": users / max(len(log), 1),
                     "bytes_per_user": total / max(users, 1),
                     "unbounded": replay_lru(log, float("inf")),
                     "curve": [{"fraction": f, "budget_bytes": f * total, **replay_lru(log, f * total)}
                               for f in fractions]}
    return arms


# ----------------------------------------------------------------------------- the hop window's quality

def window_quality(run_dir: Path, arms: list[str], hop: int) -> list[dict]:
    """Each trained arm's full-play GAUC on the A/B phase's impressions (after its training
    log ended) with the hop window against the sliding one: same checkpoint, same impressions."""
    import json

    from ranker.batch import TASKS
    from ranker.training.checkpoint import load_checkpoint
    from ranker.training.metrics import paired_gauc_difference
    from ranker.training.train import predict

    from ranker.training.data import after_training_log

    max_len = json.loads((run_dir / "experiment.json").read_text())["phases"]["train"]["max_len"]
    log, labels, users = after_training_log(run_dir)
    starts = {h: log.history_window(np.arange(len(log)), max_len, h)[0] for h in (1, hop)}
    lengths = log.history_end - starts[hop]
    rows = []
    for arm in arms:
        model, _ = load_checkpoint(run_dir / "checkpoints" / arm)
        with torch.inference_mode():
            logits = {h: predict(model, log, max_len, hop=h)[0][:, TASKS.index("full_play")] for h in (1, hop)}
        rows.append({"arm": arm, "hop": hop, "max_len": max_len, "requests": len(log), "impressions": len(labels),
                     "windows_differ": float(np.mean(starts[1] != starts[hop])),
                     "mean_window": float(lengths.mean()),
                     **paired_gauc_difference(labels, logits[1], logits[hop], users)})
    return rows


# ----------------------------------------------------------------------------- 4. storage precision

def precision_rows(model, label: str, n: int, users: int = 20, M: int = 200) -> list[dict]:
    """Per storage: bytes per user (entry bytes at rest) and the score error against fp32."""
    from scipy.stats import kendalltau

    from ranker.serving.cache import history_batch

    model = model.eval()
    rng = np.random.default_rng(11)
    n_tracks = model.config.n_tracks
    seqs = []
    for u in range(users):
        s = random_sequence(n, seed=200 + u)
        s.track_ids[:] = rng.integers(0, n_tracks, n)
        seqs.append(s)
    scores: dict[str, list[torch.Tensor]] = {kind: [] for kind in STORAGES}
    nbytes: dict[str, list[int]] = {kind: [] for kind in STORAGES}
    with torch.inference_mode():
        for u, seq in enumerate(seqs):
            batch = history_batch([seq], n_tracks)
            candidates = torch.from_numpy(rng.choice(n_tracks, M, replace=False) + 1)[None]
            batch.candidate_tracks, batch.candidate_mask = candidates, torch.ones(1, M, dtype=torch.bool)
            batch.scenario, batch.request_ts = torch.tensor([0]), batch.history_ts[:, -1] + 60_000
            for kind in STORAGES:
                cache = UserKVCache(model, "bench", budget_bytes=2**40, kv_storage=kind)
                (history,) = cache.histories([u], [seq])
                scores[kind].append(model.score(model.score_candidates(history, batch))[0])
                nbytes[kind].append(cache.nbytes - _token_bytes(seq))
    rows = []
    for kind in STORAGES:
        gaps = [float((a - b).abs().max()) for a, b in zip(scores[kind], scores["fp32"])]
        taus = [kendalltau(a.numpy(), b.numpy()).statistic for a, b in zip(scores[kind], scores["fp32"])]
        spread = float(np.mean([float(s.max() - s.min()) for s in scores["fp32"]]))
        rows.append({"model": label, "n": n, "M": M, "users": users, "storage": kind,
                     "kv_bytes_per_user": float(np.mean(nbytes[kind])),
                     "bytes_vs_fp32": float(np.mean(nbytes[kind]) / np.mean(nbytes["fp32"])),
                     "max_abs_score_error": max(gaps), "score_spread_fp32": spread,
                     "kendall_tau_min": float(min(taus)), "kendall_tau_mean": float(np.mean(taus))})
    return rows


def storage_figures(run_dir: Path | None, arms: list[str], long_n: int, long_size: str) -> list[dict]:
    from ranker.models import build_model
    from ranker.training.checkpoint import load_checkpoint

    rows = []
    for arm in arms:
        if run_dir is None:
            break
        model, meta = load_checkpoint(run_dir / "checkpoints" / arm)
        rows += precision_rows(model, f"{arm} (trained)", model.config.max_len)
    torch.manual_seed(0)
    untrained = build_model("astro", long_size, N_TRACKS, dropout=0.0, max_len=long_n)
    rows += precision_rows(untrained, f"astro-{long_size} (untrained)", long_n, users=5)
    return rows


# ----------------------------------------------------------------------------- report

def plot_budget(loops: dict[int, dict], path: Path) -> None:
    """Served without a rebuild (hit + extend) against the byte budget, per arm and window hop."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    styles = ["--", "-", ":", "-."]
    for i, (hop, arms) in enumerate(loops.items()):
        for j, (arm, a) in enumerate(arms.items()):
            xs = [100 * p["fraction"] for p in a["curve"]]
            ax.plot(xs, [p["hit_rate"] + p["incremental_rate"] for p in a["curve"]], styles[i % len(styles)],
                    color=f"C{j}", marker="o", markersize=3, label=f"{arm}, hop {hop}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}%"))
    ax.set_xlabel("byte budget, % of the working set (every user's entry)")
    ax.set_ylabel("share of lookups served without a rebuild")
    top = max(p["hit_rate"] + p["incremental_rate"] for arms in loops.values() for a in arms.values() for p in a["curve"])
    ax.set_ylim(0, min(1.0, max(0.05, 1.15 * top)))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, handlelength=3.5, title="window hop 1 = sliding", title_fontsize=7)
    ax.set_title("KV cache in the closed loop: hits + extensions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _budget_curve(loops: dict[int, dict], percent_sign: str) -> list[str]:
    """The rebuild rate against the byte budget, one row per (arm, hop); both tables show it
    (the terminal's without the % in its header, to fit 80 columns)."""
    first_arms = next(iter(loops.values()), {})
    if not first_arms:
        return []
    fr = [p["fraction"] for p in next(iter(first_arms.values()))["curve"]]
    lines = ["", "Rebuild rate (%) against the byte budget (% of each arm's working set):", "",
             "| arm | hop | " + " | ".join(f"{100 * f:g}{percent_sign}" for f in fr) + " |",
             "|---|---|" + "---|" * len(fr)]
    for hop, arms in loops.items():
        for arm, a in arms.items():
            lines.append(f"| {arm} | {hop} | " + " | ".join(f"{100 * p['rebuild_rate']:.1f}" for p in a["curve"]) + " |")
    return lines


def markdown(loops: dict[int, dict], quality: list[dict], storage: list[dict]) -> str:
    """The closed loop per window hop (1 = sliding), the hop window's offline quality, storage."""
    lines = ["| arm | hop | lookups | users | bytes/user | hit | extend | rebuild (first / since) |",
             "|---|---|---|---|---|---|---|---|"]
    for hop, arms in loops.items():
        for arm, a in arms.items():
            u, first = a["unbounded"], a["users"] / max(a["lookups"], 1)
            lines.append(f"| {arm} | {hop} | {a['lookups']:,} | {a['users']:,} | {a['bytes_per_user'] / 1024:.1f} KiB | "
                         f"{u['hit_rate']:.1%} | {u['incremental_rate']:.1%} | {u['rebuild_rate']:.1%} "
                         f"({first:.1%} / {u['rebuild_rate'] - first:.1%}) |")
    lines += _budget_curve(loops, percent_sign="%")
    if quality:
        lines += ["", f"Full-play GAUC, hop window vs sliding: the same checkpoint on the same "
                  f"{quality[0]['requests']:,} A/B requests (95% CIs over users; the difference's paired):", "",
                  "| arm | hop | differ | window | sliding | hop | difference [95% CI] |",
                  "|---|---|---|---|---|---|---|"]
        for q in quality:
            low, high = q["difference_ci95"]
            lines.append(f"| {q['arm']} | {q['hop']} | {q['windows_differ']:.0%} | {q['mean_window']:.1f} | "
                         f"{q['gauc_base']:.4f}±{q['base_ci95_halfwidth']:.4f} | {q['gauc_other']:.4f} | "
                         f"{q['difference']:+.4f} [{low:+.4f}, {high:+.4f}] |")
    lines += ["", "| model | n | storage | K/V bytes/user | vs fp32 | max abs score error (fp32 spread) | "
              "Kendall tau min / mean |", "|---|---|---|---|---|---|---|"]
    for r in storage:
        lines.append(f"| {r['model']} | {r['n']} | {r['storage']} | {r['kv_bytes_per_user'] / 1024:,.1f} KiB | "
                     f"{r['bytes_vs_fp32']:.2f} | {r['max_abs_score_error']:.1e} ({r['score_spread_fp32']:.2f}) | "
                     f"{r['kendall_tau_min']:.4f} / {r['kendall_tau_mean']:.4f} |")
    return "\n".join(lines)


def terminal_tables(loops: dict[int, dict], quality: list[dict], storage: list[dict]) -> str:
    """The same figures as `markdown`, in tables that fit 80 columns (the terminal's); the
    JSON and docs/results.md keep the fuller tables."""
    lines = ["Closed loop per served window hop (1: sliding); rates of lookups, first: first", "lookups "
             "(rebuilds that no cache avoids).", "",
             "| arm | hop | lookups | users | KiB/user | hit | extend | rebuild | first |",
             "|---|---|---|---|---|---|---|---|---|"]
    for hop, arms in loops.items():
        for arm, a in arms.items():
            u = a["unbounded"]
            lines.append(f"| {arm} | {hop} | {a['lookups']:,} | {a['users']:,} | {a['bytes_per_user'] / 1024:,.1f} | "
                         f"{u['hit_rate']:.1%} | {u['incremental_rate']:.1%} | {u['rebuild_rate']:.1%} | "
                         f"{a['users'] / max(a['lookups'], 1):.1%} |")
    lines += _budget_curve(loops, percent_sign="")
    if quality:
        lines += ["", f"Full-play GAUC on {quality[0]['requests']:,} A/B requests, hop window vs sliding",
                  "(differ: share of windows that differ; CI paired, over users):", "",
                  "| arm | hop | differ | window | sliding | hop | difference [95% CI] |", "|---|---|---|---|---|---|---|"]
        for q in quality:
            low, high = q["difference_ci95"]
            lines.append(f"| {q['arm']} | {q['hop']} | {q['windows_differ']:.0%} | {q['mean_window']:.1f} | "
                         f"{q['gauc_base']:.4f} | {q['gauc_other']:.4f} | {q['difference']:+.4f} "
                         f"[{low:+.4f}, {high:+.4f}] |")
    lines += ["", "K/V storage: bytes per user and the score error against fp32 (max abs; Kendall", "tau of the "
              "ranking, min / mean):", "", "| model | n | storage | KiB/user | vs fp32 | max abs | tau min/mean |",
              "|---|---|---|---|---|---|---|"]
    for r in storage:
        lines.append(f"| {r['model'].replace(' (', ', ').rstrip(')')} | {r['n']} | {r['storage']} | "
                     f"{r['kv_bytes_per_user'] / 1024:,.1f} | {r['bytes_vs_fp32']:.2f} | {r['max_abs_score_error']:.1e} "
                     f"| {r['kendall_tau_min']:.4f}/{r['kendall_tau_mean']:.4f} |")
    return "\n".join(lines)


@dataclass
class CacheBench:
    spec_file: Path = DEFAULT_SPEC
    overrides: list[str] = field(default_factory=list)
    long_n: int = 1024
    long_size: str = "l"
    save_as: str | None = "cache"
    hops: tuple[int, ...] = (1,)  # served window hops, one experiment run each (1: sliding)


def run_bench_cache(cfg: CacheBench) -> dict:
    from bench.common import RESULTS_DIR, save

    started = time.time()
    loops: dict[int, dict] = {}
    quality: list[dict] = []
    storage: list[dict] = []
    steps = len(cfg.hops) + 1
    for i, hop in enumerate(cfg.hops):
        overrides = [*cfg.overrides, f"serving.window_hop={hop}"]
        with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
            console.print(f"bench cache: {i + 1}/{steps} experiment run {cfg.spec_file.name} {' '.join(overrides)}")
            run_dir = experiment_run(cfg.spec_file, overrides, Path(tmp))
            loops[hop] = closed_loop_figures(read_lookups(run_dir))
            if hop > 1:
                quality += window_quality(run_dir, list(loops[hop]), hop)
            if i == 0:
                console.print(f"bench cache: {steps}/{steps} storage precision")
                storage = storage_figures(run_dir, list(loops[hop]), cfg.long_n, cfg.long_size)
    figures = {"spec": str(cfg.spec_file.relative_to(REPO)) if cfg.spec_file.is_relative_to(REPO) else str(cfg.spec_file),
               "overrides": cfg.overrides, "hops": list(cfg.hops), "closed_loop": {str(h): a for h, a in loops.items()},
               "window_quality": quality, "storage": storage, "wall_seconds": time.time() - started}
    figures["markdown"] = markdown(loops, quality, storage)
    console.print(terminal_tables(loops, quality, storage), soft_wrap=True)
    if cfg.save_as:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        plot_budget(loops, RESULTS_DIR / f"{cfg.save_as}_budget.png")
        console.print(f"written {save(cfg.save_as, figures)}")
    return figures
