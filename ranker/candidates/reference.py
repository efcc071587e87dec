"""Candidate generation's plain references: one user, one source at a time.

`history_profiles` and `CandidateGenerator.generate_with_sources` work on whole request
batches (and the stage merge in compiled loops, ranker/candidates/kernels.py); these are
the obviously-correct versions the tests hold them to (tests/test_baseline_ranker.py).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from features.sequence import UserSequence
from ranker.candidates.generator import (
    BACKFILL, IS_POSITIVE, OVERSAMPLE, RANDOM_SOURCES, SOURCE_CODE, SOURCES, CandidateGenerator, HistoryProfile,
    _RequestBatch, check_track_ids, first_occurrence,
)
from ranker.interface import SlateRequest, TrackMetadata


def history_profiles_reference(sequences: Mapping[int, UserSequence], user_ids: Sequence[int],
                               metadata: TrackMetadata, recent: int = 32) -> HistoryProfile:
    """`history_profiles` one user at a time: the plain statement of what it computes."""
    n_users, n_genres = len(user_ids), max(metadata.n_genres, 1)
    recent_tracks = np.full((n_users, recent), -1, np.int64)
    positives = []
    for row, user in enumerate(user_ids):
        sequence = sequences.get(int(user))
        if sequence is None or len(sequence) == 0:
            positives.append(np.zeros(0, np.int64))
            continue
        tracks = sequence.track_ids[IS_POSITIVE[sequence.behaviours]]
        positives.append(tracks)
        latest = tracks[-recent:][::-1]
        recent_tracks[row, : len(latest)] = latest
    flat = np.concatenate(positives) if positives else np.zeros(0, np.int64)
    check_track_ids(flat, metadata.n_tracks, "user sequences")
    rows = np.repeat(np.arange(n_users), [len(p) for p in positives])
    counts = np.bincount(rows * n_genres + metadata.genre_id[flat], minlength=n_users * n_genres)
    counts = counts.reshape(n_users, n_genres).astype(np.float64)
    genre_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    recent_artists = np.where(recent_tracks >= 0, metadata.artist_id[np.maximum(recent_tracks, 0)], -1)
    return HistoryProfile(recent_tracks, recent_artists, genre_share)


def generate_with_sources_reference(generator: CandidateGenerator, requests: Sequence[SlateRequest]
                                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """`generate_with_sources` one source at a time: the plain statement of what it does."""
    if not requests:
        return []
    batch = _RequestBatch.of(requests, generator.metadata)
    generator._refresh(int(batch.ts.max()))
    n_rows, quota = len(requests), generator.quota[batch.scenario]
    taken = np.zeros((n_rows, generator.metadata.n_tracks), bool)  # already a candidate of the row
    radio = np.flatnonzero(batch.seed_track >= 0)
    taken[radio, batch.seed_track[radio]] = True  # radio never proposes its own seed
    picked, codes = [], []

    def take(rows: np.ndarray, proposed: np.ndarray, limit: np.ndarray, code: int, may_repeat: bool) -> np.ndarray:
        kept = take_reference(generator, rows, proposed, limit, batch.ts[rows], taken, may_repeat)
        column = np.full((n_rows, proposed.shape[1]), -1, np.int64)
        column[rows] = np.where(kept, proposed, -1)
        picked.append(column)
        codes.append(np.full(proposed.shape[1], code, np.int8))
        return kept.sum(axis=1)

    for code, source in enumerate(SOURCES):
        rows = np.flatnonzero(quota[:, code])  # only requests whose scenario uses the source
        if len(rows):
            k = int(quota[rows, code].max()) * OVERSAMPLE
            take(rows, generator._propose(source, rows, k, batch), quota[rows, code], code, source in RANDOM_SOURCES)
    # Backfill what the quotas left empty, from each scenario's backfill sources in turn.
    missing = np.full(n_rows, generator.n_candidates) - sum((p >= 0).sum(axis=1) for p in picked)
    for stage in range(max(len(order) for order in generator.backfill)):
        stage_source = np.array([order[stage] if stage < len(order) else "" for order in generator.backfill])
        for source in dict.fromkeys(stage_source[batch.scenario]):
            rows = np.flatnonzero((stage_source[batch.scenario] == source) & (missing > 0))
            if source and len(rows):
                k = generator.n_candidates + int(missing[rows].max()) * OVERSAMPLE  # top lists restart at the top
                proposed = generator._propose(source, rows, k, batch)
                missing[rows] -= take(rows, proposed, missing[rows], SOURCE_CODE[BACKFILL], source in RANDOM_SOURCES)
    tracks, labels = np.concatenate(picked, axis=1), np.concatenate(codes)
    found = tracks >= 0
    ends = np.cumsum(found.sum(axis=1))[:-1]
    return list(zip(np.split(tracks[found], ends), np.split(np.broadcast_to(labels, tracks.shape)[found], ends)))


def take_reference(generator: CandidateGenerator, rows: np.ndarray, proposed: np.ndarray, quota: np.ndarray,
                   ts: np.ndarray, taken: np.ndarray, may_repeat: bool) -> np.ndarray:
    """Mask of the proposals kept for `rows`: released, not yet taken by the row, the first
    `quota` per row. `may_repeat`: the proposals can hold a track twice (random draws)."""
    flat = rows[:, None] * taken.shape[1] + np.maximum(proposed, 0)  # index into taken.ravel()
    ok = (proposed >= 0) & (generator.metadata.release_ts[np.maximum(proposed, 0)] <= ts[:, None])
    ok &= ~taken.ravel()[flat]
    if may_repeat:
        ok &= first_occurrence(proposed)
    keep = ok & (np.cumsum(ok, axis=1) <= quota[:, None])
    taken.ravel()[flat[keep]] = True
    return keep

