"""A trained sequence model (ASTRO, SASRec- or HSTU-style) as a `Ranker` arm.

One `rank` call serves a batch of requests the way TURBO does: one feature-store read for
the batch's users, their history K/V from the per-user cache (extended or rebuilt only
where the sequence changed), then every request's candidates scored in one batched pass
over the stacked caches (single user, many items per row).

Device: CUDA when present (weights and cache in bf16, candidate attention through SDPA
with the SUMI mask), CPU otherwise (fp32, a split candidate softmax that skips the masked
M x M block, see `SoftmaxStack.candidate_attention`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ranker.batch import TASKS, RankBatch
from ranker.interface import RANKING_SCORE, RankRequest, RankResponse, SequenceSource, order_by_score
from features.sequence import UserSequence
from ranker.serving.cache import DEFAULT_BUDGET_BYTES, UserKVCache, history_batch, stack_histories
from ranker.models.base import SequenceRanker
from ranker.serving.stage_two import SCORING_PATHS, score_candidates
from streaming.events import SCENARIO_CODE, SCENARIOS

# A request's candidates are scored in chunks of `candidate_chunk` over one cached history
# (TURBO: the history is encoded once, whatever M is), so `max_candidates` is a guard against
# absurd requests, not a memory limit: large enough for a whole catalogue of 100k tracks.
DEFAULT_MAX_CANDIDATES = 100_000
DEFAULT_CANDIDATE_CHUNK = 1024
INT64_MAX = 2**63 - 1  # ids and timestamps are int64 in Feast, DuckDB and the model


def serving_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got {device!r}")
    return torch.device(device)


def prepare_for_serving(model: SequenceRanker, device: torch.device,
                        dtype: torch.dtype | None = None) -> SequenceRanker:
    """Eval mode on `device`; bf16 and fused SDPA on CUDA, fp32 and split candidate softmax on CPU.

    `dtype` overrides the weights' dtype (bf16 weights take SDPA on any device), so the CUDA
    serving configuration can be checked against fp32 on a machine without a GPU."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = model.to(device).eval().to(dtype)
    model.set_candidate_attention("sdpa" if device.type == "cuda" or dtype != torch.float32 else "split")
    return model


def check_request(request: RankRequest, n_tracks: int, max_candidates: int = DEFAULT_MAX_CANDIDATES) -> np.ndarray:
    """The request's candidates as int64, or a ValueError naming what is wrong with it."""
    where = f"request {request.request_id}"
    if not 0 <= request.user_id <= INT64_MAX:  # Feast keys users by int64
        raise ValueError(f"{where}: user_id {request.user_id} is outside [0, 2^63)")
    if request.scenario not in SCENARIO_CODE:
        raise ValueError(f"{where}: unknown scenario {request.scenario!r}; known: {list(SCENARIO_CODE)}")
    candidates = np.asarray(request.candidates)
    if candidates.ndim != 1 or (candidates.size and not np.issubdtype(candidates.dtype, np.integer)):
        raise ValueError(f"{where}: candidates must be a flat list of integer track ids, got dtype "
                         f"{candidates.dtype} and shape {candidates.shape}")
    if not 1 <= len(candidates) <= max_candidates:
        raise ValueError(f"{where}: needs 1 to {max_candidates} candidates, got {len(candidates)} "
                         f"(the service's max_candidates, CLIMBER_SERVE_MAX_CANDIDATES)")
    bad = (candidates < 0) | (candidates >= n_tracks)
    if bad.any():
        raise ValueError(f"{where}: candidate track id {int(candidates[bad][0])} is outside the model's "
                         f"catalogue [0, {n_tracks})")
    return candidates.astype(np.int64, copy=False)


def candidate_batch(requests: Sequence[RankRequest], candidates: Sequence[np.ndarray], device: torch.device) -> RankBatch:
    """The candidate half of a RankBatch (what `score_candidates` reads); history comes from the cache."""
    width = max(len(c) for c in candidates)
    tracks = np.zeros((len(requests), width), np.int64)
    for row, c in enumerate(candidates):
        tracks[row, : len(c)] = c + 1
    lengths = torch.tensor([len(c) for c in candidates])
    empty = torch.zeros(len(requests), 0, dtype=torch.int64, device=device)
    return RankBatch(
        history_tracks=empty, history_behaviours=empty, history_scenarios=empty, history_ts=empty,
        history_lengths=torch.zeros(len(requests), dtype=torch.int64, device=device),
        candidate_tracks=torch.from_numpy(tracks).to(device),
        candidate_mask=(torch.arange(width)[None, :] < lengths[:, None]).to(device),
        scenario=torch.tensor([SCENARIO_CODE[r.scenario] for r in requests], device=device),
        request_ts=torch.tensor([int(r.ts) for r in requests], dtype=torch.int64, device=device),
    )


