"""Faults on the live path that used to lose data without saying so (issue 20).

Fast tests hold the guards themselves to a real Valkey: the fenced sequence write, the
store-loss marker, the persistent server. Slow tests inject each fault into the real
stack (Tansu broker, Faust worker processes, Valkey) and assert afterwards that Feast
equals the recompute from the log: a worker paused past a rebalance, a Valkey restart,
a broker restart, a killed sandbox. docs/results.md has the table these produce and
docs/streaming.md the runbook.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from features.redis_rows import StoreLostError
from features.sequence import SEQUENCE_BEHAVIOUR_CODES, UserSequence, sequences_from_log
from features.store import FeatureStoreClient
from bench.stream import simulated_log
from streaming.events import EventBatch
from streaming.online_state import SequenceState
from streaming.valkey import start_valkey
from tests.support import assigned_partitions


@pytest.fixture(scope="module")
def sim_batches() -> list[EventBatch]:
    return simulated_log(6_000, seed=3, n_users=200)


@pytest.fixture
def valkey(tmp_path):
    with start_valkey(tmp_path / "valkey") as server:
        yield server


def redis_store(tmp_path: Path, url: str) -> FeatureStoreClient:
    store = FeatureStoreClient(tmp_path / "feast", "redis", url)
    store.apply()
    return store


def wrong_users(store: FeatureStoreClient, log: EventBatch) -> list[int]:
    reference = sequences_from_log(log)
    stored = store.get_sequences(list(reference))
    return [u for u in reference if not stored[u].equals(reference[u])]


# -- fast: the guards on a real Valkey -------------------------------------------------------


def test_a_fenced_write_replaces_only_the_row_it_was_based_on(tmp_path, valkey):
    store = redis_store(tmp_path, valkey.connection_url)

    def seq(last_id: int) -> UserSequence:
        return UserSequence(np.array([1, 2]), np.array([1, 1], np.int8), np.array([0, 0], np.int8),
                            np.array([10, 20]), last_event_id=last_id)

    assert store.write_sequences_fenced({7: seq(10), 8: seq(11)}, {7: -1, 8: -1}) == []  # no rows yet
    assert store.write_sequences_fenced({7: seq(5), 8: seq(20)}, {7: 3, 8: 11}) == [7]  # 7 was not at 3
    assert store.get_last_event_ids([7, 8]) == {7: 10, 8: 20}
    assert store.write_sequences_fenced({7: seq(30)}, {7: -1}) == [7]  # a row exists: not "no row"


def test_a_paused_worker_neither_regresses_nor_gaps_rows_a_newer_owner_wrote(tmp_path, valkey, sim_batches):
    """Two owners of the same users, as after a rebalance while one was paused: the stale
    one resumes with its old cache (and with a batch from before or after the takeover);
    every row still ends at the recompute."""
    store = redis_store(tmp_path, valkey.connection_url)
    thirds = np.array_split(np.arange(len(sim_batches)), 3)
    first, second, third = (EventBatch.concat([sim_batches[i] for i in part]) for part in thirds)
    stale = SequenceState(store, 256)
    stale.apply(first)  # then paused, holding `first`'s rows in its cache
    successor = SequenceState(store, 256)
    successor.apply(EventBatch.concat([first, second]))
    stale.apply(second)  # a batch it had in hand: must not overwrite the successor's rows
    assert stale.fenced_writes > 0
    stale.apply(third)  # events past the takeover, on a cache that misses `second`: no gap
    successor.apply(third)
    assert wrong_users(store, EventBatch.concat([first, second, third])) == []


def test_rows_the_store_lost_are_rewritten_from_the_workers_state(tmp_path, valkey, sim_batches):
    store = redis_store(tmp_path, valkey.connection_url)
    half = len(sim_batches) // 2
    first, second = EventBatch.concat(sim_batches[:half]), EventBatch.concat(sim_batches[half:])
    state = SequenceState(store, 256)
    state.apply(first)
    def listeners(log: EventBatch) -> set[int]:  # users whose sequence the batch writes
        return set(log.user_id[np.isin(log.behaviour, SEQUENCE_BEHAVIOUR_CODES)].tolist())

    lost = sorted(listeners(first) & listeners(second))[:10]
    client = store._redis.client
    client.delete(*[store._redis.key(k) for k in store._keys("user_id", lost)])  # acknowledged, then gone
    state.apply(second)
    assert state.rewritten_after_loss >= len(lost)
    assert wrong_users(store, EventBatch.concat([first, second])) == []


def test_a_track_flush_by_a_replaced_owner_writes_nothing(tmp_path, valkey, sim_batches):
    """Two workers count the same partition, as after a rebalance while one was paused:
    the one whose claim is older writes nothing and reports the partition refused."""
    from streaming.online_state import TrackStatsState

    store = redis_store(tmp_path, valkey.connection_url)
    log = EventBatch.concat(sim_batches[:20])
    stale, successor = TrackStatsState(store), TrackStatsState(store)
    stale_claim = {0: store.claim_owner("tracks:0")}
    stale.add(log)
    successor_claim = {0: store.claim_owner("tracks:0")}  # the rebalance: a newer generation
    successor.add(log)
    assert successor.flush_owned(successor_claim, partitions=1) == []
    written = store.read_track_stats(np.unique(log.track_id))
    stale.add(EventBatch.concat(sim_batches[20:30]))  # resumes with its old counts and a batch in hand
    assert stale.flush_owned(stale_claim, partitions=1) == [0]
    assert store.read_track_stats(written.track_ids).equals(written)  # nothing overwritten
    assert stale.flush_owned({}, partitions=1) == []  # and its cache was dropped: nothing left to write


@pytest.fixture(params=["sqlite", "redis"])
def any_store(request, tmp_path):
    if request.param == "sqlite":
        store = FeatureStoreClient(tmp_path / "feast")
        store.apply()
        yield store
    else:
        with start_valkey(tmp_path / "valkey") as server:
            yield redis_store(tmp_path, server.connection_url)


def test_track_counts_are_exactly_once_across_redeliveries_and_a_paused_owner(any_store, sim_batches, monkeypatch):
    """What doubled counts in the paused-worker fault, replayed by hand: a successor
    consumes from the last commit what the paused owner had flushed, a sequence_builder
    forwards a batch again (in the same batch as its first copy, too), the paused owner
    resumes with a batch in hand. Every count ends equal to the recompute (0 doubled)."""
    from features.track_stats import track_stats_from_log
    from streaming.online_state import TrackStatsState

    store, source_partitions = any_store, 4
    log = EventBatch.concat(sim_batches[:30])
    parts = [EventBatch.concat(sim_batches[i:j]) for i, j in ((0, 20), (10, 25), (20, 25), (25, 30))]
    stale = TrackStatsState(store, source_partitions)
    stale_claim = {0: store.claim_owner("tracks:0")}
    stale.add(parts[0])
    assert stale.flush_owned(stale_claim, partitions=1) == []  # flushed, its offsets never committed
    successor = TrackStatsState(store, source_partitions)  # the rebalance: a newer generation
    successor_claim = {0: store.claim_owner("tracks:0")}
    successor.add(parts[1])  # from the last commit: batches 10-19 were counted by the paused owner
    successor.add(EventBatch.concat([parts[2], parts[2]]))  # forwarded again, twice in one batch
    if store._redis is not None:  # SQLite takes one writer process: no paused owner to fence
        stale.add(parts[3])  # the paused owner resumes with a batch in hand
        assert stale.flush_owned(stale_claim, partitions=1) == [0]
    successor.add(parts[3])
    assert successor.flush_owned(successor_claim, partitions=1) == []
    expected = track_stats_from_log(log)
    assert store.read_track_stats(expected.track_ids).equals(expected)
    assert successor.copies_skipped == len(EventBatch.concat(sim_batches[10:20])) + 2 * len(parts[2])
    # The marks: per events partition, the newest event id counted; the reference read agrees.
    _, marks = store.read_track_rows(expected.track_ids, source_partitions)
    user_partition = log.user_id % source_partitions
    for row in (0, len(expected) // 2, len(expected) - 1):
        mine = log.track_id == expected.track_ids[row]
        for p in range(source_partitions):
            ids = log.event_id[mine & (user_partition == p)]
            assert marks[row, p] == (ids.max() if len(ids) else -1)
    monkeypatch.setattr(store, "_read_values", lambda *args: None)
    stats, reference = store.read_track_rows(expected.track_ids, source_partitions)
    assert stats.equals(expected) and np.array_equal(reference, marks)


def test_rows_written_off_the_kafka_path_carry_no_marks(any_store, sim_batches):
    """A rebuilt row (the embedded updater, `replay --into`) counts nothing from any Kafka
    partition; marks for another partition count are refused, naming the repair."""
    from features.track_stats import track_stats_from_log

    stats = track_stats_from_log(EventBatch.concat(sim_batches[:5]))
    any_store.write_track_stats(stats, marks=np.full((len(stats), 2), 7))
    with pytest.raises(ValueError, match="marked for 2 events partitions, the stream has 4.*replay --into"):
        any_store.read_track_rows(stats.track_ids, 4)
    any_store.write_track_stats(stats)
    _, marks = any_store.read_track_rows(stats.track_ids, 4)
    assert (marks == -1).all()


def test_a_guarded_write_refuses_a_store_that_lost_its_data(tmp_path, valkey, sim_batches):
    store = redis_store(tmp_path, valkey.connection_url)
    store.guard_store_loss = True
    SequenceState(store, 256).apply(sim_batches[0])
    store._redis.client.flushall()  # what a restart without persistence leaves
    with pytest.raises(StoreLostError, match="replay --into"):
        SequenceState(store, 256).apply(sim_batches[1])
    assert store._redis.client.dbsize() == 0  # nothing written onto the emptied store


def test_the_local_valkey_keeps_acknowledged_writes_across_a_sigkill(tmp_path, valkey, sim_batches):
    store = redis_store(tmp_path, valkey.connection_url)
    log = EventBatch.concat(sim_batches[:10])
    SequenceState(store, 256).apply(log)
    valkey.kill()
    valkey.start()
    assert store._redis.marked()
    assert wrong_users(store, log) == []


def test_replay_into_rebuilds_a_live_store_exactly_from_the_command_line(tmp_path, valkey, sim_batches):
    """`climber replay <run> --into redis://...` overwrites stale and missing rows of a live
    store with what the log gives, and a wrong URL is refused with the reason."""
    from typer.testing import CliRunner

    from experiments.recorder import RunRecorder
    from sandbox.cli import app
    from streaming.audit import audit_store

    log = EventBatch.concat(sim_batches[:30])
    recorder = RunRecorder(tmp_path / "source.duckdb")
    recorder.log_events(log)
    recorder.close()
    store = redis_store(tmp_path, valkey.connection_url)
    SequenceState(store, 256).apply(EventBatch.concat(sim_batches[:10]))  # a stale store ...
    store._redis.client.delete(store._redis.key(store._keys("user_id", [int(log.user_id[0])])[0]))  # ... with a hole
    assert audit_store(store, log).users_wrong > 0
    runner = CliRunner()
    result = runner.invoke(app, ["replay", str(tmp_path / "source.duckdb"), "--into", valkey.connection_url,
                                 "--out", str(tmp_path / "runs"), "--run-id", "rebuild"])
    assert result.exit_code == 0, result.output
    audit = audit_store(store, log)
    assert audit.users_wrong == 0 and audit.track_counts_lost == audit.track_counts_doubled == 0, audit
    refused = runner.invoke(app, ["replay", str(tmp_path / "source.duckdb"), "--into", "localhost:6379"])
    assert refused.exit_code == 2 and "expected redis://host:port" in refused.output


# -- slow: faults injected into the real stack ---------------------------------------------

FAULT_REPORT = os.environ.get("CLIMBER_FAULT_REPORT")  # a JSON-lines file the results table is made from


def report_fault(fault: str, audit=None, recovered: bool | None = None, **extra) -> None:
    """Append one row of docs/results.md's fault table when CLIMBER_FAULT_REPORT names a file."""
    if FAULT_REPORT:
        row = {"fault": fault, **(audit.to_dict() if audit else {}), "recovered": recovered, **extra}
        with open(FAULT_REPORT, "a") as f:
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def broker(tmp_path):
    from streaming.broker import start_broker

    with start_broker(log_path=tmp_path / "tansu.log") as running:
        yield running


