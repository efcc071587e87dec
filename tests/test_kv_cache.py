"""TURBO's per-user KV cache: every path (hit, incremental, rebuild, eviction, reload) must
score exactly as a full recompute of the same sequence does."""

from dataclasses import replace

import pytest
import torch

from features.sequence import UserSequence
from ranker.serving.cache import HistoryBuffer, UserKVCache, history_batch, stack_histories
from ranker.serving.incremental import PATHS, extend_history
from tests.support import KV_MAX_LEN as MAX_LEN
from tests.support import KV_TRACKS as N_TRACKS
from tests.support import cached_scores, full_recompute_scores
from tests.support import kv_append as append
from tests.support import kv_sequence as random_sequence
from tests.support import kv_tiny_model as tiny_model

torch.set_num_threads(1)
EXACT = 1e-4  # fp32: cache vs full recompute


def assert_exact(model, cache, user, window, candidates=torch.arange(1, 9)):
    diff = (cached_scores(model, cache, user, window, candidates) - full_recompute_scores(model, window, candidates)).abs().max()
    assert diff <= EXACT, f"cache differs from a full recompute by {diff:.2e}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family, overrides", [("astro", {}), ("sasrec", {}), ("hstu", {}),
                                               ("astro", dict(norm="post")), ("hstu", dict(norm="post"))])
def test_appending_one_event_is_an_incremental_update_equal_to_a_full_recompute(family, overrides, path):
    model = tiny_model(family, **overrides)
    cache = UserKVCache(model, "v1", budget_bytes=10**7, incremental=path)
    seq = random_sequence(10, seed=1)
    assert_exact(model, cache, 7, seq)
    assert (cache.stats.rebuilds, cache.stats.incremental) == (1, 0)
    for step in range(3):
        seq = append(seq, 1, seed=10 + step)
        assert_exact(model, cache, 7, seq)
    assert (cache.stats.rebuilds, cache.stats.incremental, cache.stats.hits) == (1, 3, 0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("overrides", [dict(partition="behaviour"), dict(partition="scenario"), dict(partition="none")])
def test_appending_many_events_across_blocks_equals_a_full_recompute(overrides, path):
    model = tiny_model(**overrides)
    cache = UserKVCache(model, "v1", budget_bytes=10**7, incremental=path)
    seq = random_sequence(3, seed=2)
    assert_exact(model, cache, 1, seq)
    seq = append(seq, 12, seed=3)  # several new tokens in every block, buffers must grow
    assert_exact(model, cache, 1, seq)
    assert cache.stats.incremental == 1 and cache.stats.rebuilds == 1


def test_an_unchanged_sequence_is_a_hit():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    seq = random_sequence(12, seed=4)
    assert_exact(model, cache, 3, seq)
    assert_exact(model, cache, 3, seq)
    assert (cache.stats.hits, cache.stats.rebuilds, cache.stats.incremental) == (1, 1, 0)
    assert cache.stats.hit_rate == pytest.approx(0.5)


def test_sliding_past_max_len_rebuilds_in_full():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    seq = random_sequence(MAX_LEN - 1, seed=5)
    assert_exact(model, cache, 2, seq)
    seq = append(seq, 1, seed=6)  # exactly max_len: still an append
    assert_exact(model, cache, 2, seq)
    seq = append(seq, 3, seed=7)  # the window slides: positions shift, every K/V changes
    assert_exact(model, cache, 2, seq)
    assert (cache.stats.rebuilds, cache.stats.incremental) == (2, 1)
    # The same through a Feast-style window that itself slid (sequence max_len = model max_len).
    seq = append(seq, 2, seed=8, max_len=MAX_LEN)
    assert_exact(model, cache, 2, seq)
    assert cache.stats.rebuilds == 3


def test_a_changed_prefix_is_never_extended():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    seq = random_sequence(8, seed=9)
    assert_exact(model, cache, 4, seq)
    rewritten = append(replace(seq, track_ids=(seq.track_ids + 1) % N_TRACKS), 2, seed=10)
    assert_exact(model, cache, 4, rewritten)
    assert (cache.stats.rebuilds, cache.stats.incremental) == (2, 0)


def test_sliding_recency_blocks_rebuild_and_stay_exact():
    model = tiny_model(partition="recency", recency_scales=(6, 16))
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    seq = random_sequence(4, seed=11)
    assert_exact(model, cache, 5, seq)
    seq = append(seq, 1, seed=12)  # 5 <= 6: every window still holds every event
    assert_exact(model, cache, 5, seq)
    seq = append(seq, 2, seed=13)  # the 6-event window slides
    assert_exact(model, cache, 5, seq)
    assert (cache.stats.rebuilds, cache.stats.incremental) == (2, 1)


def test_the_budget_is_never_exceeded_and_least_recent_users_are_evicted():
    model = tiny_model()
    probe = UserKVCache(model, "v1", budget_bytes=10**7)
    probe.histories([0], [random_sequence(MAX_LEN, seed=0)])
    budget = int(probe.nbytes * 2.5)  # room for two full-length users
    cache = UserKVCache(model, "v1", budget_bytes=budget)
    sequences = {user: random_sequence(MAX_LEN - 4, seed=20 + user) for user in range(4)}
    for user in (0, 1, 2):
        assert_exact(model, cache, user, sequences[user])
        assert cache.nbytes <= budget
    assert cache.stats.evictions == 1 and len(cache) == 2  # user 0 went
    assert_exact(model, cache, 1, sequences[1])  # a hit: 1 becomes the most recent
    assert_exact(model, cache, 3, sequences[3])  # evicts 2, not 1
    assert cache.stats.hits == 1 and cache.stats.evictions == 2
    for user in (1, 3):  # growing entries also respect the budget
        sequences[user] = append(sequences[user], 4, seed=40 + user)
        assert_exact(model, cache, user, sequences[user])
        assert cache.nbytes <= budget
    assert_exact(model, cache, 0, sequences[0])  # evicted earlier: rebuilt, still exact
    assert cache.nbytes <= budget


def test_an_entry_larger_than_the_budget_is_scored_but_not_kept():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=1000)
    assert_exact(model, cache, 9, random_sequence(MAX_LEN, seed=14))
    assert len(cache) == 0 and cache.nbytes == 0 and cache.stats.oversized == 1


