"""Stylised facts: does an event log look like a music platform? Checked on any log.

Each fact is one number from the log with a plausible range (docs/simulator.md says where
the ranges come from). They are wide on purpose: they must hold for a random recommender
and for a popularity ranker alike, and they catch a broken simulator, not a bad ranker.

- long tail: plays concentrate on few tracks (Gini over the catalog, top-1% share);
- skip rate: share of plays skipped before the end;
- sessions (30-minute inactivity gap): median tracks played, and mean / median (a heavy tail);
- position bias: play rate per impression at position 0 over positions 5 and later;
- daily cycle: busiest over quietest hour of day (UTC) by events.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.interface import TrackMetadata
from simulator.config import HOUR_MS
from streaming.events import BEHAVIOUR_CODE, EventBatch

SESSION_GAP_MS = 30 * 60 * 1000
PLAY, SKIP, IMPRESSION = BEHAVIOUR_CODE["play"], BEHAVIOUR_CODE["skip"], BEHAVIOUR_CODE["impression"]


@dataclass(frozen=True)
class Fact:
    name: str
    value: float
    low: float
    high: float
    description: str

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.value) and self.low <= self.value <= self.high)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = equal, towards 1 = all on one)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def session_lengths(events: EventBatch, gap_ms: int = SESSION_GAP_MS) -> np.ndarray:
    """Tracks played per session, sessions cut at `gap_ms` of a user's inactivity."""
    if len(events) == 0:
        return np.zeros(0, np.int64)
    order = np.lexsort((events.event_id, events.ts, events.user_id))
    user, ts = events.user_id[order], events.ts[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > gap_ms)
    session = np.cumsum(starts) - 1
    return np.bincount(session, weights=events.behaviour[order] == PLAY).astype(np.int64)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def stylised_facts(events: EventBatch, metadata: TrackMetadata) -> list[Fact]:
    behaviour = events.behaviour
    plays = behaviour == PLAY
    play_counts = np.bincount(events.track_id[plays], minlength=metadata.n_tracks)
    top = max(1, int(np.ceil(0.01 * metadata.n_tracks)))
    top_share = _ratio(np.sort(play_counts)[::-1][:top].sum(), play_counts.sum())

    lengths = session_lengths(events)
    median_length = float(np.median(lengths)) if len(lengths) else float("nan")

    ranked = events.position >= 0
    impressions, ranked_plays = ranked & (behaviour == IMPRESSION), ranked & plays

    def play_rate(where: np.ndarray) -> float:
        return _ratio((ranked_plays & where).sum(), (impressions & where).sum())

    hours = np.bincount((events.ts // HOUR_MS) % 24, minlength=24)

    return [
        Fact("play_gini", gini(play_counts), 0.32, 0.995,
             "Gini of plays over all catalog tracks: plays pile onto a minority of tracks"),
        Fact("top1pct_play_share", top_share, 0.04, 0.95,
             "share of plays going to the most played 1% of tracks"),
        Fact("skip_rate", _ratio((behaviour == SKIP).sum(), plays.sum()), 0.15, 0.6,
             "skips per play: share of started tracks not listened to the end"),
        Fact("session_median_plays", median_length, 3, 40,
             "median tracks played per session (sessions split at 30 minutes of inactivity)"),
        Fact("session_mean_over_median", _ratio(lengths.mean(), median_length) if len(lengths) else float("nan"),
             1.1, 3.0, "mean over median session length: a heavy tail of long sessions"),
        Fact("position_bias", _ratio(play_rate(events.position == 0), play_rate(events.position >= 5)), 1.3, 10,
             "play rate per impression at position 0 over positions >= 5"),
        Fact("daily_cycle", _ratio(hours.max(), hours.min()), 2.5, 25,
             "events in the busiest hour of day over the quietest (UTC)"),
    ]
