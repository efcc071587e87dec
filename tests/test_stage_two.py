"""Stage two's fast path (ranker.serving.stage_two) against the model's own score_candidates:
the same logits, for one user and for padded stacks, for every ASTRO variant it covers,
and the reference for every model it does not."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from ranker.serving.cache import UserKVCache, history_batch, stack_histories
from ranker.serving.stage_two import SCORING_PATHS, has_fast_path, score_candidates
from tests.support import KV_TRACKS as N_TRACKS
from tests.support import kv_sequence, kv_tiny_model

torch.set_num_threads(1)
EXACT = 1e-4  # fp32, as the KV cache's tests


def request(windows, M: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batch = history_batch(windows, N_TRACKS)
    B = len(windows)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[-1, M - 2:] = False  # a padded candidate slot
    return replace(batch, candidate_tracks=torch.randint(1, N_TRACKS + 1, (B, M), generator=g), candidate_mask=mask,
                   scenario=torch.arange(B) % 5, request_ts=batch.history_ts.max(1).values + 90_000)


VARIANTS = {
    "default": {},
    "one layer": {"n_layers": 1},
    "fixed temperature": {"temperature": "fixed"},
    "no block positions": {"block_positions": False},
    "sigmoid fusion": {"fusion": "sigmoid"},
    "recency blocks": {"partition": "recency", "recency_scales": (4, 12)},
    "post-norm": {"norm": "post"},
    "post-norm, one layer": {"norm": "post", "n_layers": 1},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_fast_path_scores_as_the_model_for_one_user_and_for_padded_stacks(variant):
    model = kv_tiny_model("astro", **VARIANTS[variant])
    assert has_fast_path(model)
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    windows = [kv_sequence(n, seed=40 + n) for n in (17, 5, 0, 24)]
    histories = cache.histories([1, 2, 3, 4], windows)
    with torch.inference_mode():
        for rows in ([0], [2], [0, 1, 2, 3], [3, 3]):  # one user (no padded key), a cold one, ragged, equal
            batch = request([windows[r] for r in rows], seed=len(rows))
            history = stack_histories([histories[r] for r in rows])
            fast = score_candidates(model, history, batch, "fast")
            torch.testing.assert_close(fast, model.score_candidates(history, batch), rtol=0, atol=EXACT)
            torch.testing.assert_close(fast, model(batch), rtol=0, atol=EXACT)


def test_the_fast_path_follows_weight_changes_and_leaves_other_models_to_the_reference():
    model = kv_tiny_model("astro")
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    window = kv_sequence(12, seed=3)
    batch = request([window])
    history = cache.histories([1], [window])[0]
    with torch.no_grad():
        before = score_candidates(model, history, batch, "fast")
        for layer in model.stacks[0].layers:  # tables derived from these must be rebuilt
            layer.rab_time.weight.mul_(-2.0)
        model.temperature.mlp[0].bias.add_(0.3)
        model.embed.scenario.weight.add_(0.1)
        history = UserKVCache(model, "v2", budget_bytes=10**7).histories([1], [window])[0]
        after = score_candidates(model, history, batch, "fast")
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(after, model(batch), rtol=0, atol=EXACT)
    assert not has_fast_path(kv_tiny_model("hstu"))
    assert not has_fast_path(kv_tiny_model("astro", block_attention="softmax"))
    assert not has_fast_path(kv_tiny_model("astro", candidate_path="shared"))
    assert not has_fast_path(kv_tiny_model("astro").train())
    with pytest.raises(ValueError, match="scoring path"):
        score_candidates(model, history, batch, "fastest")
    assert SCORING_PATHS == ("fast", "reference")


def test_bench_batch_cost_times_both_paths_and_splits_fixed_from_per_request_cost():
    """`climber bench batch-cost`'s timing at a tiny size: every (path, batch) timed, the line
    through the medians recovered exactly when the costs are a line, a table within 80 columns."""
    from bench.batch_cost import STAGES, split_fixed, table, time_batches
    from ranker.interface import RankRequest
    from ranker.serving.ranker import NeuralRanker
    from tests.support import DictSequenceSource

    source = DictSequenceSource({u: kv_sequence(10 + u, seed=u) for u in range(3)})
    ranker = NeuralRanker(kv_tiny_model("astro"), "v1", source, device="cpu")
    requests = [RankRequest(request_id=i, user_id=i, scenario="radio", candidates=np.arange(4) + i, ts=1_800_000_000_000)
                for i in range(3)]
    result = time_batches(ranker, requests, (1, 2, 3), SCORING_PATHS, turns=2)
    assert {(r["path"], r["batch"]) for r in result["rows"]} == {(p, b) for p in SCORING_PATHS for b in (1, 2, 3)}
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] >= 0 and set(r["stage_ms"]) == set(STAGES) for r in result["rows"])
    lines = table(result)
    assert len(lines) == 2 + 3 + 1 + 2 + 2 * len(SCORING_PATHS) and all(len(line) <= 80 for line in lines)
    line = [{"path": "fast", "batch": b, "wall_ms": 0.5 + 1.25 * b, "cpu_ms": 0.25 + b,
             "stage_ms": {s: 0.1 + 0.2 * b for s in STAGES}} for b in (1, 2, 4, 8)]
    fit = split_fixed(line, "fast")
    assert abs(fit["wall"]["fixed_ms"] - 0.5) < 1e-9 and abs(fit["wall"]["per_request_ms"] - 1.25) < 1e-9
    assert abs(fit["cpu"]["fixed_ms"] - 0.25) < 1e-9 and abs(fit["model"]["per_request_ms"] - 0.2) < 1e-9