@pytest.fixture
def workers():
    from streaming.worker import stop_worker

    started: list[subprocess.Popen] = []
    yield started
    for process in started:  # all at once: each clean shutdown takes seconds
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in started:
        stop_worker(process, timeout_s=20)


def produce(settings, batches: list[EventBatch], seconds: float) -> threading.Thread:
    """Produce `batches` spread over `seconds` from a thread (started)."""
    from streaming.producer import KafkaEventSink

    def run() -> None:
        with KafkaEventSink(settings) as sink:
            for batch in batches:
                sink(batch)
                time.sleep(seconds / len(batches))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def latest_assignment(path: Path) -> set[int]:
    lines = [line for line in path.read_text(errors="replace").splitlines() if "assigned events[" in line]
    return assigned_partitions(lines[-1]) if lines else set()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(poll_s)


def settle(store, log: EventBatch, timeout_s: float = 90) -> None:
    """Wait until the sequences caught up and the track totals stopped changing."""
    from features.store import wait_until_visible
    from streaming.audit import last_token_ids

    wait_until_visible(store, last_token_ids(log), timeout_s)
    tracks = np.unique(log.track_id)
    previous, deadline = None, time.monotonic() + 30
    while time.monotonic() < deadline:  # two track flushes apart
        current = store.read_track_stats(tracks).totals
        if previous is not None and np.array_equal(previous, current) and current.sum() >= len(log):
            return
        previous = current
        time.sleep(1.5)


