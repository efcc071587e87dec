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
from ranker.batch import RankBatch, random_batch
from streaming.events import BEHAVIOURS, SCENARIOS
from ranker.models import build_model
from ranker.serving.ranker import prepare_for_serving

N_TRACKS = 50_000
console = Console()


def best_seconds(fns: dict[str, Callable[[], object]], min_seconds: float = 0.5, min_reps: int = 5,
                 max_reps: int = 200, cpu: dict[str, float] | None = None) -> dict[str, float]:
    """Best-of-N wall time of each function, the functions called in turns.

    Side by side and in turns because the cores are shared: whatever else runs slows both
    paths of a ratio alike, and the minimum is the run least disturbed by it (as `timeit`
    advises). Each function is called once first to warm up. `cpu`, when given, is filled
    with each function's best process (CPU) time per call, which other processes on the
    box disturb less than wall time (they take turns on the cores, not this process's work).
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    best_cpu = {name: float("inf") for name in fns}
    spent, reps = 0.0, 0
    while reps < min_reps or (spent < min_seconds and reps < max_reps):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            elapsed = time.perf_counter() - start
            best_cpu[name] = min(best_cpu[name], time.process_time() - start_cpu)
            best[name] = min(best[name], elapsed)
            spent += elapsed
        reps += 1
    if cpu is not None:
        cpu.update(best_cpu)
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


# Share of each behaviour and scenario among history tokens (impressions are not tokens).
# "sandbox": the simulator's long log (`climber sandbox --users 150 --tracks 5000 --days 25
# --seed 11`, 277,663 tokens; `climber bench block-cost --db ...` prints a log's own mix).
# "uniform": every behaviour and scenario alike, the benchmarks' mix before 2026-12-06.
# The mix decides ASTRO's block lengths, so its attention cost (sum_b L_b^2).
HISTORY_MIXES: dict[str, tuple[dict[str, float], dict[str, float]] | None] = {
    "uniform": None,
    "sandbox": ({"play": 0.445, "full_play": 0.302, "skip": 0.142, "like": 0.058, "share": 0.007,
                 "add_to_playlist": 0.026, "dislike": 0.019},
                {"home_feed": 0.200, "daily_mix": 0.194, "radio": 0.240, "search": 0.076, "library": 0.289}),
}


def mixed_batch(n: int, M: int, seed: int, mix: str = "sandbox") -> RankBatch:
    """One request with a full n-event random history whose behaviours and scenarios are
    drawn (independently) from the mix `mix` of HISTORY_MIXES; or, when `mix` is a path to
    an event log (.duckdb), the last n tokens of that log's longest history, so a user's
    own concentration on a few scenarios (which an independent draw lacks) is kept."""
    if mix.endswith(".duckdb"):
        return log_history_batch(mix, n, M, seed)
    if mix not in HISTORY_MIXES:
        raise ValueError(f"unknown history mix {mix!r}; known: {list(HISTORY_MIXES)} or a .duckdb log")
    batch = random_batch(1, n, M, N_TRACKS, seed=seed, min_length=n)
    shares = HISTORY_MIXES[mix]
    if shares is None:
        return batch
    rng = np.random.default_rng(seed)
    for field, names, share in (("history_behaviours", BEHAVIOURS, shares[0]),
                                ("history_scenarios", SCENARIOS, shares[1])):
        p = np.array([share.get(name, 0.0) for name in names])
        codes = rng.choice(len(names), size=(1, n), p=p / p.sum())
        setattr(batch, field, torch.from_numpy(codes).to(torch.int64))
    return batch


def log_history_batch(db: str, n: int, M: int, seed: int) -> RankBatch:
    """The last n tokens of the longest user history in the log `db`, random candidates."""
    log = _cached_log(db)
    last = int(np.argmax(log.history_end - log.history_first))  # the request after the longest history
    first, end = int(log.history_first[last]), int(log.history_end[last])
    if end - first < n:
        raise ValueError(f"{db}: the longest history has {end - first} tokens, fewer than n = {n}")
    batch = random_batch(1, n, M, N_TRACKS, seed=seed, min_length=n)
    window = slice(end - n, end)
    batch.history_behaviours = torch.from_numpy(log.token_behaviours[window].astype(np.int64))[None]
    batch.history_scenarios = torch.from_numpy(log.token_scenarios[window].astype(np.int64))[None]
    return batch


_LOGS: dict = {}


def _cached_log(db: str):
    from ranker.training.data import load_request_log

    if db not in _LOGS:
        _LOGS[db] = load_request_log(db)
    return _LOGS[db]


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

