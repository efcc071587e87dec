"""The ranking contract: `rank(requests) -> responses`, batched across users.

Every ranker (the non-neural baseline, ASTRO, SASRec/HSTU baselines, the HTTP service)
speaks these types, so the simulator and the A/B wiring never know which model they face.
User history is not part of a request: rankers read it from the feature store through a
`SequenceSource`, as they would in production.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from features.sequence import UserSequence

RANKING_SCORE = "score"  # the key of the final ranking score in RankResponse.scores


@dataclass(frozen=True)
class RankRequest:
    request_id: int
    user_id: int
    scenario: str  # a streaming.events.Scenario value
    candidates: np.ndarray  # int64 [M] track ids
    context: Mapping[str, float | int | str] = field(default_factory=dict)
    ts: int = 0  # simulated epoch ms of the request


@dataclass(frozen=True)
class RankResponse:
    request_id: int
    user_id: int
    candidates: np.ndarray  # int64 [M], as in the request
    scores: Mapping[str, np.ndarray]  # task -> float32 [M]; RANKING_SCORE is the one ranked by
    order: np.ndarray  # int64 [M], indices into candidates, best first
    model_name: str
    model_version: str

    @property
    def ranked_tracks(self) -> np.ndarray:
        return self.candidates[self.order]


class SequenceSource(Protocol):
    """Where rankers read user history (the Feast online store in the sandbox)."""

    def get_sequences(self, user_ids: Sequence[int]) -> dict[int, UserSequence]: ...


class Ranker(Protocol):
    name: str
    version: str

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]: ...


def order_by_score(score: np.ndarray) -> np.ndarray:
    """Best first; ties broken by candidate position so rankings are deterministic."""
    return np.lexsort((np.arange(len(score)), -np.asarray(score, dtype=np.float64))).astype(np.int64)


def order_rows_by_score(scores: np.ndarray, lengths: Sequence[int]) -> np.ndarray:
    """int64 [B, M]: row i's first lengths[i] entries are `order_by_score(scores[i, :lengths[i]])`.

    One sort for a batch of padded score rows instead of one per request: padding sorts
    last, and lexsort is stable, so ties still go by candidate position."""
    scores = np.asarray(scores, dtype=np.float64)
    padding = np.arange(scores.shape[1]) >= np.asarray(lengths, np.int64)[:, None]
    return np.lexsort((-scores, padding), axis=-1).astype(np.int64, copy=False)


@dataclass(frozen=True)
class SlateRequest:
    """What a client screen asks for: a ranked slate for one user in one scenario.

    The recommender (candidate generation then a ranker) turns it into a RankRequest.
    `context` carries scenario detail, e.g. {"query_genre": 3} for search or
    {"seed_track": 123} for radio.
    """

    request_id: int
    user_id: int
    scenario: str
    ts: int
    slate_size: int
    context: Mapping[str, float | int | str] = field(default_factory=dict)


class Recommender(Protocol):
    """Candidate generation + ranking; what the simulator talks to."""

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]: ...


@dataclass(frozen=True)
class TrackMetadata:
    """The public catalog: what the platform (and so any recommender) knows about tracks.

    Arrays are indexed by track_id (ids are 0..n_tracks-1). Hidden simulator state (latent
    vectors, true popularity) is deliberately not here.
    """

    artist_id: np.ndarray  # int64 [T]
    genre_id: np.ndarray  # int64 [T]
    duration_ms: np.ndarray  # int64 [T]
    release_ts: np.ndarray  # int64 [T], simulated epoch ms; unreleased tracks must not be served
    album_id: np.ndarray | None = None  # int64 [T], where the catalogue has albums (simulator user model 3)
    album_track: np.ndarray | None = None  # int64 [T], 0 for an album's first track

    @property
    def n_tracks(self) -> int:
        return len(self.artist_id)

    @property
    def n_artists(self) -> int:
        return int(self.artist_id.max()) + 1 if len(self.artist_id) else 0

    @property
    def n_genres(self) -> int:
        return int(self.genre_id.max()) + 1 if len(self.genre_id) else 0
