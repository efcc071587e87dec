"""The tensor batch every neural ranker takes (ASTRO, SASRec-style, HSTU-style).

One row per request: the user's history once and the M candidates scored against it
(single user, multiple items). Built by the training datasets from the DuckDB log and by
serving from Feast sequences, so training and serving feed models identically.

Id conventions: track ids are shifted by +1 so that 0 is padding; behaviour and scenario
codes are those of streaming.events (no shift; padded positions are masked).
History is left-aligned, oldest first: positions [0, length) are real.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from streaming.events import BEHAVIOURS, SCENARIOS

TASKS: tuple[str, ...] = ("full_play", "like", "skip", "share")


@dataclass
class RankBatch:
    history_tracks: torch.Tensor  # int64 [B, n], track_id + 1, 0 = padding
    history_behaviours: torch.Tensor  # int64 [B, n]
    history_scenarios: torch.Tensor  # int64 [B, n]
    history_ts: torch.Tensor  # int64 [B, n], epoch ms
    history_lengths: torch.Tensor  # int64 [B]
    candidate_tracks: torch.Tensor  # int64 [B, M], track_id + 1, 0 = padding
    candidate_mask: torch.Tensor  # bool [B, M], True where a real candidate
    scenario: torch.Tensor  # int64 [B], the request's scenario code
    request_ts: torch.Tensor  # int64 [B], epoch ms
    # Training targets (absent at serving time): float [B, M, len(TASKS)], and the
    # position each candidate was shown at (for NDCG over the logged list).
    labels: torch.Tensor | None = None

    @property
    def history_mask(self) -> torch.Tensor:  # bool [B, n]
        n = self.history_tracks.shape[1]
        return torch.arange(n, device=self.history_tracks.device)[None, :] < self.history_lengths[:, None]

    def to(self, device: torch.device | str) -> "RankBatch":
        return RankBatch(**{
            f.name: (getattr(self, f.name).to(device) if getattr(self, f.name) is not None else None)
            for f in fields(self)
        })


def random_batch(B: int, n: int, M: int, n_tracks: int, seed: int = 0, min_length: int = 0) -> RankBatch:
    """A valid random RankBatch (ragged histories, time-ordered) for tests and FLOP/latency benchmarks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, n + 1, (B,), generator=g)
    real = torch.arange(n)[None, :] < lengths[:, None]
    ts = 1_700_000_000_000 + torch.cumsum(torch.randint(0, 3_600_000, (B, n), generator=g), dim=1)
    return RankBatch(
        history_tracks=torch.randint(1, n_tracks + 1, (B, n), generator=g) * real,
        history_behaviours=torch.randint(1, len(BEHAVIOURS), (B, n), generator=g) * real,  # no impressions
        history_scenarios=torch.randint(0, len(SCENARIOS), (B, n), generator=g) * real,
        history_ts=ts * real,
        history_lengths=lengths,
        candidate_tracks=torch.randint(1, n_tracks + 1, (B, M), generator=g),
        candidate_mask=torch.ones(B, M, dtype=torch.bool),
        scenario=torch.randint(0, len(SCENARIOS), (B,), generator=g),
        request_ts=ts[:, -1] + 60_000,
    )
