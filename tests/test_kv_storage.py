"""K/V cache entries at rest in bf16 or int8 (per-row scale): the vectorised packing equals its
row-by-row definition, the round trip stays within the format's own bound, and a cache
with packed storage serves every path (hit, extension, rebuild) as its full recompute does,
within the documented tolerance, and a hit exactly as the rebuild that stored it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranker.serving.cache import UserKVCache
from ranker.serving.kv_storage import STORAGES, pack, pack_reference, unpack, unpack_reference
from tests.support import cached_scores, full_recompute_scores
from tests.support import kv_append as append
from tests.support import kv_sequence as random_sequence
from tests.support import kv_tiny_model as tiny_model

PACKED_SCORE_TOLERANCE = {"bf16": 2e-2, "int8": 2e-2}  # ranking score vs the fp32 recompute (docs/serving.md)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(0, 6), width=st.integers(1, 9), scale=st.floats(1e-6, 1e3), seed=st.integers(0, 10**6),
       zero_row=st.booleans())
def test_int8_packing_equals_its_row_by_row_definition(rows, width, scale, seed, zero_row):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale
    if zero_row and rows:
        x[0] = 0.0  # an all-zero row: scale 0, codes 0, unpacks to exact zeros
    fast, slow = pack(x, "int8"), pack_reference(x, "int8")
    assert torch.equal(fast.data, slow.data)
    torch.testing.assert_close(fast.scale, slow.scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(unpack(fast), unpack_reference(slow), rtol=1e-6, atol=0)
    # Round trip: at most half a step (scale / 2) per element, per row's own scale.
    assert bool(((unpack(fast) - x).abs() <= fast.scale / 2 * (1 + 1e-5) + 1e-30).all())
    if zero_row and rows:
        assert bool((unpack(fast)[0] == 0).all())


def test_bf16_round_trip_keeps_eight_significant_bits_and_bytes_shrink_in_order():
    x = torch.randn(1, 2, 100, 24)
    assert bool(((unpack(pack(x, "bf16")) - x).abs() <= x.abs() * 2**-8).all())
    assert torch.equal(unpack(pack(x, "fp32")), x)
    nbytes = [pack(x, kind).nbytes for kind in STORAGES]
    assert nbytes == [x.numel() * 4, x.numel() * 2, x.numel() + 2 * 100 * 4]
    with pytest.raises(ValueError, match="kv_storage must be one of"):
        pack(x, "fp8")


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("family", ["astro", "hstu", "sasrec"])
def test_a_packed_cache_serves_every_path_within_tolerance_and_a_hit_as_its_rebuild(family, kind):
    model = tiny_model(family)
    exact = UserKVCache(model, "v1", budget_bytes=10**7)
    packed = UserKVCache(model, "v1", budget_bytes=10**7, kv_storage=kind)
    seq = random_sequence(14, seed=70)
    candidates = torch.arange(1, 31)
    rebuilt = cached_scores(model, packed, 1, seq, candidates)
    hit = cached_scores(model, packed, 1, seq, candidates)
    torch.testing.assert_close(hit, rebuilt, rtol=0, atol=0)
    for k in (1, 4):  # one event (the serving fast path), then several
        seq = append(seq, k, seed=71 + k)
        served = model.score(cached_scores(model, packed, 1, seq, candidates)[None])
        full = model.score(full_recompute_scores(model, seq, candidates)[None])
        gap = float((served - full).abs().max())
        assert 0 < gap <= PACKED_SCORE_TOLERANCE[kind]
    assert packed.stats.hits == 1 and packed.stats.incremental == 2 and packed.stats.rebuilds == 1
    cached_scores(model, exact, 1, seq, candidates)
    assert packed.nbytes < exact.nbytes


def test_the_serving_settings_take_the_storage_and_refuse_an_unknown_one():
    from pydantic import ValidationError

    from ranker.serving.service import ServingSettings

    assert ServingSettings(kv_storage="int8").kv_storage == "int8"
    with pytest.raises(ValidationError, match="kv_storage"):
        ServingSettings(kv_storage="fp8")
    with pytest.raises(ValueError, match="kv_storage must be one of"):
        UserKVCache(tiny_model(), "v1", kv_storage="fp16")
