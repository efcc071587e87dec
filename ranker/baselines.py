"""Non-neural rankers: the sandbox's default A/B test and the floor every model must beat.

- `PopularityRanker` (control): recency-decayed track popularity.
- `CooccurrenceRanker` (treatment): popularity + artist co-occurrence with the user's recent
  positive tokens + the user's genre affinity, minus a penalty for repeating an artist in
  the list (the k-th best track of an artist loses k * w_artist_repeat). Listeners tire of
  hearing one artist again and again (so does the simulated one); without the penalty the
  affinity terms fill slates with the user's favourite artist and lose to plain popularity.

Both learn online from the event stream (`observe`, subscribed to the bus) and read user
history through a `SequenceSource` (the Feast online store in the sandbox), as any ranker
must. Scoring is vectorised over the whole batch: candidates of all requests are padded
into one [B, M] matrix.

Co-occurrence is artist-level: a dense, decayed, symmetric n_artists x n_artists float32
matrix counting consecutive positive tokens (full play, like, share, add to playlist) in
each user's stream, between different artists (a run of one artist is not co-listening).
Artist level because track pairs are too sparse to learn from a few simulated days, and
the dense matrix keeps updates and lookups to single numpy gathers.
A pair's strength is the cosine C[a, b] / sqrt(d[a] d[b]) (d = row sums), which is in
[0, 1] and does not favour artists just for being popular; popularity is its own term.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ranker.candidates.generator import (
    DAY_MS,
    IS_POSITIVE,
    DecayClock,
    TrackPopularity,
    check_track_ids,
    history_profiles,
)
from ranker.interface import (
    RANKING_SCORE, RankRequest, RankResponse, SequenceSource, TrackMetadata, order_rows_by_score,
)
from streaming.events import EventBatch

MAX_ARTISTS = 8192  # a dense float32 matrix of this side is 256 MiB


class _PaddedCandidates:
    """Candidates of a batch of requests as one [B, M] matrix (-1 pad), checked against the catalog."""

    def __init__(self, requests: Sequence[RankRequest], n_tracks: int) -> None:
        lengths = [len(r.candidates) for r in requests]
        self.tracks = np.full((len(requests), max(lengths, default=0)), -1, np.int64)
        self.mask = np.arange(self.tracks.shape[1])[None, :] < np.array(lengths, np.int64)[:, None]
        if len(requests):
            flat = np.concatenate([np.asarray(r.candidates) for r in requests])
            try:  # one check for the batch; the slow loop only finds the culprit for the message
                check_track_ids(flat, n_tracks, "candidates")
            except ValueError:
                for request in requests:
                    check_track_ids(np.asarray(request.candidates), n_tracks,
                                    f"request {request.request_id} candidates")
                raise
            self.tracks[self.mask] = flat.astype(np.int64, copy=False)
        self.safe = np.maximum(self.tracks, 0)  # for gathers; padded slots are masked anyway


def _responses(requests: Sequence[RankRequest], scores: np.ndarray, name: str, version: str) -> list[RankResponse]:
    """One response per request from a [B, M] score matrix (padding ignored); the orders of
    all rows come from one sort (`order_rows_by_score`, the batched `order_by_score`)."""
    lengths = [len(request.candidates) for request in requests]
    scores = scores.astype(np.float32)  # responses carry float32 scores and are ordered by them
    orders = order_rows_by_score(scores, lengths)
    return [RankResponse(request_id=request.request_id, user_id=request.user_id,
                         candidates=np.asarray(request.candidates, np.int64),
                         scores={RANKING_SCORE: scores[row, :n].copy()}, order=orders[row, :n].copy(),
                         model_name=name, model_version=version)
            for row, (request, n) in enumerate(zip(requests, lengths))]


def rank_within_group(group: np.ndarray, score: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """int [B, M]: 0 for the best-scored item of its group in its row, 1 for the next, ...
    Ties go by `tie` (track id), so the result depends on the candidate set, not its order."""
    order = np.lexsort((tie, -score, group), axis=-1)
    rows = np.arange(len(group))[:, None]  # plain fancy indexing: take_along_axis costs more per call
    sorted_group = group[rows, order]
    index = np.arange(group.shape[1])
    new_run = np.ones(group.shape, bool)
    new_run[:, 1:] = sorted_group[:, 1:] != sorted_group[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, index, 0), axis=1)
    ranks = np.empty(group.shape, np.int64)
    ranks[rows, order] = index - run_start
    return ranks


class PopularityRanker:
    """Ranks by log-scaled, recency-decayed popularity, normalised to [0, 1] by the catalog maximum."""

    name = "popularity"
    version = "1"

    def __init__(self, metadata: TrackMetadata, sequences: SequenceSource | None = None,
                 half_life_ms: float = 3 * DAY_MS) -> None:
        self.metadata = metadata
        self.sequences = sequences  # unused: popularity is the same for everyone
        self.popularity = TrackPopularity(metadata.n_tracks, half_life_ms)

    def observe(self, events: EventBatch) -> None:
        self.popularity.observe(events)

    def popularity_feature(self, candidates: _PaddedCandidates, now_ts: int) -> np.ndarray:
        """log1p(decayed count) of each candidate over the catalog's largest. Decay and log1p
        are monotone, so the largest is log1p of the decayed largest count: only the
        candidates' counts are transformed, not the whole catalog's."""
        counts = self.popularity.at_tracks(candidates.safe, now_ts)
        top = np.log1p(self.popularity.max_at(now_ts))
        return np.log1p(counts) / max(top, 1e-12)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        if not requests:
            return []
        candidates = _PaddedCandidates(requests, self.metadata.n_tracks)
        now = max(r.ts for r in requests)
        return _responses(requests, self.popularity_feature(candidates, now), self.name, self.version)


class CooccurrenceRanker(PopularityRanker):
    """score = w_pop * popularity + w_cooc * artist co-occurrence + w_genre * genre affinity."""

    name = "cooccurrence"
    version = "1"

    def __init__(self, metadata: TrackMetadata, sequences: SequenceSource,
                 half_life_ms: float = 3 * DAY_MS, w_pop: float = 1.0, w_cooc: float = 1.0,
                 w_genre: float = 0.5, w_artist_repeat: float = 0.5, recent: int = 20,
                 recency_decay: float = 0.9) -> None:
        super().__init__(metadata, sequences, half_life_ms)
        if sequences is None:
            raise ValueError("CooccurrenceRanker needs a SequenceSource to read user history from")
        if metadata.n_artists > MAX_ARTISTS:
            raise ValueError(f"{metadata.n_artists} artists: the dense co-occurrence matrix allows "
                             f"at most {MAX_ARTISTS}")
        self.w_pop, self.w_cooc, self.w_genre, self.w_artist_repeat = w_pop, w_cooc, w_genre, w_artist_repeat
        self.recent = recent
        self.recency_weight = recency_decay ** np.arange(recent)  # most recent token weighs 1
        n = max(metadata.n_artists, 1)
        self.cooccurrence = np.zeros((n, n), np.float32)  # inflated by the decay clock
        self.degree = np.zeros(n, np.float64)  # row sums of `cooccurrence`
        self._clock = DecayClock(half_life_ms)
        self._last_artist: dict[int, int] = {}  # user -> artist of their latest positive token

    def observe(self, events: EventBatch) -> None:
        super().observe(events)
        positive = np.flatnonzero(IS_POSITIVE[events.behaviour])  # only the columns used, not events.select
        if len(positive) == 0:
            return
        check_track_ids(events.track_id[positive], self.metadata.n_tracks, "events")
        order = positive[np.lexsort((events.event_id[positive], events.user_id[positive]))]
        users, ts = events.user_id[order], events.ts[order]
        artists = self.metadata.artist_id[events.track_id[order]]
        new_user = np.ones(len(users), bool)
        new_user[1:] = users[1:] != users[:-1]
        previous = np.empty_like(artists)
        previous[1:] = artists[:-1]
        firsts = np.flatnonzero(new_user)
        previous[firsts] = [self._last_artist.get(u, -1) for u in users[firsts].tolist()]
        lasts = np.append(firsts[1:], len(users)) - 1
        self._last_artist.update(zip(users[lasts].tolist(), artists[lasts].tolist()))

        paired = (previous >= 0) & (previous != artists)  # an artist run is not co-listening
        if not paired.any():
            return
        a, b = previous[paired], artists[paired]
        weight = self._clock.weights(ts[paired], [self.cooccurrence, self.degree])
        # Both directions in one unbuffered add: each cell gets the same additions in the same order.
        weight32 = weight.astype(np.float32)
        np.add.at(self.cooccurrence, (np.concatenate([a, b]), np.concatenate([b, a])),
                  np.concatenate([weight32, weight32]))
        n = len(self.degree)
        self.degree += np.bincount(a, weights=weight, minlength=n) + np.bincount(b, weights=weight, minlength=n)

    def cooccurrence_feature(self, recent_artists: np.ndarray, candidate_artists: np.ndarray) -> np.ndarray:
        """float32 [B, M]: recency-weighted mean cosine between the user's recent artists
        ([B, R], -1 pad) and each candidate's artist ([B, M])."""
        weight = np.where(recent_artists >= 0, self.recency_weight[None, : recent_artists.shape[1]], 0.0)
        weight /= np.maximum(weight.sum(axis=1, keepdims=True), 1e-12)
        mine = np.maximum(recent_artists, 0)
        n = self.cooccurrence.shape[1]
        counts = self.cooccurrence.ravel()[(mine * n)[:, :, None] + candidate_artists[:, None, :]]
        cosine = (counts * self._inv_sqrt_degree(mine)[:, :, None]
                  * self._inv_sqrt_degree(candidate_artists)[:, None, :])
        return (weight.astype(np.float32)[:, None, :] @ cosine)[:, 0, :]

    def _inv_sqrt_degree(self, artists: np.ndarray) -> np.ndarray:
        """float32 1/sqrt(degree) of `artists` (0 for an artist never co-listened); only the
        artists asked for, not the whole catalog, since a batch needs a few hundred."""
        degree = self.degree[artists]
        return np.divide(1.0, np.sqrt(degree), out=np.zeros_like(degree), where=degree > 0).astype(np.float32)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        if not requests:
            return []
        meta = self.metadata
        candidates = _PaddedCandidates(requests, meta.n_tracks)
        users = [r.user_id for r in requests]
        profile = history_profiles(self.sequences.get_sequences(sorted(set(users))), users, meta, self.recent)
        popularity = self.popularity_feature(candidates, max(r.ts for r in requests))
        artists = meta.artist_id[candidates.safe]
        cooccurrence = self.cooccurrence_feature(profile.recent_artists, artists)
        genre = profile.genre_share[np.arange(len(requests))[:, None], meta.genre_id[candidates.safe]]
        score = self.w_pop * popularity + self.w_cooc * cooccurrence + self.w_genre * genre
        # Diversity: the k-th best track of an artist in the list loses k * w_artist_repeat.
        repeats = rank_within_group(artists, score, candidates.tracks)
        return _responses(requests, score - self.w_artist_repeat * repeats, self.name, self.version)


# The non-neural rankers by the name settings use for them (e.g. experiment arms).
BASELINE_RANKERS: dict[str, type[PopularityRanker]] = {
    PopularityRanker.name: PopularityRanker,
    CooccurrenceRanker.name: CooccurrenceRanker,
}