PAUSE_S = 20  # the fault: SIGSTOP for 20 s, past the 3 s session timeout, then SIGCONT


@pytest.mark.slow
@pytest.mark.faults
def test_a_worker_paused_past_a_rebalance_does_not_overwrite_newer_rows(broker, tmp_path, sim_batches, workers):
    """SIGSTOP a worker (both agents) mid-stream for 20 s: the other takes its partitions
    and writes newer rows; SIGCONT: the paused one resumes with batches in hand and stale
    caches. Its sequence writes are fenced and its track flushes refused, so every sequence
    ends at the recompute; the survivor consumes again what the victim had forwarded or
    flushed but not committed, and the rows' source marks skip those copies: no track count
    is lost or doubled."""
    from streaming.audit import audit_store
    from streaming.settings import StreamSettings
    from streaming.worker import prepare_stream, spawn_worker

    with start_valkey(tmp_path / "valkey") as valkey:
        settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", online_store="redis",
                                  redis_url=valkey.connection_url, session_timeout_ms=3000, batch_ms=10)
        prepare_stream(settings)
        logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
        workers.extend(spawn_worker(settings, path) for path in logs)
        wait_for(lambda: len(latest_assignment(logs[0])) == 2 and len(latest_assignment(logs[1])) == 2, 60,
                 "the split of the partitions between the two workers")
        victim_partitions = latest_assignment(logs[0])
        log = EventBatch.concat(sim_batches)
        store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
        victim_users = [u for u in np.unique(log.user_id).tolist() if u % 4 in victim_partitions]

        producer = produce(settings, sim_batches, seconds=PAUSE_S + 6)
        wait_for(lambda: any(s.last_event_id >= 0 for s in store.get_sequences(victim_users).values()), 30,
                 "a first write by the victim", poll_s=0.02)
        os.kill(workers[0].pid, signal.SIGSTOP)
        paused = time.monotonic()
        try:
            wait_for(lambda: latest_assignment(logs[1]) == {0, 1, 2, 3}, PAUSE_S, "the survivor's takeover")
            assert producer.is_alive(), "the stream ended before the takeover; slow the producer down"
            time.sleep(max(0.0, paused + PAUSE_S - time.monotonic()))  # the survivor writes newer rows meanwhile
        finally:
            os.kill(workers[0].pid, signal.SIGCONT)
        producer.join()
        settle(store, log)
        audit = audit_store(store, log)
        victim_log = logs[0].read_text(errors="replace")
        report_fault("worker SIGSTOP 20 s past a rebalance, then SIGCONT", audit, audit.sequences_exact,
                     fenced_sequence_writes=victim_log.count("fenced "),
                     refused_track_flushes=victim_log.count("track flush refused"),
                     track_copies_skipped=sum(int(n) for n in re.findall(
                         r"skipped (\d+) track events", victim_log + logs[1].read_text(errors="replace"))))
        assert audit.users_wrong == 0, audit
        assert audit.track_counts_lost == audit.track_counts_doubled == 0, audit


