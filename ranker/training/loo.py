"""The field's protocol on a token log: leave-one-out by time, HR@K, NDCG@K and MRR.

Per user, over the sequence of consumed tokens (every behaviour except impressions, skips
and dislikes) in event order: the last is the test target, the one before it the validation
target, everything before the validation target is training data. A target's history is
every token of that user before it (the test history includes the validation item), as in
RecBole and the HSTU README. Users with fewer than three consumed tokens are left out.

Ranks are 0-based and pessimistic: rank = the number of other candidates scored >= the
target, so a model that scores everything alike ranks last, never first.
    HR@K = [rank < K], NDCG@K = [rank < K] / log2(rank + 2), MRR = 1 / (rank + 1),
    MRR@K = [rank < K] / (rank + 1) (RecBole's MRR@K, its SASRec's validation metric)
`metrics_from_ranks` is the fast path; `reference_metrics` sorts each list in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ranker.batch import RankBatch
from ranker.training.data import RequestLog
from streaming.events import BEHAVIOUR_CODE

NOT_CONSUMED = tuple(BEHAVIOUR_CODE[b] for b in ("skip", "dislike"))


@dataclass(frozen=True)
class LeaveOneOut:
    """Targets of the split: token indices into the log's token arrays, one per kept user."""

    log: RequestLog
    users: np.ndarray  # int64 [U]
    user_first: np.ndarray  # int64 [U], the user's first token
    valid_index: np.ndarray  # int64 [U], the validation target token
    test_index: np.ndarray  # int64 [U], the test target token

    @property
    def n_tracks(self) -> int:
        return self.log.n_tracks

    def targets(self, which: str) -> np.ndarray:
        if which not in ("valid", "test"):
            raise ValueError(f"which must be 'valid' or 'test', not {which!r}")
        return self.valid_index if which == "valid" else self.test_index

    def query_batch(self, rows: np.ndarray, which: str, max_len: int, candidates: torch.Tensor) -> RankBatch:
        """Histories before the targets of users `rows`, with `candidates` [len(rows), M] (track
        ids, 0-based) to score; request time = the target's time."""
        end = self.targets(which)[rows]
        start = np.maximum(self.user_first[rows], end - max_len)
        batch = token_batch(self.log, start, end)
        batch.candidate_tracks = candidates.to(torch.int64) + 1
        batch.candidate_mask = torch.ones(candidates.shape, dtype=torch.bool)
        batch.request_ts = torch.from_numpy(self.log.token_ts[end].astype(np.int64))
        return batch

    def seen(self, rows: np.ndarray, which: str) -> list[np.ndarray]:
        """The items each user consumed before the target (for --exclude-seen)."""
        end = self.targets(which)[rows]
        return [self.log.token_tracks[first:stop] for first, stop in zip(self.user_first[rows], end)]

    def train_token_mask(self) -> np.ndarray:
        """bool [N_tok]: tokens before their user's validation target (the training data)."""
        mask = np.zeros(len(self.log.token_tracks), bool)
        for first, stop in zip(self.user_first, self.valid_index):
            mask[first:stop] = True
        return mask

    def train_requests(self) -> np.ndarray:
        """Rows of the log's requests whose target comes before their user's validation
        target (a request's positive is the token right after its history)."""
        limit = dict(zip(self.users.tolist(), self.valid_index.tolist()))
        bound = np.array([limit.get(int(u), -1) for u in self.log.user_id], np.int64)
        return np.flatnonzero(self.log.history_end < bound)