def score_in_chunks(model: SequenceRanker, history, requests: Sequence[RankRequest],
                    candidates: Sequence[np.ndarray], chunk: int, device: torch.device,
                    path: str = "fast") -> np.ndarray:
    """float32 [B, max M, 1 + len(TASKS)]: ranking score then task probabilities, candidates
    scored `chunk` columns at a time against the same stacked history.

    Exact: a candidate attends to the history and to itself only (the SUMI mask), never to
    another candidate, so which candidates share a pass cannot change its score. A row with
    no candidates left in a chunk gets masked padding, whose scores are never read.
    `path`: stage two's implementation (ranker.serving.stage_two.SCORING_PATHS)."""
    if chunk < 1:
        raise ValueError(f"candidate_chunk must be >= 1, got {chunk}")
    width = max(len(c) for c in candidates)
    parts = []
    for start in range(0, width, chunk):
        batch = candidate_batch(requests, [c[start:start + chunk] for c in candidates], device)
        logits = score_candidates(model, history, batch, path)
        scores = torch.cat([model.score(logits, batch.candidate_mask)[..., None], torch.sigmoid(logits)], -1)
        parts.append(scores.float().cpu().numpy())
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


class NeuralRanker:
    """`Ranker` over a trained model, reading histories from a `SequenceSource` (Feast)."""

    def __init__(self, model: SequenceRanker, model_version: str, sequences: SequenceSource,
                 name: str | None = None, cache_bytes: int = DEFAULT_BUDGET_BYTES,
                 max_candidates: int = DEFAULT_MAX_CANDIDATES, device: str = "auto", kv_storage: str = "fp32",
                 candidate_chunk: int = DEFAULT_CANDIDATE_CHUNK, incremental: str = "fast",
                 window_hop: int = 1, stage_two: str = "fast") -> None:
        if candidate_chunk < 1:
            raise ValueError(f"candidate_chunk must be >= 1, got {candidate_chunk}")
        if stage_two not in SCORING_PATHS:
            raise ValueError(f"stage_two must be one of {SCORING_PATHS}, got {stage_two!r}")
        self.stage_two = stage_two  # candidates against the cache: "fast" (small fixed cost) or "reference"
        self.device = serving_device(device)
        self.model = prepare_for_serving(model, self.device)
        self.name = name or model.family
        self.version = str(model_version)
        self.sequences = sequences
        self.max_candidates = max_candidates
        self.candidate_chunk = candidate_chunk
        self.cache = UserKVCache(self.model, self.version, cache_bytes, incremental=incremental, kv_storage=kv_storage,
                                 window_hop=window_hop)

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path, sequences: SequenceSource, **kwargs) -> "NeuralRanker":
        """Load a `ranker.training.train` checkpoint (safetensors weights + JSON config, no pickles)."""
        from ranker.training.checkpoint import load_checkpoint  # training imports stay off the serving import path

        model, meta = load_checkpoint(checkpoint_dir)
        kwargs.setdefault("name", f"{meta['family']}-{meta['size']}")
        return cls(model, meta["model_version"], sequences, **kwargs)

    def reload(self, model: SequenceRanker, model_version: str) -> None:
        """Serve new weights; cached K/V of the old version are dropped (they are stale)."""
        self.model = prepare_for_serving(model, self.device)
        self.version = str(model_version)
        self.cache.set_model(self.model, self.version)

    def warm_up(self) -> None:
        """One throw-away forward, so the first real request does not pay for kernel set-up
        (hundreds of ms on CPU). Touches neither the cache nor the feature store."""
        with torch.inference_mode():
            history = history_batch([UserSequence.empty()], self.model.config.n_tracks, self.device)
            probe = RankRequest(request_id=-1, user_id=-1, scenario=SCENARIOS[0], candidates=np.zeros(1, np.int64))
            self.model.score_candidates(self.model.encode_history(history),
                                        candidate_batch([probe], [probe.candidates], self.device))

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        return self.rank_timed(requests)[0]

    def rank_timed(self, requests: Sequence[RankRequest]) -> tuple[list[RankResponse], dict[str, float]]:
        """Responses in request order, and seconds spent per stage (features, cache, model)."""
        if not requests:
            return [], {}
        candidates = [check_request(r, self.model.config.n_tracks, self.max_candidates) for r in requests]
        t0 = time.perf_counter()
        users = list(dict.fromkeys(int(r.user_id) for r in requests))
        found = self.sequences.get_sequences(users)
        t1 = time.perf_counter()
        per_user = dict(zip(users, self.cache.histories(users, [found[u] for u in users])))
        history = stack_histories([per_user[int(r.user_id)] for r in requests])
        t2 = time.perf_counter()
        with torch.inference_mode():
            scores = score_in_chunks(self.model, history, requests, candidates, self.candidate_chunk, self.device,
                                     self.stage_two)
        t3 = time.perf_counter()
        responses = []
        for row, (request, tracks) in enumerate(zip(requests, candidates)):
            table = scores[row, : len(tracks)]
            named = {RANKING_SCORE: table[:, 0].copy(), **{task: table[:, 1 + t].copy() for t, task in enumerate(TASKS)}}
            responses.append(RankResponse(
                request_id=request.request_id, user_id=request.user_id, candidates=tracks, scores=named,
                order=order_by_score(named[RANKING_SCORE]), model_name=self.name, model_version=self.version,
            ))
        return responses, {"features": t1 - t0, "cache": t2 - t1, "model": t3 - t2}