@pytest.mark.slow
@pytest.mark.faults
def test_a_valkey_restart_mid_stream_loses_no_user(broker, tmp_path, sim_batches, workers):
    """SIGKILL the Valkey server mid-stream, restart it 3 s later on the same port: the
    append-only file brings back every acknowledged write, the workers log the outage and
    its end, retry, and every sequence ends at the recompute."""
    from streaming.audit import audit_store
    from streaming.settings import StreamSettings
    from streaming.worker import prepare_stream, spawn_worker

    with start_valkey(tmp_path / "valkey") as valkey:
        settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", online_store="redis",
                                  redis_url=valkey.connection_url, session_timeout_ms=3000, batch_ms=10)
        prepare_stream(settings)
        logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
        workers.extend(spawn_worker(settings, path) for path in logs)
        wait_for(lambda: all(latest_assignment(path) for path in logs), 60, "both workers' assignments")
        log = EventBatch.concat(sim_batches)
        store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
        producer = produce(settings, sim_batches, seconds=8)
        users = np.unique(log.user_id).tolist()
        wait_for(lambda: sum(s.last_event_id >= 0 for s in store.get_sequences(users).values()) >= 10, 30,
                 "the first writes", poll_s=0.02)
        valkey.kill()
        time.sleep(3)
        assert producer.is_alive(), "the stream ended during the outage; slow the producer down"
        valkey.start()
        producer.join()
        settle(store, log)
        audit = audit_store(store, log)
        text = "".join(path.read_text(errors="replace") for path in logs)
        report_fault("Valkey SIGKILL mid-stream, restarted after 3 s (AOF on)", audit, audit.sequences_exact,
                     outages_logged=text.count("feature store outage"))
        assert audit.users_wrong == 0 and audit.track_counts_lost == 0, audit
        assert "feature store outage" in text and "feature store back" in text
        assert all(process.poll() is None for process in workers)  # carried on: nothing was lost