def leave_one_out(log: RequestLog) -> LeaveOneOut:
    """Split `log`'s token sequences per user (see the module docstring)."""
    if log.token_users is None:
        raise ValueError("this RequestLog carries no token users; load it with load_request_log")
    users_of = log.token_users
    consumed = np.flatnonzero(~np.isin(log.token_behaviours, NOT_CONSUMED))
    if not len(consumed):
        raise ValueError("the log holds no consumed tokens; nothing to leave out")
    user = users_of[consumed]
    last = np.r_[user[1:] != user[:-1], True]  # last consumed token of each user
    count = np.diff(np.r_[0, np.flatnonzero(last) + 1])
    ends = np.flatnonzero(last)
    keep = count >= 3
    test = consumed[ends[keep]]
    valid = consumed[ends[keep] - 1]
    kept_users = user[ends[keep]]
    first = np.searchsorted(users_of, kept_users, side="left")
    if not len(kept_users):
        raise ValueError("no user has three consumed tokens: leave-one-out needs train, valid and test")
    return LeaveOneOut(log, kept_users.astype(np.int64), first.astype(np.int64), valid.astype(np.int64),
                       test.astype(np.int64))


def token_batch(log: RequestLog, start: np.ndarray, end: np.ndarray) -> RankBatch:
    """Token ranges [start, end) of the log as left-aligned histories (no candidates yet)."""
    lengths = (end - start).astype(np.int64)
    n = max(int(lengths.max(initial=0)), 1)
    mask = np.arange(n)[None, :] < lengths[:, None]
    index = np.where(mask, start[:, None] + np.arange(n)[None, :], 0)

    def gather(values: np.ndarray, shift: int = 0) -> torch.Tensor:
        return torch.from_numpy(np.where(mask, values[index].astype(np.int64) + shift, 0))

    ts = gather(log.token_ts)
    B = len(start)
    return RankBatch(
        history_tracks=gather(log.token_tracks, 1), history_behaviours=gather(log.token_behaviours),
        history_scenarios=gather(log.token_scenarios), history_ts=ts,
        history_lengths=torch.from_numpy(lengths),
        candidate_tracks=torch.zeros(B, 0, dtype=torch.int64), candidate_mask=torch.zeros(B, 0, dtype=torch.bool),
        scenario=gather(log.token_scenarios)[torch.arange(B), (torch.from_numpy(lengths) - 1).clamp_min(0)],
        request_ts=ts.max(dim=1).values,
    )


# ----------------------------------------------------------------------------- metrics

def pessimistic_ranks(scores: torch.Tensor, target_col: torch.Tensor, excluded: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """0-based rank of column `target_col[i]` in row i of scores [B, M]: how many other
    columns score >= it. `excluded` (bool [B, M]) columns never outrank the target."""
    target = scores.gather(1, target_col[:, None])
    ahead = scores >= target
    if excluded is not None:
        ahead &= ~excluded
    ahead.scatter_(1, target_col[:, None], False)
    return ahead.sum(1)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    ranks = np.asarray(ranks, np.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1.0 / (ranks + 1), 0.0).mean())  # RecBole's: 0 past K
    out["mrr"] = float((1.0 / (ranks + 1)).mean())
    return out


def reference_metrics(score_lists: list[list[float]], targets: list[int], ks: tuple[int, ...],
                      excluded: list[set[int]] | None = None) -> dict[str, float]:
    """The slow, obviously correct path: per list, sort candidates by score (the target after
    every tie), find the target, and average the textbook formulas."""
    totals: dict[str, float] = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg", "mrr")} | {"mrr": 0.0}
    for i, (scores, target) in enumerate(zip(score_lists, targets)):
        skip = excluded[i] if excluded else set()
        kept = [j for j in range(len(scores)) if j == target or j not in skip]
        order = sorted(kept, key=lambda j: (-scores[j], j == target))  # ties go ahead of the target
        rank = order.index(target)
        for k in ks:
            if rank < k:
                totals[f"hr@{k}"] += 1.0
                totals[f"ndcg@{k}"] += 1.0 / math.log2(rank + 2)
                totals[f"mrr@{k}"] += 1.0 / (rank + 1)
        totals["mrr"] += 1.0 / (rank + 1)
    return {name: value / len(targets) for name, value in totals.items()}
