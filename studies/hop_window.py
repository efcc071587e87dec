"""Does the hop window (ranker.window) cost quality, and does training on it win that back?

On an experiment run's folder (`climber experiment run ... --out DIR`): per ASTRO size,
train on its warm-up log (the experiment's budget: one epoch, batch 64, lr 1e-3, max_len 64,
the last 6 h held out) three times: seed 0 on sliding windows, seed 1 on sliding windows
(what a training seed moves), seed 0 on hop windows. Then full-play GAUC on the run's A/B
impressions (after the training log), each paired against seed 0 on sliding windows, with a
bootstrap over users: another seed; seed 0 served hop windows; the hop-trained model served
hop windows.

    climber hop-window-study --run DIR --hop 16 --sizes xs s m     # DIR/hop_window_16.json
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ranker.training.checkpoint import load_checkpoint
from ranker.training.data import DAY_MS, after_training_log
from ranker.training.metrics import paired_gauc_difference
from ranker.training.train import TrainConfig, predict, train

COMPARISONS = {"seed 1, sliding": "another seed, sliding", "seed 0 on hop windows": "the same model on hop windows",
               "trained on hop windows": "trained on hop windows, served on them"}


def run_hop_window(run_dir: Path, hop: int, sizes: list[str], max_len: int = 64, eval_days: float = 0.25) -> dict:
    log, labels, users = after_training_log(run_dir)
    out: dict = {"run": str(run_dir), "hop": hop, "max_len": max_len, "requests": len(log), "sizes": {}}
    for size in sizes:
        scores = {}
        for name, seed, h in (("seed 0, sliding", 0, 1), ("seed 1, sliding", 1, 1), ("trained on hop windows", 0, hop)):
            config = TrainConfig("astro", size, run_dir / "warm_up.duckdb", run_dir / f"hop-study-{size}-{seed}-{h}",
                                 epochs=1, batch_size=64, lr=1e-3, seed=seed, device="cpu", max_len=max_len,
                                 eval_window_ms=int(eval_days * DAY_MS), checkpoint_every=0, window_hop=h)
            model, _ = load_checkpoint(train(config, progress=False).checkpoint)
            with torch.inference_mode():
                scores[name] = predict(model, log, max_len, hop=h)[0][:, 0]  # full_play is TASKS[0]
                if h == 1 and seed == 0:
                    scores["seed 0 on hop windows"] = predict(model, log, max_len, hop=hop)[0][:, 0]
        base = scores["seed 0, sliding"]
        out["sizes"][size] = {k: paired_gauc_difference(labels, base, scores[k], users) for k in COMPARISONS}
    out["markdown"] = markdown(out)
    (run_dir / f"hop_window_{hop}.json").write_text(json.dumps(out, indent=1))
    print(out["markdown"])
    return out


def markdown(out: dict) -> str:
    lines = ["| size | " + " | ".join(COMPARISONS.values()) + " |", "|---|" + "---|" * len(COMPARISONS)]
    for size, rows in out["sizes"].items():
        cells = [f"{r['difference']:+.4f} [{r['difference_ci95'][0]:+.4f}, {r['difference_ci95'][1]:+.4f}]"
                 for r in (rows[k] for k in COMPARISONS)]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
