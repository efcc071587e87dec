"""Leave-one-out evaluation of a checkpoint (or of popularity): `climber eval`.

    climber eval models/sasrec-s --db ml100k.duckdb --protocol loo-full --k 10 20
    climber eval popularity --db ml100k.duckdb --protocol loo-sampled:100

Protocols (ranker.training.loo holds the split and the metrics):
  - loo-full: the target ranked against every item of the catalogue (RecBole, HSTU README);
  - loo-sampled:N: against N items the user never interacted with, drawn uniformly (the
    SASRec paper's 100; it inflates HR, so the protocol is always printed with the figures).
`exclude_seen` drops items the user consumed before the target from the ranking (a
repeat of the target itself stays); RecBole's sequential models do not, so it is off by default.

How a model scores: a next-item checkpoint by the dot product of its history output with
the item table (`next_item_logits`); an impression checkpoint through its target-aware
candidate path (the serving path) with every candidate, in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ranker.models.base import SequenceRanker
from ranker.training.loo import LeaveOneOut, metrics_from_ranks, pessimistic_ranks

OBJECTIVES = ("impression", "next_item")


@dataclass(frozen=True)
class Protocol:
    sampled: int  # 0 = full ranking
    exclude_seen: bool = False

    @classmethod
    def parse(cls, text: str, exclude_seen: bool = False) -> "Protocol":
        if text == "loo-full":
            return cls(0, exclude_seen)
        head, sep, count = text.partition(":")
        if head == "loo-sampled" and sep and count.isdigit() and int(count) > 0:
            if exclude_seen:
                raise ValueError("loo-sampled draws negatives the user never saw: --exclude-seen changes nothing")
            return cls(int(count))
        raise ValueError(f"protocol must be 'loo-full' or 'loo-sampled:N' (e.g. loo-sampled:100), not {text!r}")

    def describe(self, n_items: int) -> str:
        what = (f"full ranking over all {n_items:,} items" if not self.sampled
                else f"target against {self.sampled} sampled items the user never interacted with")
        seen = "items seen before the target excluded" if self.exclude_seen else "seen items not excluded"
        return f"leave-one-out by time, {what}, {seen}, ties ranked ahead of the target"


# A scorer maps (user rows, histories batch builder) to scores [B, n_tracks] or [B, M].
Scorer = Callable[[np.ndarray, torch.Tensor | None], torch.Tensor]


def model_scorer(model: SequenceRanker, split: LeaveOneOut, which: str, max_len: int, objective: str,
                 candidate_chunk: int = 512) -> Scorer:
    """Scores of candidates (None: the whole catalogue) for users `rows`."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    n_tracks = split.n_tracks

    @torch.no_grad()
    def score(rows: np.ndarray, candidates: torch.Tensor | None) -> torch.Tensor:
        model.eval()
        if objective == "next_item":
            batch = split.query_batch(rows, which, max_len, torch.zeros(len(rows), 0, dtype=torch.int64))
            hidden = model.sequence_output(batch)
            last = hidden[torch.arange(len(rows)), (batch.history_lengths - 1).clamp_min(0)]
            logits = model.next_item_logits(last)
            return logits if candidates is None else logits.gather(1, candidates)
        items = torch.arange(n_tracks).expand(len(rows), -1) if candidates is None else candidates
        parts = []
        for start in range(0, items.shape[1], candidate_chunk):  # the serving path, chunked
            batch = split.query_batch(rows, which, max_len, items[:, start:start + candidate_chunk])
            parts.append(model.score(model(batch).float()))
        return torch.cat(parts, dim=1)

    return score


def popularity_scorer(split: LeaveOneOut) -> Scorer:
    """Training-token counts per item: the floor every model must clear."""
    counts = np.bincount(split.log.token_tracks[split.train_token_mask()], minlength=split.n_tracks)
    table = torch.from_numpy(counts.astype(np.float32))

    def score(rows: np.ndarray, candidates: torch.Tensor | None) -> torch.Tensor:
        full = table.expand(len(rows), -1)
        return full if candidates is None else full.gather(1, candidates)

    return score


def sampled_candidates(split: LeaveOneOut, which: str, n: int, seed: int) -> torch.Tensor:
    """[U, 1 + n]: the target, then n items each user never interacted with (uniform)."""
    rng = np.random.default_rng(seed)
    targets = split.log.token_tracks[split.targets(which)]
    out = np.empty((len(split.users), 1 + n), np.int64)
    out[:, 0] = targets
    ends = np.searchsorted(split.log.token_users, split.users, side="right")
    for i, (first, stop) in enumerate(zip(split.user_first, ends)):
        allowed = np.setdiff1d(np.arange(split.n_tracks), split.log.token_tracks[first:stop])
        if len(allowed) < n:
            raise ValueError(f"user {split.users[i]} interacted with all but {len(allowed)} items; "
                             f"cannot sample {n} negatives")
        out[i, 1:] = rng.choice(allowed, n, replace=False)
    return torch.from_numpy(out)


def evaluate_loo(scorer: Scorer, split: LeaveOneOut, which: str, protocol: Protocol, ks: tuple[int, ...],
                 batch_users: int = 64, seed: int = 0, progress: Callable[[int], None] | None = None
                 ) -> dict[str, float]:
    """HR@K, NDCG@K, MRR of `scorer` on the split's `which` ("valid" or "test") targets."""
    targets = torch.from_numpy(split.log.token_tracks[split.targets(which)].astype(np.int64))
    sampled = sampled_candidates(split, which, protocol.sampled, seed) if protocol.sampled else None
    seen = split.seen(np.arange(len(split.users)), which) if protocol.exclude_seen else None
    ranks = []
    for start in range(0, len(split.users), batch_users):
        rows = np.arange(start, min(start + batch_users, len(split.users)))
        if sampled is not None:
            scores = scorer(rows, sampled[rows])
            ranks.append(pessimistic_ranks(scores, torch.zeros(len(rows), dtype=torch.int64)))
        else:
            scores = scorer(rows, None)
            excluded = None
            if seen is not None:
                excluded = torch.zeros(scores.shape, dtype=torch.bool)
                for i, row in enumerate(rows):
                    excluded[i, torch.from_numpy(seen[row].astype(np.int64))] = True
            ranks.append(pessimistic_ranks(scores, targets[rows], excluded))
        if progress is not None:
            progress(len(rows))
    result = metrics_from_ranks(torch.cat(ranks).numpy(), ks)
    result["users"] = float(len(split.users))
    return result
