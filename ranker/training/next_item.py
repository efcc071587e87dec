"""The next-item objective: a user's history predicts the next consumed item, at every position.

As SASRec and HSTU train: the history runs once through the model (`sequence_output`,
causal, so position t sees tokens <= t), and the output at t is scored against item
embeddings tied with the input table. Loss, per position whose next token is a training target:
  - negatives=0: cross-entropy over the whole catalogue (what fits here: ML-100K's 1,682 items);
  - negatives=K: sampled softmax over the target and K items drawn once per batch in proportion
    to training popularity q, every logit corrected by -log(K q) (logQ correction, Yi et al.
    2019), so the sampled loss estimates the full one instead of demoting popular items.

Training data is the leave-one-out split's training tokens (ranker.training.loo): per user,
windows of at most max_len inputs; each window's last `stride` positions count (default
max_len / 2), so every target is predicted once per epoch, from at least max_len - stride
earlier tokens when the user has them. stride 1 is RecBole's sequential training (every
prefix an example, one target each, the full context of up to max_len items); a smaller
stride trains on the context lengths evaluation uses.

Every prefix, merged (stride 1, prefixes="merged", the default): a causal model's output at
position p of a window depends only on the window's tokens <= p counted from its start, so
the prefixes of a user's first max_len + 1 training tokens are exactly the positions of ONE
window starting at the user's first token; only later targets need their own window (its
last position counted). The same (context, target) examples as one window per prefix
(prefixes="separate", the reference path), with fewer items through the model: a user's
first max_len prefixes share one window instead of one each.
Exact for every family whose history tokens depend on nothing after them (positions from
the window's start, gaps to the previous event, pairwise relative biases); ASTRO's recency
partition counts ages from the window's end, so it keeps one window per prefix
(`SequenceRanker.prefix_invariant`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ranker.models import build_model
from ranker.models.base import SequenceRanker
from ranker.training.checkpoint import save_checkpoint
from ranker.training.data import iterate_batches
from ranker.training.loo import LeaveOneOut, token_batch
from ranker.training.loo_eval import Protocol, evaluate_loo, model_scorer


LR_SCHEDULES = ("cosine", "constant")
PREFIX_WINDOWS = ("merged", "separate")  # stride 1: one window per user's head, or one per prefix


@dataclass(frozen=True)
class Windows:
    start: np.ndarray  # int64 [W], first input token
    end: np.ndarray  # int64 [W], one past the last input token
    loss_from: np.ndarray  # int64 [W], first input position whose target counts

    def __len__(self) -> int:
        return len(self.start)

    @property
    def n_targets(self) -> int:  # examples: counted positions
        return int((self.end - self.start - self.loss_from).sum())

    @property
    def n_items(self) -> int:  # input tokens through the model, padding not counted
        return int((self.end - self.start).sum())


def training_windows(split: LeaveOneOut, max_len: int, stride: int | None = None,
                     prefixes: str = "merged") -> Windows:
    """Input windows over each user's training tokens; input position p predicts token start + p + 1.
    Each window counts the targets of its last `stride` positions (default max_len // 2).
    stride 1: `prefixes` "merged" (one window holds every prefix that starts at the user's
    first token) or "separate" (one window per prefix, the reference): the same examples."""
    stride = max(1, max_len // 2) if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"window stride must be in [1, max_len={max_len}], got {stride}")
    if prefixes not in PREFIX_WINDOWS:
        raise ValueError(f"prefix windows must be one of {PREFIX_WINDOWS}, got {prefixes!r}")
    if stride == 1 and prefixes == "merged":
        return merged_prefix_windows(split, max_len)
    starts, ends, froms = [], [], []
    for first, valid in zip(split.user_first.tolist(), split.valid_index.tolist()):
        t1 = valid  # targets [t0, t1), newest first
        while t1 > first + 1:
            t0 = max(first + 1, t1 - stride)
            a = max(first, t1 - 1 - max_len)
            starts.append(a)
            ends.append(t1 - 1)
            froms.append(t0 - 1 - a)
            t1 = t0
    if not starts:
        raise ValueError("no user has a training token with an earlier one: nothing to train on")
    return Windows(np.array(starts, np.int64), np.array(ends, np.int64), np.array(froms, np.int64))


def merged_prefix_windows(split: LeaveOneOut, max_len: int) -> Windows:
    """Every prefix as an example, merged: per user (training tokens [first, valid)), the head
    window [first, min(first + max_len, valid - 1)) counts every position (target t sees
    [first, t)); each later target t gets the window [t - max_len, t), last position counted.
    Target t's context is [max(first, t - max_len), t), as with one window per prefix."""
    starts, ends, froms = [], [], []
    for first, valid in zip(split.user_first.tolist(), split.valid_index.tolist()):
        if valid - 1 <= first:  # no training token with an earlier one
            continue
        head_end = min(first + max_len, valid - 1)
        later = np.arange(head_end + 1, valid, dtype=np.int64)  # targets past the head window
        starts += [np.array([first], np.int64), later - max_len]
        ends += [np.array([head_end], np.int64), later]
        froms += [np.zeros(1, np.int64), np.full(len(later), max_len - 1, np.int64)]
    if not starts:
        raise ValueError("no user has a training token with an earlier one: nothing to train on")
    return Windows(np.concatenate(starts), np.concatenate(ends), np.concatenate(froms))


def counted_outputs(model: SequenceRanker, split: LeaveOneOut, windows: Windows, rows: np.ndarray
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's output at every counted position of windows `rows`: hidden [P, d], the
    target item [P] (0-based) and the target's token index in the log [P]."""
    start, end = windows.start[rows], windows.end[rows]
    batch = token_batch(split.log, start, end)
    n = batch.history_tracks.shape[1]
    position = torch.arange(n)[None, :]
    counted = (position < batch.history_lengths[:, None]) & (position >= torch.from_numpy(windows.loss_from[rows])[:, None])
    target_index = (torch.from_numpy(start)[:, None] + position + 1)[counted]
    targets = torch.from_numpy(split.log.token_tracks.astype(np.int64))[target_index]
    return model.sequence_output(batch)[counted], targets, target_index


def next_item_loss(model: SequenceRanker, split: LeaveOneOut, windows: Windows, rows: np.ndarray,
                   negatives: int = 0, log_q: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Mean loss over the counted positions of windows `rows`, and how many there were."""
    hidden, targets, _ = counted_outputs(model, split, windows, rows)  # [P, d], [P]
    if negatives == 0:
        return F.cross_entropy(model.next_item_logits(hidden).float(), targets), len(targets)
    if log_q is None:
        raise ValueError("sampled softmax needs log_q, the log of each item's sampling probability")
    drawn = torch.multinomial(log_q.exp(), negatives, replacement=True, generator=generator)  # [K]
    correction = math.log(negatives)
    pos_logit = (model.next_item_query(hidden) * model.embed.track.weight[targets + 1]).sum(-1)
    neg_logit = model.next_item_logits(hidden, drawn) - (log_q[drawn] + correction)
    neg_logit = neg_logit.masked_fill(drawn[None, :] == targets[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([(pos_logit - (log_q[targets] + correction))[:, None], neg_logit], dim=1)
    return F.cross_entropy(logits.float(), torch.zeros(len(targets), dtype=torch.long)), len(targets)


def select_by_choices(ks: tuple[int, ...]) -> tuple[str, ...]:
    """What --select-by accepts: "last", or a validation metric the epochs print."""
    return ("last", *(f"{m}@{k}" for k in ks for m in ("hr", "ndcg", "mrr")), "mrr")


def popularity_log_q(split: LeaveOneOut) -> torch.Tensor:
    """log of each item's share of training tokens (add-one smoothed: every item can be drawn)."""
    counts = np.bincount(split.log.token_tracks[split.train_token_mask()], minlength=split.n_tracks) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@dataclass
class NextItemResult:
    epochs: list[dict[str, float]]  # per epoch: loss, valid metrics, seconds
    valid: dict[str, float]
    test: dict[str, float]
    n_params: int
    steps: int
    train_seconds: float
    model_version: str


def train_next_item(family: str, size: str, split: LeaveOneOut, out_dir: str | Path, *, epochs: int = 12,
                    batch_size: int = 128, lr: float = 1e-3, seed: int = 0, max_len: int = 50,
                    negatives: int = 0, weight_decay: float = 0.0, model_overrides: dict[str, Any] | None = None,
                    window_stride: int | None = None, lr_schedule: str = "cosine", grad_clip: float = 1.0,
                    patience: int | None = None, select_by: str = "last", prefix_windows: str = "merged",
                    ks: tuple[int, ...] = (10,), say: Callable[[str], None] = print,
                    extra: dict[str, Any] | None = None) -> NextItemResult:
    """Train `family`/`size` with the next-item objective on the split's training tokens; print
    one plain line per epoch (loss and validation HR/NDCG/MRR, full ranking), then test.

    lr_schedule: "cosine" (warm-up, then cosine to 10% of lr) or "constant" (RecBole's); grad_clip
    0 clips nothing. patience: stop once validation HR@k (the first k) has not risen for that
    many epochs and keep the best epoch's weights: epochs chosen on the validation item, so
    the test item stays unseen by every choice. select_by: "last" tests the last epoch's
    weights; a validation metric (hr@K, ndcg@K, mrr@K for a K in ks, or mrr) keeps the epoch
    best by it (ties: the earlier) and tests that, as RecBole does (MRR@10); the last epoch's
    test figures are recorded beside. With both, patience watches the select_by metric.
    prefix_windows: with window_stride 1, "merged" or "separate" (see training_windows); a
    model whose outputs depend on the window's end (ASTRO's recency partition) gets "separate"."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 epoch, got {patience}")
    choices = select_by_choices(ks)
    if select_by not in choices:
        raise ValueError(f"select-by must be one of {', '.join(choices)}, got {select_by!r}")
    watched = f"hr@{ks[0]}" if select_by == "last" else select_by  # what patience and selection compare
    if prefix_windows not in PREFIX_WINDOWS:
        raise ValueError(f"prefix windows must be one of {PREFIX_WINDOWS}, got {prefix_windows!r}")
    torch.manual_seed(seed)
    overrides = {"max_len": max_len, **(model_overrides or {})}
    model = build_model(family, size, split.n_tracks, **overrides)
    if window_stride == 1 and prefix_windows == "merged" and not model.prefix_invariant():
        say(f"{family}: outputs depend on the window's end (recency blocks): one window per prefix")
        prefix_windows = "separate"
    windows = training_windows(split, max_len, window_stride, prefix_windows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    log_q = popularity_log_q(split) if negatives else None
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(windows) / batch_size)
    total = epochs * steps_per_epoch
    protocol = Protocol(0)
    say(f"{family}-{size} next-item ({'full softmax' if not negatives else f'sampled softmax, {negatives} negatives, logQ'}): "
        f"{model.n_params():,} params, {len(split.users):,} users, {len(windows):,} windows of <= {max_len} "
        f"({windows.n_targets:,} targets, {windows.n_items:,} items), "
        f"{split.n_tracks:,} items, {total} steps of {batch_size}"
        f"{'' if window_stride is None else f' (window stride {window_stride}'}"
        f"{'' if window_stride is None else (f', prefixes {prefix_windows})' if window_stride == 1 else ')')}; lr {lr:g} {lr_schedule}, "
        f"clip {grad_clip or 'none'}{'' if patience is None else f', early stop: patience {patience} on valid {watched.upper()}'}"
        f"{'' if select_by == 'last' else f', test the best valid {watched.upper()} epoch'}")
    from ranker.training.train import learning_rate  # the same warm-up + cosine schedule

    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (valid `watched`, epoch, weights)
    step, started = 0, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        epoch_start, loss_sum, count = time.perf_counter(), 0.0, 0
        for rows in iterate_batches(len(windows), batch_size, shuffle=True, seed=seed, epoch=epoch):
            if lr_schedule == "cosine":
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total, lr, min(100, total // 10 + 1))
            loss, n = next_item_loss(model, split, windows, rows, negatives, log_q, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            step += 1
            loss_sum += loss.item() * n
            count += n
        valid = evaluate_loo(model_scorer(model, split, "valid", max_len, "next_item"), split, "valid", protocol, ks)
        line = {"epoch": epoch + 1, "loss": loss_sum / max(count, 1), **valid,
                "seconds": time.perf_counter() - epoch_start}
        history.append(line)
        say(f"epoch {epoch + 1}/{epochs}  loss {line['loss']:.4f}  valid "
            + "  ".join(f"{name.upper()} {valid[name]:.4f}" for name in valid if name != "users")
            + f"  ({line['seconds']:.0f} s)")
        if patience is not None or select_by != "last":
            score = valid[watched]
            if best is None or score > best[0]:  # strictly: a tie keeps the earlier epoch
                best = (score, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            elif patience is not None and epoch + 1 - best[1] >= patience:
                say(f"early stop: valid {watched.upper()} {best[0]:.4f} at epoch {best[1]}, not beaten in {patience} epochs")
                break
    train_seconds = time.perf_counter() - started
    valid = history[-1] if history else {}
    last_test = None
    if best is not None:
        if select_by != "last" and best[1] != len(history):  # the last epoch's figures, side by side
            last_test = evaluate_loo(model_scorer(model, split, "test", max_len, "next_item"), split, "test", protocol, ks)
            say(f"test at the last epoch ({len(history)}): "
                + "  ".join(f"{name.upper()} {last_test[name]:.4f}" for name in last_test if name != "users"))
        model.load_state_dict(best[2])
        valid = history[best[1] - 1]
        say(f"kept epoch {best[1]} (best valid {watched.upper()} {best[0]:.4f})")
    test = evaluate_loo(model_scorer(model, split, "test", max_len, "next_item"), split, "test", protocol, ks)
    say(f"test ({protocol.describe(split.n_tracks)}): "
        + "  ".join(f"{name.upper()} {test[name]:.4f}" for name in test if name != "users"))
    if last_test is None and best is not None and select_by != "last":
        last_test = test  # the best epoch was the last
    meta = {"objective": "next_item", "split": "loo", "n_tracks": split.n_tracks, "max_len": max_len, "seed": seed,
            "batch_size": batch_size, "lr": lr, "epochs": epochs, "negatives": negatives, "window_stride": window_stride,
            "prefix_windows": prefix_windows if window_stride == 1 else None,
            "lr_schedule": lr_schedule, "grad_clip": grad_clip, "patience": patience,
            "select_by": select_by, "best_epoch": None if best is None else best[1], "last_test_metrics": last_test,
            "model_overrides": dict(model_overrides or {}), "epoch_history": history, "test_metrics": test,
            **(extra or {})}
    version = save_checkpoint(Path(out_dir), model, optimizer, family, size, step, meta)
    return NextItemResult(history, {k: v for k, v in valid.items() if k not in ("epoch",)}, test,
                          model.n_params(), step, train_seconds, version)
