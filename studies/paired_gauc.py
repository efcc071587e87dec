"""Full-play GAUC of trained checkpoints on one time window, each paired against a baseline.

The comparison issue 24 asks for at long histories (ASTRO against HSTU at max_len 1,024)
and the way to choose between variants honestly: train with `climber train --test-window-h
48 --eval-window-h 24` (the last 48 h unseen, chosen on the 24 h before them), compare the
variants here on that validation window, then train the chosen one on the full split
(`--eval-window-h 48`) and compare on the test window. Every checkpoint is scored on the
same impressions; each one is paired with the baseline of its own training seed (or the
first baseline when none has it), with a bootstrap over users
(`ranker.training.metrics.paired_gauc_difference`).

    climber paired-gauc --db DB --eval-window-h 48 --base runs/hstu-s0 runs/hstu-s1 \\
        --other runs/astro-s0 runs/astro-s1                         # test window
    climber paired-gauc --db DB --eval-window-h 24 --test-window-h 48 --base ... --other ...
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ranker.batch import TASKS
from ranker.training.checkpoint import load_checkpoint
from ranker.training.data import load_request_log, split_by_time
from ranker.training.metrics import gauc, group_aucs, paired_gauc_difference
from ranker.training.train import predict

HOUR_MS = 3_600_000


def window_log(db: Path, eval_window_h: float, test_window_h: float = 0.0):
    """The eval split `climber train` builds with these two flags (test window dropped first)."""
    log = load_request_log(db)
    if test_window_h:
        log = split_by_time(log, int(test_window_h * HOUR_MS)).train
    return split_by_time(log, int(eval_window_h * HOUR_MS)).eval


def describe(meta: dict) -> str:
    overrides = {k: v for k, v in (meta.get("model_overrides") or {}).items() if k != "max_len"}
    extra = " ".join(f"{k}={v}" for k, v in overrides.items())
    return f"{meta['family']}-{meta['size']}" + (f" {extra}" if extra else "")


def compare(db: Path, bases: list[Path], others: list[Path], eval_window_h: float, test_window_h: float = 0.0,
            max_len: int | None = None, resamples: int = 2000) -> dict:
    """GAUC of every checkpoint, and each `other` minus its seed's base (95% bootstrap CI)."""
    log = window_log(db, eval_window_h, test_window_h)
    rows = np.arange(len(log))
    labels = log.labels[log.impression_rows(rows)][:, TASKS.index("full_play")].astype(np.float64)
    users = log.user_id[np.repeat(rows, log.candidate_count)]
    scored: dict[str, dict] = {}
    for path in [*bases, *others]:
        model, meta = load_checkpoint(path)
        with torch.inference_mode():
            logits, _ = predict(model, log, max_len or meta["max_len"])
        score = logits[:, TASKS.index("full_play")]
        scored[str(path)] = {"model": describe(meta), "seed": meta.get("seed"), "score": score,
                             "gauc": float(gauc(labels, score, users))}
    base_of = {scored[str(b)]["seed"]: str(b) for b in reversed(bases)}
    out: dict = {"db": str(db), "eval_window_h": eval_window_h, "test_window_h": test_window_h,
                 "requests": len(log), "users": int(len(np.unique(log.user_id))),
                 "window_ms": [int(log.request_ts.min()), int(log.request_ts.max())],
                 "checkpoints": {p: {k: v for k, v in s.items() if k != "score"} for p, s in scored.items()},
                 "pairs": []}
    for path in map(str, others):
        base = base_of.get(scored[path]["seed"], str(bases[0]))
        diff = paired_gauc_difference(labels, scored[base]["score"], scored[path]["score"], users, resamples)
        out["pairs"].append({"other": path, "base": base, **diff})
    out["pooled"] = {}
    for model in dict.fromkeys(scored[str(p)]["model"] for p in others):
        pairs = [(scored[p["base"]]["score"], scored[p["other"]]["score"]) for p in out["pairs"]
                 if scored[p["other"]]["model"] == model]
        if len(pairs) > 1:
            out["pooled"][model] = pooled_difference(labels, users, pairs, resamples)
    out["markdown"] = markdown(out)
    return out


def pooled_difference(labels: np.ndarray, users: np.ndarray, pairs: list[tuple[np.ndarray, np.ndarray]],
                      resamples: int = 2000, seed: int = 0) -> dict:
    """GAUC difference averaged over (base, other) seed pairs, with a 95% interval from one
    bootstrap over users: each user's AUC difference is first averaged over the pairs, so the
    interval holds both the users' spread and (through the averaging) the seeds' agreement."""
    per_pair = []
    for base, other in pairs:
        _, a, weights = group_aucs(labels, base, users)
        _, b, _ = group_aucs(labels, other, users)  # the same users: validity depends on labels only
        per_pair.append(b - a)
    diff = np.mean(per_pair, axis=0)  # [users]
    picks = np.random.default_rng(seed).integers(0, len(diff), (resamples, len(diff)))
    w = weights[picks]
    boot = (diff[picks] * w).sum(1) / w.sum(1)
    return {"difference": float(np.average(diff, weights=weights)), "seeds": len(pairs),
            "difference_ci95": np.quantile(boot, [0.025, 0.975]).tolist(), "users": int(len(diff))}


def markdown(out: dict) -> str:
    lines = ["| checkpoint | model | seed | full-play GAUC | minus its base [95% CI] |", "|---|---|---:|---:|---|"]
    pair_of = {p["other"]: p for p in out["pairs"]}
    for path, c in out["checkpoints"].items():
        p = pair_of.get(path)
        diff = "base" if p is None else (f"{p['difference']:+.4f} [{p['difference_ci95'][0]:+.4f}, "
                                         f"{p['difference_ci95'][1]:+.4f}] vs {Path(p['base']).name}")
        lines.append(f"| {Path(path).name} | {c['model']} | {c['seed']} | {c['gauc']:.4f} | {diff} |")
    means = [f"{model}: {p['difference']:+.4f} [{p['difference_ci95'][0]:+.4f}, {p['difference_ci95'][1]:+.4f}] "
             f"averaged over {p['seeds']} seed pairs" for model, p in out.get("pooled", {}).items()]
    lines += [""] * bool(means) + means
    return "\n".join(lines)


def run_paired_gauc(db: Path, bases: list[Path], others: list[Path], eval_window_h: float,
                    test_window_h: float = 0.0, max_len: int | None = None, json_out: Path | None = None) -> dict:
    out = compare(db, bases, others, eval_window_h, test_window_h, max_len)
    print(f"{out['requests']:,} requests from {out['users']} users "
          f"({eval_window_h:g} h window{f', the last {test_window_h:g} h left out' if test_window_h else ''})")
    print(out["markdown"])
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(out, indent=1))
    return out
