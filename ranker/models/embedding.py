"""Tokens: track + behaviour + scenario + position + time gap, summed into one vector.

A history token's embedding depends only on its own event and the gap to the previous
event, never on the request time, so a cached history prefix stays valid as events arrive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import RankBatch
from ranker.models.config import ModelConfig
from ranker.models.layers import Dropout
from streaming.events import BEHAVIOURS, SCENARIOS

TARGET_BEHAVIOUR = len(BEHAVIOURS)  # the behaviour slot of a candidate token: "to be scored"


def log_bucket(x: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Half-octave buckets of a non-negative quantity (0 -> 0, 1 -> 2, 255 -> 16, ...).

    Fine near zero where "same session" and "a minute later" differ, coarse for months.
    In place on one float copy: HSTU buckets B x L x L pairs, so passes over memory count.
    """
    y = x.to(torch.float32, copy=True).clamp_min_(0).add_(1).log2_().mul_(2).floor_()
    return y.to(torch.long).clamp_max_(n_buckets - 1)


def seconds_bucket(ms: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """log_bucket of a duration given in milliseconds, measured in seconds."""
    return log_bucket(ms.to(torch.float32) * 1e-3, n_buckets)


def history_time_gaps(history_ts: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of the gap to the previous event (bucket 0 = no previous event).

    The gap to the previous event, not the age at request time, so a token's embedding
    never changes once written: that is what makes a cached history prefix reusable.
    """
    buckets = 1 + seconds_bucket(torch.diff(history_ts, dim=1), n_buckets - 1)
    return F.pad(buckets, (1, 0), value=0)




class TokenEmbedding(nn.Module):
    """Token = track + behaviour + scenario + position + time gap (summed; layer-normed for
    post-norm layers).

    A candidate token has behaviour TARGET, the request's scenario, position = history length
    and the gap from the last event to the request.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_time_buckets = cfg.n_time_buckets
        self.track = nn.Embedding(cfg.n_tracks + 1, d, padding_idx=0)
        self.behaviour = nn.Embedding(len(BEHAVIOURS) + 1, d)
        self.scenario = nn.Embedding(len(SCENARIOS), d)
        self.position = nn.Embedding(cfg.max_len + 1, d)
        self.time_gap = nn.Embedding(cfg.n_time_buckets, d)
        # Post-norm layers (ModelConfig.norm) take normalised tokens, as RecBole's SASRec does.
        self.input_norm = cfg.norm == "post"
        self.norm = nn.LayerNorm(d) if self.input_norm else nn.Identity()
        self.dropout = Dropout(cfg.dropout)
        for table in (self.track, self.behaviour, self.scenario, self.position, self.time_gap):
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.track.weight[0].zero_()

    def history(self, batch: RankBatch, start: int = 0) -> torch.Tensor:  # [B, n - start, d]
        """Tokens [start, n) of the history; start > 0 embeds only events appended to a cached prefix."""
        n = batch.history_tracks.shape[1]
        positions = torch.arange(start, n, device=batch.history_tracks.device)
        gaps = history_time_gaps(batch.history_ts[:, max(start - 1, 0):], self.n_time_buckets)
        x = self.track(batch.history_tracks[:, start:])  # the sum accumulates in place: one [B, n, d] tensor
        x += self.behaviour(batch.history_behaviours[:, start:])
        x += self.scenario(batch.history_scenarios[:, start:])
        x += self.position(positions)
        x += self.time_gap(gaps[:, 1:] if start else gaps)
        return self.dropout(self.norm(x))

    def candidates(self, batch: RankBatch, history_lengths: torch.Tensor, last_ts: torch.Tensor) -> torch.Tensor:
        """[B, M, d]; needs only the history's length and last timestamp (kept in the cache)."""
        gap = torch.where(history_lengths > 0, 1 + seconds_bucket(batch.request_ts - last_ts, self.n_time_buckets - 1), 0)
        target = torch.full_like(batch.scenario, TARGET_BEHAVIOUR)
        per_row = self.behaviour(target) + self.scenario(batch.scenario) + self.position(history_lengths) + self.time_gap(gap)
        return self.dropout(self.norm(self.track(batch.candidate_tracks) + per_row[:, None, :]))


def last_timestamps(batch: RankBatch) -> torch.Tensor:  # int64 [B], 0 for an empty history
    last = (batch.history_lengths - 1).clamp_min(0)
    ts = batch.history_ts.gather(1, last[:, None])[:, 0] if batch.history_ts.shape[1] else torch.zeros_like(last)
    return torch.where(batch.history_lengths > 0, ts, 0)


