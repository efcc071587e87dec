"""Two reference recommenders: the floor (random) and the ceiling (the oracle).

Both are real policies speaking the `Recommender` contract, useful as A/B reference arms
and in tests: any learned ranker should land between them. Both draw candidates uniformly
from the tracks released at the request's time, never a track before its release.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from ranker.interface import RANKING_SCORE, RankResponse, SlateRequest, TrackMetadata, order_by_score
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch

if TYPE_CHECKING:
    from simulator.platform import MusicPlatform


class RandomRecommender:
    """Uniformly random released tracks, in random order.

    Each request gets max(slate_size, n_candidates) distinct tracks (fewer only if fewer
    are released). The draw order is the ranking, so scores simply descend.
    """

    name = "random"
    version = "1"

    def __init__(self, metadata: TrackMetadata, seed: int = 0, n_candidates: int = 0) -> None:
        if n_candidates < 0:
            raise ValueError(f"n_candidates: must be >= 0, got {n_candidates}")
        self.by_release = np.argsort(metadata.release_ts, kind="stable")
        self.sorted_release_ts = metadata.release_ts[self.by_release]
        self.n_candidates = n_candidates
        self.rng = np.random.default_rng(seed)
        self._ranking: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # M -> (scores, order), read-only

    def candidates(self, requests: Sequence[SlateRequest]) -> list[np.ndarray]:
        """Distinct released tracks per request, drawn for the whole batch at once."""
        if not requests:
            return []
        ts = np.array([r.ts for r in requests], dtype=np.int64)
        wanted = np.array([max(r.slate_size, self.n_candidates) for r in requests], dtype=np.int64)
        released = np.searchsorted(self.sorted_release_ts, ts, side="right")
        size = np.minimum(wanted, released)
        M = int(size.max())
        picks = (self.rng.random((len(requests), M)) * released[:, None]).astype(np.int64)
        ordered = np.sort(picks, axis=1)
        in_row = np.arange(M) < size[:, None]
        repeated = ((ordered[:, 1:] == ordered[:, :-1]) & in_row[:, 1:]).any(axis=1)
        tracks = self.by_release[picks].astype(np.int64)  # one gather for the batch; rows are sliced from it
        out = []
        for row, (n, redraw) in enumerate(zip(size.tolist(), repeated.tolist())):
            if redraw:  # rare in a big catalog; redraw the row without replacement
                out.append(self.by_release[self.rng.choice(released[row], n, replace=False)].astype(np.int64))
            else:
                out.append(tracks[row, :n])
        return out

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]:
        responses = []
        for request, candidates in zip(requests, self.candidates(requests)):
            score, order = self._draw_order(len(candidates))
            responses.append(RankResponse(request.request_id, request.user_id, candidates, {RANKING_SCORE: score},
                                          order, self.name, self.version))
        return responses

    def _draw_order(self, M: int) -> tuple[np.ndarray, np.ndarray]:
        if M not in self._ranking:
            score, order = np.linspace(1.0, 0.0, M, dtype=np.float32), np.arange(M, dtype=np.int64)
            score.flags.writeable = order.flags.writeable = False
            self._ranking[M] = score, order
        return self._ranking[M]


class OracleRecommender:
    """Random released candidates ranked by the simulator's true engagement (oracle.py; in user
    model 3 the top of the slate is ordered for the within-slate fatigue too: `Oracle.rank`).

    With the same candidates a learned ranker could not order them better on average, so
    its regret against this arm is the ranker's own error.
    """

    name = "oracle"
    version = "1"

    def __init__(self, platform: "MusicPlatform", n_candidates: int = 100, seed: int = 0) -> None:
        self.oracle = platform.oracle
        self.candidate_source = RandomRecommender(platform.catalog.metadata(), seed, n_candidates)

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]:
        responses = []
        for request, candidates in zip(requests, self.candidate_source.candidates(requests)):
            context = request.context
            score, order = self.oracle.rank(
                request.user_id, candidates, SCENARIO_CODE[request.scenario], ts=request.ts,
                query_genre=int(context.get("query_genre", -1)), seed_track=int(context.get("seed_track", -1)))
            responses.append(RankResponse(request.request_id, request.user_id, candidates,
                                          {RANKING_SCORE: score}, order, self.name, self.version))
        return responses


class PopularityRecommender:
    """Most played tracks, learned online from the event log (`observe` each EventBatch).

    Candidates are drawn in proportion to (plays + 1) among released tracks, then ranked by
    plays: a rich-get-richer policy, the other extreme from random for the stylised facts.
    """

    name = "popularity"
    version = "1"

    def __init__(self, metadata: TrackMetadata, seed: int = 0, n_candidates: int = 100) -> None:
        self.release_ts = metadata.release_ts
        self.plays = np.zeros(metadata.n_tracks, np.float64)
        self.n_candidates = n_candidates
        self.rng = np.random.default_rng(seed)

    def observe(self, events: EventBatch) -> None:
        played = events.behaviour == BEHAVIOUR_CODE["play"]
        self.plays += np.bincount(events.track_id[played], minlength=len(self.plays))

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]:
        if not requests:
            return []
        # Released by the earliest request of the batch, so released for every request in it.
        earliest = min(r.ts for r in requests)
        cumulative = np.cumsum(np.where(self.release_ts <= earliest, self.plays + 1.0, 0.0))
        responses = []
        for request in requests:
            wanted = max(request.slate_size, self.n_candidates)
            picks = np.searchsorted(cumulative, self.rng.random(2 * wanted) * cumulative[-1], side="right")
            candidates = np.unique(picks)[:wanted].astype(np.int64)
            score = self.plays[candidates].astype(np.float32)
            responses.append(RankResponse(request.request_id, request.user_id, candidates,
                                          {RANKING_SCORE: score}, order_by_score(score), self.name, self.version))
        return responses


class ShuffledRecommender:
    """Another recommender's candidates in random order: a ranker worse by design.

    For the users where `shuffle[user_id]` is True (all users when None) the inner
    recommender's candidates are kept and their order is a random permutation; other users
    get the inner response untouched. One platform can so host both arms of an A/B test
    whose only difference is the ranking, which is what retention must be able to see.
    """

    name = "shuffled"
    version = "1"

    def __init__(self, inner, seed: int = 0, shuffle: np.ndarray | None = None) -> None:
        self.inner, self.shuffle = inner, shuffle
        self.rng = np.random.default_rng(seed)

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]:
        responses = self.inner.recommend(requests)
        out = []
        for response in responses:
            if self.shuffle is not None and not self.shuffle[response.user_id]:
                out.append(response)
                continue
            M = len(response.candidates)
            order = self.rng.permutation(M).astype(np.int64)
            score = np.empty(M, np.float32)
            score[order] = np.linspace(1.0, 0.0, M, dtype=np.float32)
            out.append(RankResponse(response.request_id, response.user_id, response.candidates,
                                    {RANKING_SCORE: score}, order, self.name, self.version))
        return out