def _lose_the_feature_path_mid_run(run_dir, valkey, sim_batches, fault, match: str, pace_s: float = 0.0,
                                   flush_after: bool = False):
    """Feed half the log through a Kafka feature path (the first half reaches Feast), inject
    `fault(path, valkey)`, then feed the rest until the path raises `FeaturePathLost`
    matching `match`. Returns the events fed (recorded first, as EventPipeline does), the
    path and the seconds its close took."""
    from experiments.recorder import RunRecorder
    from sandbox.kafka_transport import FeaturePathLost, KafkaFeaturePath

    path = KafkaFeaturePath(run_dir, "", 4, valkey.connection_url, workers=1, max_seq_len=256, drain_timeout_s=120)
    recorder = RunRecorder(run_dir / "sandbox.duckdb")
    fed = []
    try:
        half = len(sim_batches) // 2
        for batch in sim_batches[:half]:
            recorder.log_events(batch)
            path.on_events(batch)
            fed.append(batch)
        path.flush()  # the first half is in Feast
        fault(path, valkey)
        with pytest.raises(FeaturePathLost, match=match):
            for batch in sim_batches[half:]:
                recorder.log_events(batch)
                fed.append(batch)
                path.on_events(batch)
                time.sleep(pace_s)
            if flush_after:
                path.flush()
    finally:
        started = time.monotonic()
        path.close()
        closed_in = time.monotonic() - started
        recorder.close()
    return EventBatch.concat(fed), path, closed_in