def test_a_model_reload_drops_old_entries_and_scores_with_the_new_weights():
    old, new = tiny_model(seed=0), tiny_model(seed=1)
    cache = UserKVCache(old, "v1", budget_bytes=10**7)
    seq = random_sequence(10, seed=15)
    assert_exact(old, cache, 6, seq)
    cache.set_model(new, "v2")
    assert len(cache) == 0 and cache.nbytes == 0
    seq = append(seq, 1, seed=16)  # would be an append under v1; v2 must rebuild
    assert_exact(new, cache, 6, seq)
    assert (cache.stats.rebuilds, cache.stats.incremental) == (2, 0)


def test_cold_users_get_an_empty_history_that_scores_like_the_model():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    candidates = torch.arange(1, 6)
    empty = UserSequence.empty()
    history = cache.histories([8], [empty])[0]
    assert int(history.history_lengths[0]) == 0 and len(cache) == 0 and cache.stats.cold == 1
    batch = replace(history_batch([empty], N_TRACKS), candidate_tracks=candidates[None],
                    candidate_mask=torch.ones(1, 5, dtype=torch.bool), scenario=torch.tensor([2]),
                    request_ts=torch.tensor([1_700_000_000_000]))
    with torch.no_grad():
        torch.testing.assert_close(model.score_candidates(history, batch), model(batch), rtol=0, atol=EXACT)


def test_stacked_histories_of_several_users_score_as_one_batched_forward():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    windows = [random_sequence(n, seed=30 + n) for n in (3, 17, 0, 9)]
    histories = cache.histories([10, 11, 12, 13], windows)
    batch = history_batch(windows, N_TRACKS)
    batch = replace(batch, candidate_tracks=torch.randint(1, N_TRACKS + 1, (4, 6)),
                    candidate_mask=torch.ones(4, 6, dtype=torch.bool), scenario=torch.tensor([0, 1, 2, 3]),
                    request_ts=batch.history_ts.max(1).values + 5_000)
    with torch.no_grad():
        torch.testing.assert_close(model.score_candidates(stack_histories(histories), batch), model(batch),
                                   rtol=0, atol=EXACT)


def test_bad_calls_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="budget_bytes"):
        UserKVCache(model, "v1", budget_bytes=-1)
    cache = UserKVCache(model, "v1")
    with pytest.raises(ValueError, match="distinct"):
        cache.histories([1, 1], [random_sequence(2, 0), random_sequence(2, 0)])
    with pytest.raises(ValueError, match="2 user ids but 1 sequences"):
        cache.histories([1, 2], [random_sequence(2, 0)])


def test_split_candidate_softmax_scores_as_the_masked_sdpa_does():
    model = tiny_model()
    windows = [random_sequence(n, seed=50 + n) for n in (0, 2, 20)]
    batch = history_batch(windows, N_TRACKS)
    batch = replace(batch, candidate_tracks=torch.randint(1, N_TRACKS + 1, (3, 30)),
                    candidate_mask=torch.ones(3, 30, dtype=torch.bool), scenario=torch.tensor([0, 3, 4]),
                    request_ts=batch.history_ts.max(1).values + 5_000)
    with torch.no_grad():
        reference = model(batch)
        model.set_candidate_attention("split")
        torch.testing.assert_close(model(batch), reference, rtol=0, atol=EXACT)
    with pytest.raises(ValueError, match="candidate attention"):
        model.set_candidate_attention("flash")


