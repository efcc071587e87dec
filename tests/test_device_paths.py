"""The serving configuration of a device (bf16 weights and K/V, SDPA candidate attention:
what CUDA serves) against the fp32 reference on CPU, and long histories against a full
recompute. `climber bench gpu` runs this file first on the device it benchmarks
(CLIMBER_TEST_DEVICE=cuda); `make test` runs it on CPU, where bf16 and SDPA run too.

Tolerances (docs/serving.md, "Precision"): fp32 paths agree to 1e-4 in the ranking score;
bf16 serving agrees with the fp32 reference to BF16_VS_FP32 in the ranking score (bf16 keeps
8 significant bits: ~4e-3 relative per rounding, a few roundings per layer).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from features.sequence import UserSequence
from ranker.batch import random_batch
from ranker.models import build_model
from ranker.serving.cache import UserKVCache, history_batch
from ranker.serving.ranker import prepare_for_serving
from tests.support import ASTRO_BLOCKS, TINY_MODEL

DEVICE = torch.device(os.environ.get("CLIMBER_TEST_DEVICE", "cpu"))
EXACT = 1e-4  # fp32 vs fp32, ranking score
BF16_VS_FP32 = 2e-2  # bf16 serving vs the fp32 reference, ranking score (measured ~6e-3 on CPU)
N_TRACKS = 200

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.fail("CLIMBER_TEST_DEVICE=cuda but torch sees no CUDA device", pytrace=False)


def model_pair(family: str, max_len: int = 64, **overrides):
    """The same weights twice: the fp32 reference on CPU (split attention) and the device's
    serving configuration in bf16 (SDPA)."""
    torch.manual_seed(0)
    extra = ASTRO_BLOCKS if family == "astro" else {}
    fp32 = build_model(family, "xs", N_TRACKS, **{**TINY_MODEL, **extra, "max_len": max_len, **overrides})
    with torch.no_grad():
        for name, param in fp32.named_parameters():
            if ".rab_" in name:  # spread HSTU's relative bias (initialised at 0) so a wrong row shows
                param.normal_(0.0, 0.5)
    served = prepare_for_serving(build_model(family, "xs", N_TRACKS, **{**TINY_MODEL, **extra, "max_len": max_len,
                                                                       **overrides}), DEVICE, torch.bfloat16)
    served.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    return prepare_for_serving(fp32, torch.device("cpu")), served


def scores(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model.score(model(batch.to(next(model.parameters()).device)), None).float().cpu()


@pytest.mark.parametrize("family", ["astro", "hstu", "sasrec"])
def test_bf16_sdpa_serving_stays_within_the_documented_tolerance_of_fp32(family):
    reference, served = model_pair(family)
    assert served.embed.track.weight.dtype == torch.bfloat16
    batch = random_batch(3, 64, 40, N_TRACKS, seed=1, min_length=10)
    gap = (scores(served, batch) - scores(reference, batch)).abs().max()
    assert 0 < gap <= BF16_VS_FP32  # bf16 really ran (not exact), and within the tolerance


@pytest.mark.parametrize("family", ["astro", "hstu", "sasrec"])
def test_sdpa_and_split_candidate_attention_agree_in_fp32_on_the_device(family):
    reference, _ = model_pair(family)
    model = reference.to(DEVICE)
    batch = random_batch(2, 48, 30, N_TRACKS, seed=2, min_length=5).to(DEVICE)
    with torch.inference_mode():
        model.set_candidate_attention("sdpa")
        sdpa = model(batch)
        model.set_candidate_attention("split")
        torch.testing.assert_close(model(batch), sdpa, rtol=0, atol=EXACT)


def sequence(length: int, seed: int) -> UserSequence:
    rng = np.random.default_rng(seed)
    return UserSequence(rng.integers(0, N_TRACKS, length), rng.integers(1, 8, length).astype(np.int8),
                        rng.integers(0, 5, length).astype(np.int8),
                        1_700_000_000_000 + np.cumsum(rng.integers(1, 3_600_000, length)), length - 1)


@pytest.mark.parametrize("family", ["astro", "hstu"])
def test_a_long_history_served_from_the_cache_equals_a_full_recompute(family):
    """n = 2,000 (past the 1,024 the long-n benchmarks serve): encode, one-event and k-event
    extensions on the device agree with re-encoding the whole window in fp32 on CPU."""
    n, max_len = 2000, 2048
    reference, _ = model_pair(family, max_len=max_len)
    model = prepare_for_serving(model_pair(family, max_len=max_len)[0], DEVICE, torch.float32)
    cache = UserKVCache(model, "v1", budget_bytes=2**30)
    full = sequence(n + 6, seed=5)
    cut = lambda k: UserSequence(*(getattr(full, f)[:k] for f in ("track_ids", "behaviours", "scenarios", "timestamps")),  # noqa: E731
                                 k - 1)
    cache.histories([7], [cut(n)])
    for length in (n + 1, n + 6):  # one event, then five at once
        seq = cut(length)
        batch = history_batch([seq], N_TRACKS)
        candidates = torch.arange(1, 41)[None]
        batch.candidate_tracks, batch.candidate_mask = candidates, torch.ones_like(candidates, dtype=torch.bool)
        batch.scenario, batch.request_ts = torch.tensor([1]), batch.history_ts[:, -1] + 60_000
        with torch.inference_mode():
            (history,) = cache.histories([7], [seq])
            served = model.score(model.score_candidates(history, batch.to(DEVICE))).float().cpu()
            torch.testing.assert_close(served, reference.score(reference(batch)), rtol=0, atol=EXACT)
    assert cache.stats.incremental == 2