def _repair_with_replay_into(tmp_path, run_dir, valkey, log, fault: str) -> None:
    """Audit the store, rebuild it with `replay --into` from the run's DuckDB record, and
    require the rebuilt store to equal the recompute from the log exactly."""
    from sandbox.replay import replay
    from sandbox.settings import SandboxSettings
    from streaming.audit import audit_store

    store = FeatureStoreClient(run_dir / "feast", "redis", valkey.connection_url)
    before = audit_store(store, log)
    settings = SandboxSettings(out=tmp_path / "runs", run_id="repair", online_store="redis",
                               redis_url=valkey.connection_url)
    result = replay(run_dir / "sandbox.duckdb", settings)
    after = audit_store(store, log)
    report_fault(fault, before, False, users_wrong_after_repair=after.users_wrong)
    assert result.ok and after.users_wrong == 0 and after.track_counts_lost == after.track_counts_doubled == 0, after


@pytest.mark.slow
@pytest.mark.faults
def test_a_store_that_lost_its_data_stops_the_workers_and_the_sandbox_and_replay_into_repairs_it(tmp_path, sim_batches):
    """Valkey loses everything mid-run (what a restart without persistence does; here a
    FLUSHALL): the worker refuses to write on (exit 3), the sandbox's feature path stops
    naming it, and `replay --into` rebuilds the store from the DuckDB record."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with start_valkey(tmp_path / "valkey") as valkey:
        log, _, _ = _lose_the_feature_path_mid_run(
            run_dir, valkey, sim_batches, lambda path, valkey: valkey.client().flushall(),
            r"exited with code 3 \(the online store lost its data\)", pace_s=0.05, flush_after=True)
        worker_log = (run_dir / "worker-sequences-0.log").read_text(errors="replace")
        assert "feature store lost its data" in worker_log
        _repair_with_replay_into(tmp_path, run_dir, valkey, log, "Valkey emptied mid-run (as a restart without "
                                 "persistence; workers refuse, sandbox stops; replay --into repairs)")


@pytest.mark.slow
@pytest.mark.faults
def test_a_worker_stops_within_its_shutdown_timeout_after_a_broker_restart(tmp_path, sim_batches, workers):
    """The broker is SIGKILLed and restarted empty on the same port; SIGTERM to the worker
    must end it within `shutdown_timeout_s` (it used to wait in `wait_empty` for minutes)."""
    from streaming.broker import start_broker
    from streaming.settings import StreamSettings
    from streaming.worker import SHUTDOWN_TIMEOUT_EXIT, prepare_stream, spawn_worker

    broker = start_broker(log_path=tmp_path / "tansu.log")
    try:
        with start_valkey(tmp_path / "valkey") as valkey:
            settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", online_store="redis",
                                      redis_url=valkey.connection_url, session_timeout_ms=3000, shutdown_timeout_s=5)
            prepare_stream(settings)
            worker_log = tmp_path / "worker.log"
            workers.append(spawn_worker(settings, worker_log))
            wait_for(lambda: latest_assignment(worker_log), 60, "the worker's assignment")
            produce(settings, sim_batches[:20], seconds=1).join()
            store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
            wait_for(lambda: any(v >= 0 for v in store.get_last_event_ids(range(200)).values()), 30, "a first write")
            broker.process.kill()
            broker.process.wait()
            broker = start_broker(port=broker.port, log_path=tmp_path / "tansu-2.log")
            time.sleep(3)  # the worker meets the empty broker
            started = time.monotonic()
            workers[0].send_signal(signal.SIGTERM)
            code = workers[0].wait(timeout=settings.shutdown_timeout_s + 15)
            took = time.monotonic() - started
    finally:
        broker.stop()
    report_fault("broker SIGKILL + restart (empty), then SIGTERM to the worker", shutdown_s=round(took, 1),
                 exit_code=code, shutdown_timeout_s=settings.shutdown_timeout_s)
    assert code in (0, SHUTDOWN_TIMEOUT_EXIT) and took < settings.shutdown_timeout_s + 10, (code, took)


@pytest.mark.slow
@pytest.mark.faults
def test_the_sandbox_stops_naming_what_a_lost_broker_cost_and_replay_into_repairs_it(tmp_path, sim_batches):
    """The sandbox's own in-memory broker dies mid-run: the feature path raises
    `FeaturePathLost` naming the users whose newest events never reached Feast, closes
    within bounded time, and `replay --into` rebuilds the live store from the DuckDB record."""
    def kill_the_broker(path, valkey) -> None:
        path.broker.process.kill()
        path.broker.process.wait()

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with start_valkey(tmp_path / "valkey") as valkey:
        log, path, closed_in = _lose_the_feature_path_mid_run(
            run_dir, valkey, sim_batches, kill_the_broker, r"in-memory.*users' newest events are not in Feast.*replay")
        assert closed_in < 45, f"closing the feature path took {closed_in:.0f} s"
        assert not any(process.poll() is None for process in path.workers)
        _repair_with_replay_into(tmp_path, run_dir, valkey, log,
                                 "local in-memory broker SIGKILLed mid-run (sandbox stops; replay --into repairs)")


KILLED_SANDBOX = """
import json, sys, time
from pathlib import Path
from experiments.recorder import RunRecorder
from sandbox.kafka_transport import KafkaFeaturePath
from bench.stream import simulated_log
run_dir = Path(sys.argv[1])
path = KafkaFeaturePath(run_dir, "", 4, "", workers=1, max_seq_len=256)  # starts broker, Valkey, workers
recorder = RunRecorder(run_dir / "sandbox.duckdb", flush_seconds=1.0)
pids = [path.broker.process.pid, path.valkey.process.pid, *(w.pid for w in path.workers)]
(run_dir / "children.json").write_text(json.dumps(pids))
with open(run_dir / "fed.txt", "w") as fed:
    while True:
        for batch in simulated_log(20_000, seed=5, n_users=300):
            recorder.log_events(batch)
            path.on_events(batch)
            fed.write(f"{time.time()} {int(batch.event_id.max())}\\n")
            fed.flush()
            time.sleep(0.05)
        break
