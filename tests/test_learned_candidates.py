"""`--candidates model:CHECKPOINT`: a next-item checkpoint's top K of the catalogue as the
sandbox's candidate source, minus what the heuristic sources exclude."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from features.sequence import UserSequence
from ranker.candidates.generator import SOURCE_CODE, CandidateGenerator
from ranker.candidates.learned import ModelCandidates, load_next_item_checkpoint, top_k, top_k_reference
from ranker.interface import SlateRequest, TrackMetadata
from ranker.models import build_model
from ranker.serving.cache import model_window
from ranker.training.checkpoint import save_checkpoint
from ranker.training.data import load_request_log
from ranker.training.importer import import_interactions
from ranker.training.loo import leave_one_out
from ranker.training.next_item import train_next_item
from sandbox.settings import SandboxSettings
from tests.support import TINY_ASTRO, DictSequenceSource

TINY_INTER = Path(__file__).parent / "data" / "tiny.inter"  # RecBole's format: 12 users, 30 items
NOW = 1_800_000_000_000


@pytest.fixture(scope="module")
def next_item_checkpoint(tmp_path_factory) -> tuple[Path, int]:
    """A tiny ASTRO trained one epoch with the next-item objective on tiny.inter."""
    root = tmp_path_factory.mktemp("learned")
    import_interactions(TINY_INTER, root / "tiny.duckdb", {"user": "user_id", "item": "item_id",
                                                           "timestamp": "timestamp"}, negatives="none")
    split = leave_one_out(load_request_log(root / "tiny.duckdb"))
    torch.manual_seed(0)
    train_next_item("astro", "xs", split, root / "astro", epochs=1, batch_size=8, max_len=8,
                    model_overrides={k: v for k, v in TINY_ASTRO.items() if k != "max_len"}, say=lambda _: None)
    return root / "astro", split.n_tracks


def catalogue(n_tracks: int) -> TrackMetadata:
    """Artist a owns tracks 3a..3a+2, genre = artist % 2; track 4 is released only after NOW."""
    track = np.arange(n_tracks)
    release = np.where(track == 4, NOW + 1, 0).astype(np.int64)
    return TrackMetadata(artist_id=track // 3, genre_id=(track // 3) % 2, duration_ms=np.full(n_tracks, 180_000),
                         release_ts=release)


def history(tracks, start: int = NOW - 3_600_000) -> UserSequence:
    n = len(tracks)
    return UserSequence(np.asarray(tracks, np.int64), np.full(n, 2, np.int8), np.zeros(n, np.int8),
                        start + 60_000 * np.arange(n, dtype=np.int64), n - 1)


def test_model_source_ranks_the_catalogue_minus_what_the_heuristics_exclude(next_item_checkpoint):
    checkpoint, n_tracks = next_item_checkpoint
    meta = catalogue(n_tracks)
    sequences = DictSequenceSource({1: history([3, 7, 8, 9, 12, 1, 5, 6, 2, 10, 11]), 2: history([4, 5])})
    k = n_tracks - 2  # past every eligible set but the home feed's: a missed exclusion shows
    fallback = CandidateGenerator(meta, seed=0, n_candidates=k, sequences=sequences)
    source = ModelCandidates.from_spec(f"model:{checkpoint}", meta, sequences, fallback)
    requests = [SlateRequest(1, 1, "home_feed", NOW, 5), SlateRequest(2, 2, "radio", NOW, 5, {"seed_track": 6}),
                SlateRequest(3, 1, "search", NOW, 5, {"query_genre": 1}), SlateRequest(4, 99, "daily_mix", NOW, 5)]
    got = source.generate_with_sources(requests)
    track = np.arange(n_tracks)
    allowed = {1: track != 4, 2: (track != 4) & (track != 6), 3: (track != 4) & ((track // 3) % 2 == 1)}
    for request, (tracks, codes) in zip(requests[:3], got[:3]):
        window = model_window(sequences.sequences[request.user_id], source.model.config.max_len)
        scores = source.scores([window])  # one history alone: no padding from other rows
        expected = top_k_reference(scores, allowed[request.request_id][None], k)[0]
        np.testing.assert_array_equal(tracks, expected)
        assert (codes == SOURCE_CODE["model"]).all() and len(tracks) == min(k, allowed[request.request_id].sum())
        assert 4 not in tracks and (request.scenario != "radio" or 6 not in tracks)
    batched = source.scores([model_window(sequences.sequences[u], 8) for u in (1, 2)])
    np.testing.assert_allclose(batched[1], source.scores([model_window(sequences.sequences[2], 8)])[0], atol=1e-5)
    cold_tracks, cold_codes = got[3]  # user 99 has no history: the heuristic sources
    assert 0 < len(cold_tracks) <= k and not (cold_codes == SOURCE_CODE["model"]).any()
    with pytest.raises(ValueError, match="the model knows"):
        ModelCandidates.from_spec(f"model:{checkpoint}", catalogue(n_tracks + 1), sequences, fallback)


@pytest.mark.parametrize("seed", range(3))
def test_batched_top_k_matches_the_per_row_sort(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, (6, 40)).astype(np.float32)  # many ties: broken by track id
    eligible = rng.random((6, 40)) < 0.3
    for k in (1, 5, 40):
        for fast, slow in zip(top_k(scores, eligible, k), top_k_reference(scores, eligible, k)):
            np.testing.assert_array_equal(fast, slow)


def test_a_checkpoint_not_trained_for_next_item_is_refused(tmp_path, next_item_checkpoint):
    model = build_model("astro", "xs", 30, **TINY_ASTRO)
    save_checkpoint(tmp_path / "impression", model, torch.optim.AdamW(model.parameters()), "astro", "xs", 0,
                    {"objective": "impression"})
    with pytest.raises(ValueError, match="trained with the impression objective.*next-item objective"):
        load_next_item_checkpoint(tmp_path / "impression")
    with pytest.raises(ValidationError, match="trained with the impression objective"):
        SandboxSettings(candidates=f"model:{tmp_path / 'impression'}")
    with pytest.raises(ValidationError, match="no checkpoint at"):
        SandboxSettings(candidates=f"model:{tmp_path / 'missing'}")
    with pytest.raises(ValidationError, match="'heuristic' or 'model:<checkpoint dir>'"):
        SandboxSettings(candidates="popular")
    assert SandboxSettings(candidates=f"model:{next_item_checkpoint[0]}").candidates.startswith("model:")
