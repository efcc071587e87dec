"""The byte-budget curve of `climber bench cache` is a replay of one unbounded run's lookup log
(UserKVCache.lookup_log, the experiment's kv_cache_lookups table): it must count what a real
UserKVCache with that budget counts on the same lookups."""

from __future__ import annotations

import numpy as np

from bench.cache_economics import Lookup, closed_loop_figures, replay_lru, working_set
from ranker.serving.cache import UserKVCache
from tests.support import kv_append as append
from tests.support import kv_sequence as random_sequence
from tests.support import kv_tiny_model as tiny_model


def lookups(n_users: int = 6, steps: int = 60, seed: int = 0):
    """Users come back in a skewed order with 0-3 new events each time; one user's window
    slides past max_len (a rebuild with an entry present)."""
    rng = np.random.default_rng(seed)
    seqs = {u: random_sequence(int(rng.integers(3, 12)), seed=100 + u) for u in range(n_users)}
    out = []
    for step in range(steps):
        user = int(min(rng.geometric(0.35) - 1, n_users - 1))
        k = int(rng.integers(0, 4))
        if k:
            seqs[user] = append(seqs[user], k, seed=1000 + step)
        out.append((user, seqs[user]))
    return out


def logged(model, trace) -> list[Lookup]:
    cache = UserKVCache(model, "v1", budget_bytes=2**40)
    cache.lookup_log = []
    for user, seq in trace:
        cache.histories([user], [seq])
    assert [o for _, o, _ in cache.lookup_log].count("hit") == cache.stats.hits
    assert len(cache.lookup_log) == cache.stats.lookups
    return [Lookup(*row) for row in cache.lookup_log]


def test_the_lru_replay_counts_what_a_real_cache_with_that_budget_counts():
    """Exact with no budget and with none at all; in between within 3% of lookups, because an
    entry rebuilt after an eviction gets fresh headroom where the logged one grew by extension."""
    model = tiny_model()
    trace = lookups(n_users=20, steps=160)
    log = logged(model, trace)
    total, users = working_set(log)
    assert users == len({u for u, _ in trace}) and len(log) == len(trace)
    for fraction in (0.0, 0.2, 0.5, 1.0):
        budget = int(fraction * total)
        real = UserKVCache(model, "v1", budget_bytes=budget)
        for user, seq in trace:
            real.histories([user], [seq])
        replay, n = replay_lru(log, budget), len(trace)
        measured = {"hit_rate": real.stats.hits / n, "incremental_rate": real.stats.incremental / n,
                    "rebuild_rate": real.stats.rebuilds / n}
        tolerance = 0.0 if fraction in (0.0, 1.0) else 0.03
        for key, value in measured.items():
            assert abs(replay[key] - value) <= tolerance, (fraction, key, replay[key], value)


def test_the_closed_loop_figures_span_no_reuse_to_the_unbounded_cache():
    log = logged(tiny_model(), lookups(seed=1))
    (arm,) = closed_loop_figures({"astro_xs": {"model": "astro-xs", "log": log}}, fractions=(0.01, 1.0)).values()
    assert arm["curve"][0]["rebuild_rate"] == 1.0  # 1% holds no entry of this size
    assert arm["curve"][-1]["hit_rate"] == arm["unbounded"]["hit_rate"] > 0
    assert arm["bytes_per_user"] == arm["working_set_bytes"] / arm["users"]


def test_the_terminal_tables_fit_80_columns_at_full_size():
    """Wide figures (thousands of lookups, MiB entries, every budget fraction, a long arm name)."""
    from bench.cache_economics import FRACTIONS, terminal_tables

    arm = {"lookups": 12_345, "users": 2_000, "bytes_per_user": 4_000_000.0,
           "unbounded": {"hit_rate": 0.123, "incremental_rate": 0.333, "rebuild_rate": 0.544},
           "curve": [{"fraction": f, "rebuild_rate": 0.999} for f in FRACTIONS]}
    loops = {16: {"astro_xs": arm, "astro_m": arm}}
    quality = [{"arm": "astro_xs", "hop": 16, "requests": 16_427, "windows_differ": 0.86, "mean_window": 54.6,
                "gauc_base": 0.6686, "base_ci95_halfwidth": 0.0039, "gauc_other": 0.6624, "difference": -0.0062,
                "difference_ci95": (-0.0073, -0.0051)}]
    storage = [{"model": "astro-l (untrained)", "n": 4096, "storage": "int8", "kv_bytes_per_user": 3_950_000.0,
                "bytes_vs_fp32": 0.22, "max_abs_score_error": 5.9e-4, "kendall_tau_min": 0.9977,
                "kendall_tau_mean": 0.9986}]
    text = terminal_tables(loops, quality, storage)
    assert "| astro_xs | 16 | 12,345 | 2,000 | 3,906.2 |" in text and "0.9977/0.9986" in text
    assert max(map(len, text.splitlines())) <= 80, max(text.splitlines(), key=len)