BF16 = 2e-2  # ranking score, bf16 weights and cache (the CUDA serving dtype): ~2 bf16 ulps at |score| ~ 2


def test_bf16_cache_stays_within_the_documented_tolerance_of_a_bf16_recompute():
    model = tiny_model().to(torch.bfloat16)
    cache = UserKVCache(model, "v1", budget_bytes=10**7)
    seq = random_sequence(10, seed=60)
    cache.histories([1], [seq])
    seq = append(seq, 9, seed=61)
    candidates = torch.arange(1, 21)
    cached, full = (model.score(s[None]).float() for s in (cached_scores(model, cache, 1, seq, candidates),
                                                           full_recompute_scores(model, seq, candidates)))
    assert cache.stats.incremental == 1
    assert (cached - full).abs().max() <= BF16


# ----------------------------------------------------------------------------- one-event fast path

def test_the_host_gap_bucket_equals_the_tensor_buckets_around_every_boundary():
    from ranker.models.embedding import history_time_gaps
    from ranker.serving.incremental import gap_bucket

    n_buckets = 48
    near = [int(1000 * (2 ** (k / 2) - 1)) + off for k in range(1, n_buckets) for off in range(-40, 41)]
    gaps = torch.tensor(sorted({max(g, 0) for g in near}) + [0, 1, 10**10, -5])
    stamps = torch.stack([torch.zeros_like(gaps), gaps], dim=1)  # [N, 2]: gap ms after the first event
    expected = history_time_gaps(stamps, n_buckets)[:, 1]
    assert [gap_bucket(int(g), n_buckets) for g in gaps] == expected.tolist()


# ASTRO's long-history setting (docs/astro-ablations.md): one candidate stack over both
# behaviour blocks' K/V, no in-block position tables.
LONG_HISTORY = dict(block_attention="pointwise", candidate_path="shared", block_positions=False)


@pytest.mark.parametrize("overrides", [dict(block_attention="softmax"),
                                       dict(block_attention="softmax", temperature="fixed", block_positions=False),
                                       dict(block_attention="softmax", norm="post"),
                                       dict(block_attention="pointwise"), dict(block_attention="pointwise", n_layers=1),
                                       dict(block_attention="pointwise", norm="post"),
                                       dict(block_attention="pointwise", norm="post", n_layers=1)])
def test_the_one_token_stack_step_equals_the_reference_extend(overrides):
    """stack_extend_one (the serving path) against stack_extend (k tokens), for both stack kinds."""
    from ranker.serving.incremental import query_scales, stack_extend, stack_extend_one

    model = tiny_model(**overrides)
    window = random_sequence(12, seed=3)
    with torch.no_grad():
        encoded = model.encode_history(history_batch([window], N_TRACKS))
        fast, slow = HistoryBuffer(encoded, 0), HistoryBuffer(encoded, 0)
        g = torch.Generator().manual_seed(0)
        for b, stack in enumerate(model.stacks):
            for _ in range(3):
                x, tau = torch.randn(1, 1, 16, generator=g), 0.5 + torch.rand(1, 1, 2, generator=g)
                length = fast.blocks[b].length
                stack_extend_one(stack, x[0], fast.blocks[b], length, query_scales(tau[0, 0], 8))
                stack_extend(stack, x, slow.blocks[b], length, tau)
                fast.blocks[b].length = slow.blocks[b].length = length + 1
        for got, want in zip(fast.view().blocks, slow.view().blocks):
            for a, e in zip(got.keys + got.values, want.keys + want.values):
                torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family, overrides", [("astro", dict(block_attention="softmax")), ("astro", dict(block_attention="softmax", norm="post")),
                                               ("astro", dict(block_attention="softmax", partition="scenario")),
                                               ("astro", dict(block_attention="pointwise", partition="behaviour")),
                                               ("astro", {}), ("astro", dict(n_layers=1)),
                                               ("astro", dict(norm="post")), ("astro", dict(norm="post", n_layers=1)),
                                               ("astro", LONG_HISTORY), ("astro", dict(LONG_HISTORY, n_layers=1)),
                                               ("sasrec", {}), ("sasrec", dict(norm="post")), ("hstu", {}),
                                               ("hstu", dict(norm="post"))])
