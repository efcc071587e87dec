"""Rankers an experiment adds around the product's own: the logging policy and reference arms.

- `ExploringRanker`: the warm-up's logging policy. A base ranker (popularity) whose slate
  positions each show, with probability `exploration`, a uniformly drawn candidate from
  below the slate instead. Without it the warm-up log holds only what popularity liked,
  and a model trained on it can learn little about the rest of the candidates.
- `OracleRanker`: orders the given candidates by the simulator's true engagement (the
  ceiling any learned ranker is measured against: regret, calibration).
- `DemoteBestRanker`: a base ranker with its best candidate moved to the end, an effect
  of known sign for calibration tests.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ranker.interface import RANKING_SCORE, RankRequest, RankResponse
from streaming.events import SCENARIO_CODE


def _reordered(response: RankResponse, order: np.ndarray, name: str) -> RankResponse:
    """`response` with a new order; the ranking score becomes rank-based so it agrees with it."""
    score = np.empty(len(order), np.float32)
    score[order] = np.linspace(1.0, 0.0, len(order), dtype=np.float32)
    return RankResponse(response.request_id, response.user_id, response.candidates, {RANKING_SCORE: score},
                        order.astype(np.int64), name, response.model_version)


class ExploringRanker:
    """Epsilon-exploration over a base ranker, per slate position; deterministic given the seed."""

    def __init__(self, base, exploration: float, slate_sizes: dict[str, int], seed: int) -> None:
        if not 0 <= exploration <= 1:
            raise ValueError(f"exploration must be in [0, 1], got {exploration}")
        self.base, self.exploration, self.slate_sizes = base, exploration, slate_sizes
        self.rng = np.random.default_rng(seed)
        self.name = f"{base.name}+explore"
        self.version = f"{base.version}-e{exploration:g}"

    def observe(self, events) -> None:
        self.base.observe(events)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        out = []
        for request, response in zip(requests, self.base.rank(requests)):
            order = response.order.copy()
            k, M = min(self.slate_sizes[request.scenario], len(order)), len(order)
            if M > k and self.exploration > 0:
                swap = np.flatnonzero(self.rng.random(k) < self.exploration)
                for i in swap.tolist():  # a random candidate from below the slate takes the position
                    j = int(self.rng.integers(k, M))
                    order[i], order[j] = order[j], order[i]
            out.append(_reordered(response, order, self.name))
        return out


class OracleRanker:
    """The given candidates ordered by the simulator's true P(full play | examined)."""

    name = "oracle"
    version = "1"

    def __init__(self, oracle) -> None:
        self.oracle = oracle

    def engagement(self, request) -> np.ndarray:
        """Per candidate, the true P(full play | examined) (the regret's yardstick)."""
        context = request.context
        return self.oracle.expected_engagement(
            request.user_id, np.asarray(request.candidates), SCENARIO_CODE[request.scenario], ts=request.ts,
            query_genre=int(context.get("query_genre", -1)), seed_track=int(context.get("seed_track", -1)))

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        out = []
        for request in requests:  # Oracle.rank: by score; in simulator user model 3, slate-aware
            context = request.context
            score, order = self.oracle.rank(
                request.user_id, np.asarray(request.candidates), SCENARIO_CODE[request.scenario], ts=request.ts,
                query_genre=int(context.get("query_genre", -1)), seed_track=int(context.get("seed_track", -1)))
            out.append(RankResponse(request.request_id, request.user_id, np.asarray(request.candidates, np.int64),
                                    {RANKING_SCORE: score}, order, self.name, self.version))
        return out


class DemoteBestRanker:
    """A base ranker whose top candidate is shown last: worse by construction."""

    def __init__(self, base) -> None:
        self.base = base
        self.name, self.version = f"{base.name}-demoted", base.version

    def observe(self, events) -> None:
        if hasattr(self.base, "observe"):
            self.base.observe(events)

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        return [_reordered(r, np.roll(r.order, -1), self.name) for r in self.base.rank(requests)]


class Handover:
    """One arm's ranker across the end of the warm-up: requests asked before `at_ts` go to
    the logging policy, the rest to the arm's own ranker.

    The simulator batches requests, so a slate asked in the last batch window of the warm-up
    is ranked just after the clock resumes at the A/B start; it is still a warm-up request
    (its ts says so) and must not be credited to, or served by, the arm under test."""

    def __init__(self, before, after, at_ts: int) -> None:
        self.before, self.after, self.at_ts = before, after, at_ts
        self.name, self.version = after.name, after.version

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        early = [i for i, r in enumerate(requests) if r.ts < self.at_ts]
        if not early:
            return self.after.rank(requests)
        late = [i for i, r in enumerate(requests) if r.ts >= self.at_ts]
        out: list[RankResponse | None] = [None] * len(requests)
        for rows, ranker in ((early, self.before), (late, self.after)):
            if rows:
                for i, response in zip(rows, ranker.rank([requests[i] for i in rows])):
                    out[i] = response
        return out  # type: ignore[return-value]