time.sleep(3600)
"""


@pytest.mark.slow
@pytest.mark.faults
def test_a_killed_sandbox_leaves_no_children_and_a_bounded_record_tail(tmp_path):
    """SIGKILL the process that runs the feature path and the recorder: its broker, Valkey and
    workers die with it, and the DuckDB record ends at most ~flush_seconds before the kill,
    at the event id its `flushes` table names."""
    import duckdb

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    script = tmp_path / "killed_sandbox.py"  # not sandbox.py: that would shadow the package
    script.write_text(KILLED_SANDBOX)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with open(tmp_path / "sandbox.log", "wb") as out:
        parent = subprocess.Popen([os.sys.executable, str(script), str(run_dir)], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        def feeding() -> bool:
            assert parent.poll() is None, (tmp_path / "sandbox.log").read_text()[-2000:]
            return (run_dir / "fed.txt").exists() and len((run_dir / "fed.txt").read_text().splitlines()) > 40

        wait_for(feeding, 120, "the sandbox feeding events")
        children = json.loads((run_dir / "children.json").read_text())
        killed_at = time.time()
        parent.kill()
        parent.wait()
    finally:
        if parent.poll() is None:
            parent.kill()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        stat = Path(f"/proc/{pid}/stat")  # a zombie (not reaped yet) counts as dead
        return not (stat.exists() and stat.read_text().split(")")[1].split()[0] == "Z")

    wait_for(lambda: not any(alive(pid) for pid in children), 10, "the children's deaths (broker, Valkey, worker)")
    fed = [line.split() for line in (run_dir / "fed.txt").read_text().splitlines() if len(line.split()) == 2]
    with duckdb.connect(str(run_dir / "sandbox.duckdb"), read_only=True) as db:
        last_flushed = db.execute("SELECT max(last_event_id) FROM flushes").fetchone()[0]
        recorded = db.execute("SELECT count(*), max(event_id) FROM events").fetchone()
    assert last_flushed is not None and recorded[1] == last_flushed
    fed_at = next(float(t) for t, last in fed if int(last) >= last_flushed)
    tail = sum(1 for t, last in fed if int(last) > last_flushed)
    figures = {"fed_batches": len(fed), "tail_batches": tail, "tail_seconds": round(killed_at - fed_at, 1),
               "recorded_events": recorded[0], "orphans": 0}
    report_fault("sandbox SIGKILL (recorder flush_seconds=1)", **figures)
    assert killed_at - fed_at < 1.0 + 3.0, figures  # flush_seconds, plus one batch and scheduling