def test_one_event_at_a_time_through_buffer_growth_equals_a_full_recompute(family, overrides):
    """The fast path event by event, past the buffers' capacity (reallocation), and after
    weights change in place (its cached tau / embedding tables must follow them). The
    reference path is held to the same recompute by the cache tests and to this path by
    test_the_fast_and_reference_incremental_paths_fill_the_same_buffers."""

    model = tiny_model(family, **overrides)
    window = random_sequence(MAX_LEN, seed=4)
    candidates = torch.arange(1, 9)
    prefix = lambda n: UserSequence(window.track_ids[:n], window.behaviours[:n], window.scenarios[:n],  # noqa: E731
                                    window.timestamps[:n], n - 1)
    with torch.no_grad():
        history = HistoryBuffer(model.encode_history(history_batch([prefix(4)], N_TRACKS)), 0, headroom=0.0)
        for n in range(5, MAX_LEN + 1):
            if n == 14:  # weights updated in place (an optimiser step, load_state_dict): re-encode the prefix
                for p in model.parameters():
                    p.mul_(1.1)
                history = HistoryBuffer(model.encode_history(history_batch([prefix(n - 1)], N_TRACKS)), 0, headroom=0.0)
            extend_history(model, history, history_batch([prefix(n)], N_TRACKS))
            reference = history_batch([prefix(n)], N_TRACKS)
            batch = replace(reference, candidate_tracks=candidates[None], candidate_mask=torch.ones(1, 8, dtype=torch.bool),
                            scenario=torch.tensor([2]), request_ts=reference.history_ts.max(1).values + 60_000)
            torch.testing.assert_close(model.score_candidates(history.view(), batch), model(batch), atol=EXACT, rtol=0)


@pytest.mark.parametrize("family, overrides", [("astro", dict(block_attention="softmax", partition="scenario")),
                                               ("astro", {}), ("astro", LONG_HISTORY), ("sasrec", {}),
                                               ("sasrec", dict(norm="post")), ("hstu", {}), ("astro", dict(norm="post")),
                                               ("hstu", dict(norm="post"))])
def test_the_fast_and_reference_incremental_paths_fill_the_same_buffers(family, overrides):
    """The switch's two sides agree: after one event at a time and then several at once, the
    fast path's buffers hold the K/V, positions and timestamps the re-encoding reference does."""
    model = tiny_model(family, **overrides)
    window = random_sequence(MAX_LEN, seed=6)
    prefix = lambda n: UserSequence(window.track_ids[:n], window.behaviours[:n], window.scenarios[:n],  # noqa: E731
                                    window.timestamps[:n], n - 1)
    with torch.no_grad():
        encoded = model.encode_history(history_batch([prefix(3)], N_TRACKS))
        buffers = {path: HistoryBuffer(encoded, 0, headroom=0.0) for path in PATHS}
        for n in (4, 5, 6, 11, MAX_LEN):
            for path, history in buffers.items():
                extend_history(model, history, history_batch([prefix(n)], N_TRACKS), path)
            fast, reference = buffers["fast"].view(), buffers["reference"].view()
            assert (buffers["fast"].length, buffers["fast"].last_ts) == (buffers["reference"].length, buffers["reference"].last_ts)
            for got, want in zip(fast.blocks, reference.blocks):
                assert torch.equal(got.positions, want.positions) and torch.equal(got.timestamps, want.timestamps)
                for a, e in zip(got.keys + got.values, want.keys + want.values):
                    torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)


def test_an_unknown_incremental_path_is_refused():
    with pytest.raises(ValueError, match="incremental path"):
        UserKVCache(tiny_model(), "v1", incremental="quick")


def test_the_incremental_floors_count_calls_and_the_bytes_one_event_reads():
    """bench.incremental_floor on a small model: the event's ATen calls are counted, and the
    bytes read are the joined block's attended K/V (the slot for the new token included)
    and its stack's weights."""
    from bench.incremental_floor import calls_per_event, read_floor_seconds
    from bench.serve_common import N_TRACKS, prefix, random_sequence
    from bench.serve_long import long_model
    from ranker.serving.cache import HistoryBuffer, history_batch

    n, cpu = 48, torch.device("cpu")
    model = long_model("astro", "m", n, cpu)
    seq = random_sequence(n, seed=1)
    with torch.inference_mode():
        full = history_batch([seq], N_TRACKS, cpu)
        before = model.encode_history(history_batch([prefix(seq, n - 1)], N_TRACKS, cpu))
        assert 20 < calls_per_event(model, before, full, n) < 400
        reads = read_floor_seconds(model, before, full, n, reps=2)
    (b,) = reads["blocks_joined"]
    block = HistoryBuffer(before, 0, max_len=n).blocks[b]
    kv = sum(4 * block.kv[i][:, :, : block.length + 1].numel() for i in range(len(block.kv) - 1))
    weights = sum(4 * p.numel() for p in model.stacks[b].parameters() if p.dim() == 2)
    assert reads["bytes_per_event"] == kv + weights and reads["read_floor_s"] > 0
