"""The recommender the simulator talks to: candidate generation, then the ranker of each user's arm.

One `recommend` call handles a whole batch of slate requests: candidates for all of them in
one vectorised pass, then one `rank` call per arm with that arm's requests, so a neural
ranker still sees a full batch however traffic is split. Responses come back in request
order, and `on_response(request, response, arm)` sees each one (the sandbox logs requests
and impressions to DuckDB there).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from ranker.candidates.generator import CandidateGenerator
from ranker.interface import Ranker, RankRequest, RankResponse, SlateRequest

ResponseHook = Callable[[SlateRequest, RankResponse, str], None]


class Watch(Protocol):
    """Where the sandbox's stopwatch learns how a batch splits between candidates and scoring."""

    def time(self, component: str) -> AbstractContextManager: ...


class _NoWatch:
    def time(self, component: str) -> AbstractContextManager:
        return nullcontext()


class ArmRecommender:
    """Routes each user to the ranker of their experiment arm.

    `arms` maps user id to arm label: a mapping, or an array indexed by user id (what
    `experiments.assignment.assign_arms` returns for user ids 0..n-1).
    """

    def __init__(self, candidates: CandidateGenerator, rankers: Mapping[str, Ranker],
                 arms: Mapping[int, str] | np.ndarray, on_response: ResponseHook | None = None,
                 watch: Watch | None = None) -> None:
        labels = set(arms.values()) if isinstance(arms, Mapping) else set(np.unique(np.asarray(arms)).tolist())
        missing = labels - set(rankers)
        if missing:
            raise ValueError(f"no ranker for arm(s) {sorted(missing)}; rankers are for {sorted(rankers)}")
        self.candidates = candidates
        self.rankers = dict(rankers)
        self.arms = arms
        self.on_response = on_response
        self.watch = watch or _NoWatch()

    def arm_of(self, user_id: int) -> str:
        try:
            if user_id < 0:  # an array would wrap a negative index around
                raise KeyError(user_id)
            return str(self.arms[user_id])
        except (KeyError, IndexError):
            raise ValueError(f"user {user_id} has no experiment arm") from None

    def recommend(self, requests: Sequence[SlateRequest]) -> list[RankResponse]:
        if not requests:
            return []
        too_long = [r.request_id for r in requests if r.slate_size > self.candidates.n_candidates]
        if too_long:
            raise ValueError(f"request(s) {too_long[:5]} ask for a slate longer than the "
                             f"{self.candidates.n_candidates} candidates generated")
        arms = [self.arm_of(r.user_id) for r in requests]
        with self.watch.time("candidate generation"):
            generated = self.candidates.generate(requests)
        rank_requests = [
            RankRequest(request_id=r.request_id, user_id=r.user_id, scenario=r.scenario,
                        candidates=tracks, context=r.context, ts=r.ts)
            for r, tracks in zip(requests, generated)
        ]
        responses: list[RankResponse | None] = [None] * len(requests)
        for arm in sorted(set(arms)):  # sorted: the same call order on every run
            rows = [i for i, a in enumerate(arms) if a == arm]
            with self.watch.time("scoring"):
                ranked = self.rankers[arm].rank([rank_requests[i] for i in rows])
            if len(ranked) != len(rows):
                raise RuntimeError(f"ranker {self.rankers[arm].name!r} returned {len(ranked)} responses "
                                   f"for {len(rows)} requests")
            for i, response in zip(rows, ranked):
                if response.request_id != requests[i].request_id:
                    raise RuntimeError(f"ranker {self.rankers[arm].name!r} answered request "
                                       f"{response.request_id} in the place of {requests[i].request_id}")
                responses[i] = response
        if self.on_response is not None:
            for request, served, arm in zip(requests, responses, arms):
                self.on_response(request, served, arm)
        return responses  # type: ignore[return-value]
