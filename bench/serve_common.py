"""What the serving benchmarks share: the timing rule (best-of-N, in turns), the untrained
serving model, and random histories. bench.serve, bench.serve_long, bench.load and
bench.cache_economics import from here."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from features.sequence import UserSequence
from ranker.batch import RankBatch
from ranker.models import build_model
from ranker.serving.ranker import prepare_for_serving

N_TRACKS = 50_000
console = Console()


def best_seconds(fns: dict[str, Callable[[], object]], min_seconds: float = 0.5, min_reps: int = 5,
                 max_reps: int = 200) -> dict[str, float]:
    """Best-of-N wall time of each function, the functions called in turns.

    Side by side and in turns because the cores are shared: whatever else runs slows both
    paths of a ratio alike, and the minimum is the run least disturbed by it (as `timeit`
    advises). Each function is called once first to warm up.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    spent, reps = 0.0, 0
    while reps < min_reps or (spent < min_seconds and reps < max_reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            best[name] = min(best[name], elapsed)
            spent += elapsed
        reps += 1
    return best


def serving_model(size: str, max_len: int, /, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_for_serving(build_model("astro", size, N_TRACKS, **{"dropout": 0.0, **overrides, "max_len": max_len}),
                               torch.device("cpu"))


def repeat_rows(batch: RankBatch, rows: int) -> RankBatch:
    """`rows` copies of a one-row batch's history, each with one candidate (per-pair input)."""
    pick = lambda t: t.expand(rows, *t.shape[1:]).contiguous()  # noqa: E731
    return RankBatch(
        history_tracks=pick(batch.history_tracks), history_behaviours=pick(batch.history_behaviours),
        history_scenarios=pick(batch.history_scenarios), history_ts=pick(batch.history_ts),
        history_lengths=pick(batch.history_lengths), candidate_tracks=batch.candidate_tracks[0, :rows, None],
        candidate_mask=batch.candidate_mask[0, :rows, None], scenario=pick(batch.scenario), request_ts=pick(batch.request_ts),
    )


def random_sequence(n: int, seed: int) -> UserSequence:
    rng = np.random.default_rng(seed)
    return UserSequence(rng.integers(0, N_TRACKS, n), rng.integers(1, 8, n).astype(np.int8),
                        rng.integers(0, 5, n).astype(np.int8),
                        1_700_000_000_000 + np.cumsum(rng.integers(1, 3_600_000, n)), n - 1)


def prefix(seq: UserSequence, n: int) -> UserSequence:
    return UserSequence(seq.track_ids[:n], seq.behaviours[:n], seq.scenarios[:n], seq.timestamps[:n], n - 1)


def service_files(root, users: int, n: int, size: str, overrides: dict | None = None) -> tuple:
    """A Feast store under root/feast holding `users` random n-event histories and an untrained
    ASTRO checkpoint at root/model: what a benchmark's ranking service serves. Returns both paths."""
    from pathlib import Path

    from features.store import FeatureStoreClient
    from ranker.training.checkpoint import save_checkpoint

    root = Path(root)
    store = FeatureStoreClient(root / "feast")
    store.apply()
    store.write_sequences({user: random_sequence(n, seed=100 + user) for user in range(users)})
    torch.manual_seed(0)
    model = build_model("astro", size, N_TRACKS, **{**(overrides or {}), "max_len": n})
    save_checkpoint(root / "model", model, torch.optim.AdamW(model.parameters()), "astro", size, 0, {})
    return root / "model", root / "feast"

