"""A learned candidate source: a next-item checkpoint's top K of the catalogue per request.

`climber sandbox --candidates model:CHECKPOINT` puts it in place of the heuristic sources
(`CandidateGenerator`), so retrieval and ranking can both be learned in the closed loop.
A model trained with the next-item objective (`climber train --split loo --objective
next-item`) reads the user's history and scores every track at once: its last history
output against the item table (`sequence_output`, `next_item_logits`), as HSTU and SASRec
retrieve. An impression-trained checkpoint has no such output (its heads score given
candidates), so it is refused with the reason.

Excluded exactly as the heuristic sources exclude: tracks not released at the request's
time, a radio request's own seed track, and for search anything outside the query (the
query genre's tracks and the query artist's). A user with no history yet (a cold start)
has nothing for the model to read, so their requests take the heuristic sources. Scores
are ranked best first, ties by track id; `top_k_reference` is the plain per-row sort the
batched `top_k` must match (tests check it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from features.sequence import UserSequence
from ranker.candidates.generator import SOURCE_CODE, CandidateGenerator, _RequestBatch
from ranker.interface import SequenceSource, SlateRequest, TrackMetadata
from ranker.models.base import SequenceRanker
from streaming.events import SCENARIO_CODE

MODEL_SOURCE = "model"
PREFIX = "model:"


def load_next_item_checkpoint(checkpoint: str | Path) -> tuple[SequenceRanker, dict]:
    """The model of a next-item checkpoint, or a ValueError saying why this one cannot retrieve."""
    from ranker.training.checkpoint import load_checkpoint, read_checkpoint_meta

    meta = read_checkpoint_meta(checkpoint)
    objective = meta.get("objective", "impression")
    if objective != "next_item":
        raise ValueError(f"{checkpoint}: trained with the {objective} objective; a candidate source needs a "
                         "checkpoint trained with the next-item objective (climber train --split loo "
                         "--objective next-item), which scores the whole catalogue from a history")
    model, meta = load_checkpoint(checkpoint)
    return model, meta


def eligible_tracks(metadata: TrackMetadata, batch: _RequestBatch) -> np.ndarray:
    """bool [B, T]: what each request may be offered (see the module docstring)."""
    ok = metadata.release_ts[None, :] <= batch.ts[:, None]
    radio = np.flatnonzero(batch.seed_track >= 0)
    ok[radio, batch.seed_track[radio]] = False
    search = np.flatnonzero(batch.scenario == SCENARIO_CODE["search"])
    in_query = metadata.genre_id[None, :] == batch.query_genre[search, None]
    has_artist = batch.query_artist[search, None] >= 0
    in_query |= has_artist & (metadata.artist_id[None, :] == batch.query_artist[search, None])
    ok[search] &= in_query
    return ok


def top_k(scores: np.ndarray, eligible: np.ndarray, k: int) -> list[np.ndarray]:
    """Per row the ids of its k best eligible scores, best first, ties by id: one stable
    sort of the whole masked matrix."""
    masked = np.where(eligible, scores, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    kept = np.take_along_axis(eligible, order, 1)
    return [row[keep].astype(np.int64) for row, keep in zip(order, kept)]


def top_k_reference(scores: np.ndarray, eligible: np.ndarray, k: int) -> list[np.ndarray]:
    """The plain version: each row's eligible ids sorted by score (stable: ties by id), cut to k."""
    out = []
    for row in range(len(scores)):
        ids = np.flatnonzero(eligible[row])
        ids = ids[np.argsort(-scores[row, ids], kind="stable")]
        out.append(ids[:k].astype(np.int64))
    return out


class ModelCandidates:
    """`CandidateGenerator`'s interface (`generate`, `generate_with_sources`, `observe`,
    `n_candidates`) over a next-item model; `fallback` serves cold users and learns popularity."""

    def __init__(self, model: SequenceRanker, metadata: TrackMetadata, sequences: SequenceSource,
                 fallback: CandidateGenerator, name: str = "model") -> None:
        if model.config.n_tracks < metadata.n_tracks:
            raise ValueError(f"{name}: the model knows {model.config.n_tracks} tracks but the catalog has "
                             f"{metadata.n_tracks}; train it on a run with the same --tracks and --seed")
        self.model = model.eval()
        self.metadata = metadata
        self.sequences = sequences
        self.fallback = fallback
        self.n_candidates = fallback.n_candidates
        self.name = name

    @classmethod
    def from_spec(cls, spec: str, metadata: TrackMetadata, sequences: SequenceSource,
                  fallback: CandidateGenerator) -> "ModelCandidates":
        """`model:CHECKPOINT` -> the source (what `--candidates` names)."""
        if not spec.startswith(PREFIX):
            raise ValueError(f"a learned candidate source is named {PREFIX}CHECKPOINT, got {spec!r}")
        model, _ = load_next_item_checkpoint(spec.removeprefix(PREFIX))
        return cls(model, metadata, sequences, fallback, name=spec)

    def observe(self, events) -> None:
        self.fallback.observe(events)

    @torch.inference_mode()
    def scores(self, windows: Sequence[UserSequence]) -> np.ndarray:
        """float32 [len(windows), T]: next-item scores of every catalogue track after each history."""
        from ranker.serving.cache import history_batch

        batch = history_batch(windows, self.model.config.n_tracks)
        hidden = self.model.sequence_output(batch)  # [B, n, d]
        last = hidden[torch.arange(len(windows)), batch.history_lengths - 1]  # [B, d]
        return self.model.next_item_logits(last)[:, : self.metadata.n_tracks].float().numpy()

    def generate(self, requests: Sequence[SlateRequest]) -> list[np.ndarray]:
        return [tracks for tracks, _ in self.generate_with_sources(requests)]

    def generate_with_sources(self, requests: Sequence[SlateRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per request (track ids best first, source codes): `model` for users with a history,
        the heuristic sources for cold users."""
        if not requests:
            return []
        from ranker.serving.cache import model_window

        eligible = eligible_tracks(self.metadata, _RequestBatch.of(requests, self.metadata))  # checks contexts
        found = self.sequences.get_sequences(sorted({int(r.user_id) for r in requests}))
        windows = [model_window(found.get(int(r.user_id)) or UserSequence.empty(), self.model.config.max_len)
                   for r in requests]
        warm = [i for i, w in enumerate(windows) if len(w)]
        cold = [i for i, w in enumerate(windows) if not len(w)]
        out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(requests)
        if warm:
            picked = top_k(self.scores([windows[i] for i in warm]), eligible[warm], self.n_candidates)
            for i, tracks in zip(warm, picked):
                out[i] = (tracks, np.full(len(tracks), SOURCE_CODE[MODEL_SOURCE], np.int8))
        if cold:
            for i, result in zip(cold, self.fallback.generate_with_sources([requests[i] for i in cold])):
                out[i] = result
        return out  # type: ignore[return-value]
