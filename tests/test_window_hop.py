"""The hop window (ranker.window): the served history's start moves in steps of `hop`, so the
KV cache extends between hops, and every score equals a full re-encode of the same window."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ranker.serving.cache import UserKVCache, hop_window, model_window
from ranker.serving.incremental import PATHS
from ranker.window import check_hop, window_start
from tests.support import KV_MAX_LEN as MAX_LEN
from tests.support import cached_scores, full_recompute_scores
from tests.support import kv_append as append
from tests.support import kv_sequence as random_sequence
from tests.support import kv_tiny_model as tiny_model

torch.set_num_threads(1)
EXACT = 1e-4


@given(n=st.integers(0, 500), max_len=st.integers(1, 64), hop_share=st.floats(0, 1))
def test_the_window_starts_on_the_hop_grid_and_holds_between_max_len_minus_hop_plus_one_and_max_len(n, max_len, hop_share):
    hop = 1 + int(hop_share * (max_len - 1))
    start = window_start(n, max_len, hop)
    assert start % hop == 0 and start <= n
    assert n - start == n if n <= max_len else max_len - hop + 1 <= n - start <= max_len
    assert window_start(n + 1, max_len, hop) >= start  # it never moves back
    assert window_start(n, max_len, 1) == max(n - max_len, 0)  # hop 1 is the sliding window
    assert list(window_start(np.array([n, n + 1]), max_len, hop)) == [start, window_start(n + 1, max_len, hop)]


def test_a_hop_outside_one_to_max_len_is_refused():
    with pytest.raises(ValueError, match="window hop must be in"):
        check_hop(0, 8)
    with pytest.raises(ValueError, match="window hop must be in"):
        UserKVCache(tiny_model(), "v1", window_hop=MAX_LEN + 1)
    cache = UserKVCache(tiny_model(), "v1", window_hop=8)
    with pytest.raises(ValueError, match="window hop must be in"):
        cache.set_model(tiny_model(max_len=4), "v2")  # a reload to a shorter max_len must still fit the hop


def assert_served_as_reencoded(model, cache, user, seq):
    window = cache.window(user, seq)  # what the cache serves, decided before it is updated
    diff = (cached_scores(model, cache, user, seq, torch.arange(1, 9))
            - full_recompute_scores(model, window, torch.arange(1, 9))).abs().max()
    assert diff <= EXACT, f"cache differs from a full re-encode of its window by {diff:.2e}"
    return window


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", ["astro", "sasrec", "hstu"])
def test_past_max_len_the_hop_window_extends_between_hops_and_scores_as_a_full_reencode(family, path):
    hop = 6
    model = tiny_model(family)
    cache = UserKVCache(model, "v1", budget_bytes=10**7, incremental=path, window_hop=hop)
    seq = random_sequence(MAX_LEN - 2, seed=1)
    assert_served_as_reencoded(model, cache, 3, seq)
    steps = 2 * hop + 2
    for step in range(steps):
        seq = append(seq, 1, seed=20 + step)  # the store keeps everything here
        window = assert_served_as_reencoded(model, cache, 3, seq)
        assert len(window) == len(hop_window(seq, MAX_LEN, hop)) and MAX_LEN - hop + 1 <= len(window) <= MAX_LEN
    # past max_len the start hopped at 25 and 31 events; every other event was an extension
    assert (cache.stats.rebuilds, cache.stats.incremental) == (3, steps - 2)


def test_hop_one_is_the_sliding_window_and_rebuilds_on_every_event():
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7, window_hop=1)
    seq = random_sequence(MAX_LEN, seed=2)
    for step in range(4):
        seq = append(seq, 1, seed=30 + step)
        window = assert_served_as_reencoded(model, cache, 1, seq)
        assert window.equals(model_window(seq, MAX_LEN))
    assert (cache.stats.rebuilds, cache.stats.incremental) == (4, 0)


def test_the_window_follows_its_start_when_the_store_drops_old_tokens():
    """A feature store that caps sequences (here at max_len + 4) drops their oldest tokens;
    the cache finds its window's first token again and keeps hopping from there."""
    hop, store_cap = 8, MAX_LEN + 4
    model = tiny_model()
    cache = UserKVCache(model, "v1", budget_bytes=10**7, window_hop=hop)
    seq = random_sequence(store_cap, seed=3)
    first = assert_served_as_reencoded(model, cache, 5, seq)
    assert len(first) == len(hop_window(seq, MAX_LEN, hop))
    lengths = []
    for step in range(2 * hop):
        seq = append(seq, 1, seed=40 + step, max_len=store_cap)
        lengths.append(len(assert_served_as_reencoded(model, cache, 5, seq)))
    assert all(MAX_LEN - hop + 1 <= n <= MAX_LEN for n in lengths)
    assert cache.stats.rebuilds == 1 + 2 and cache.stats.incremental == 2 * hop - 2
    cache.clear()  # without its entry the grid is anchored at the stored sequence's start
    assert cache.window(5, seq).equals(hop_window(seq, MAX_LEN, hop))


def test_offline_batches_take_the_same_hop_window():
    from ranker.training.data import load_request_log
    from tests.support import synthetic_log, write_log

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        write_log(Path(tmp) / "log.duckdb", synthetic_log(n_users=3, n_requests=60))
        log = load_request_log(Path(tmp) / "log.duckdb")
    rows = np.arange(len(log))
    count = log.history_end - log.history_first
    assert count.max() > 8  # the windows below are not all whole histories
    start, end = log.history_window(rows, 8, hop=3)
    assert np.array_equal(start - log.history_first, window_start(count, 8, 3)) and np.array_equal(end, log.history_end)
    assert np.array_equal(log.history_window(rows, 8, hop=1)[0], np.maximum(log.history_first, log.history_end - 8))
    batch = log.batch(rows, 8, hop=3)
    assert torch.equal(batch.history_lengths, torch.from_numpy(end - start))


def test_the_paired_gauc_difference_is_zero_for_the_same_scores_and_positive_for_better_ones():
    from ranker.training.metrics import gauc, paired_gauc_difference

    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 10)
    labels = rng.random(400) < 0.4
    noisy = rng.normal(size=400)
    same = paired_gauc_difference(labels, noisy, noisy, users, resamples=200)
    assert same["difference"] == 0 and same["difference_ci95"] == [0, 0]
    assert same["gauc_base"] == pytest.approx(gauc(labels, noisy, users))
    better = paired_gauc_difference(labels, noisy, noisy + 2 * labels, users, resamples=200)
    assert better["difference"] > 0 and better["difference_ci95"][0] > 0
