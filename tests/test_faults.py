"""Faults on the live path that used to lose data without saying so (issue 20).

Fast tests hold the guards themselves to a real Valkey: the fenced sequence write, the
store-loss marker, the persistent server. Slow tests inject each fault into the real
stack (Tansu broker, Faust worker processes, Valkey) and assert afterwards that Feast
equals the recompute from the log: a worker paused past a rebalance, a Valkey restart,
a broker restart, a killed sandbox. docs/results.md has the table these produce and
docs/streaming.md the runbook.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from features.redis_rows import StoreLostError
from features.sequence import UserSequence, sequences_from_log
from features.store import FeatureStoreClient
from streaming.bench import simulated_log
from streaming.events import EventBatch
from streaming.online_state import SequenceState
from streaming.valkey import start_valkey


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
    lost = sorted(set(first.user_id.tolist()) & set(second.user_id.tolist()))[:10]
    client = store._redis.client
    client.delete(*[store._redis.key(k) for k in store._keys("user_id", lost)])  # acknowledged, then gone
    state.apply(second)
    assert state.rewritten_after_loss >= len(lost)
    assert wrong_users(store, EventBatch.concat([first, second])) == []


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


# -- slow: faults injected into the real stack ---------------------------------------------

FAULT_REPORT = os.environ.get("CLIMBER_FAULT_REPORT")  # a JSON-lines file the results table is made from


def report_fault(fault: str, audit, recovered: bool, **extra) -> None:
    """Append one row of docs/results.md's fault table when CLIMBER_FAULT_REPORT names a file."""
    if FAULT_REPORT:
        import json

        with open(FAULT_REPORT, "a") as f:
            f.write(json.dumps({"fault": fault, **audit.to_dict(), "recovered": recovered, **extra}) + "\n")


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
    from tests.test_streaming_kafka import assigned_partitions

    lines = [line for line in path.read_text(errors="replace").splitlines() if "assigned events[" in line]
    return assigned_partitions(lines[-1]) if lines else set()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(poll_s)


def settle(store, log: EventBatch, timeout_s: float = 90) -> None:
    """Wait until the sequences caught up and the track totals stopped changing."""
    from streaming.audit import last_token_ids, wait_for_sequences

    behind = wait_for_sequences(store, last_token_ids(log), timeout_s)
    assert not behind, f"{len(behind)} users never caught up, e.g. {behind[:5]}"
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
def test_a_worker_paused_past_a_rebalance_does_not_overwrite_newer_rows(broker, tmp_path, sim_batches, workers):
    """SIGSTOP a sequence worker mid-stream for 20 s: the other takes its partitions and
    writes newer rows; SIGCONT: the paused one resumes with a batch in hand and a stale
    cache. Its writes are fenced, so every sequence ends at the recompute."""
    from streaming.audit import audit_store
    from streaming.settings import StreamSettings
    from streaming.worker import prepare_stream, spawn_worker

    with start_valkey(tmp_path / "valkey") as valkey:
        settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", online_store="redis",
                                  redis_url=valkey.connection_url, session_timeout_ms=3000, batch_ms=10)
        prepare_stream(settings)
        logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
        workers.extend(spawn_worker(settings, path, role="sequences") for path in logs)
        workers.append(spawn_worker(settings, tmp_path / "tracks.log", role="tracks"))
        wait_for(lambda: len(latest_assignment(logs[0])) == 2 and len(latest_assignment(logs[1])) == 2, 60,
                 "the split of the partitions between the two sequence workers")
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
        fenced = logs[0].read_text(errors="replace").count("fenced ")
        report_fault("worker SIGSTOP 20 s past a rebalance, then SIGCONT", audit, audit.sequences_exact,
                     fenced_batches=fenced)
        assert audit.users_wrong == 0, audit
        assert audit.track_counts_lost == 0, audit  # at-least-once: may double, never lose


@pytest.mark.slow
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
