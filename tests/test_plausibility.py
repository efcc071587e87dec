"""Plausibility bounds (issue 20): well-formed events that would poison state are dead letters.

The gate alone, then the embedded pipeline end to end (DuckDB record, Feast sequences,
track statistics): a far-ahead event_id, a year-9999 ts, a repeated event_id with other
content, ids outside the catalogue, a play longer than its track."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.recorder import RunRecorder
from features.sequence import sequences_from_log
from features.store import FeatureStoreClient
from features.track_stats import track_stats_from_log
from features.updater import FeatureUpdater
from sandbox.loop import EventPipeline, Stopwatch
from bench.stream import simulated_log
from streaming.bus import InProcessBus
from streaming.events import BEHAVIOUR_CODE, EventBatch
from streaming.plausibility import DAY_MS, EventBounds, PlausibilityGate, content_digest
from tests.support import SIM_LOG_TRACKS as N_TRACKS, SIM_LOG_USERS as N_USERS, a_play, hostile_events, one


@pytest.fixture(scope="module")
def log() -> EventBatch:
    return EventBatch.concat(simulated_log(4_000, seed=5, n_users=N_USERS))


def bounds() -> EventBounds:
    return EventBounds(n_users=N_USERS, n_tracks=N_TRACKS, max_play_ms=900_000)


def test_the_gate_accepts_every_simulated_event(log):
    gate = PlausibilityGate(bounds(), id_watermark=-1)
    good, dead = gate.check(log)
    assert not dead and len(good) == len(log)
    assert gate.id_watermark == log.event_id.max() and gate.ts_watermark == log.ts.max()


def test_the_gate_dead_letters_each_hostile_event_with_its_reason(log):
    gate = PlausibilityGate(bounds(), id_watermark=-1)
    gate.check(log)
    for event, reason in hostile_events(log):
        good, dead = gate.check(event, source="test")
        assert len(good) == 0 and len(dead) == 1 and reason in dead[0].reason, (reason, dead)
        assert dead[0].reason.startswith("implausible: ") and dead[0].source == "test"
    assert gate.id_watermark == log.event_id.max()  # nothing refused moved the watermark


def test_one_wild_event_cannot_set_a_fresh_gates_watermark(log):
    """Before anything is accepted the reference is the batch's median."""
    batch = EventBatch.concat([log, one(log, 0, event_id=10**15)])
    good, dead = PlausibilityGate(bounds()).check(batch)
    assert len(good) == len(log) and len(dead) == 1 and "event_id" in dead[0].reason


def test_a_fresh_workers_first_batch_of_one_wild_event_is_judged_by_the_stored_state(log, tmp_path):
    """A worker that starts on a running stream (its store holds the first part of the log)
    and whose first batch is a single wild event: the stored users and tracks are the
    reference, so the event is a dead letter and sets no watermark; a batch of one good
    event passes; a backlog far past the stored state is judged by its own median."""
    from features.track_stats import track_stats_from_log
    from streaming.plausibility import stored_reference

    stored, rest = log.select(np.arange(len(log)) < len(log) // 2), log.select(np.arange(len(log)) >= len(log) // 2)
    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    store.write_sequences(sequences_from_log(stored))
    store.write_track_stats(track_stats_from_log(stored))
    i = int(np.flatnonzero(np.isin(rest.user_id, stored.user_id))[0])
    for changes, reason in (({"event_id": 10**15}, "event_id more than"), ({"ts": 253_402_300_799_000}, "ts more than")):
        wild = one(rest, i, **changes)
        unseeded = PlausibilityGate(bounds())  # before: the event was its own median
        assert len(unseeded.check(wild)[0]) == 1
        gate = PlausibilityGate(bounds())
        assert gate.needs_reference
        gate.seed(*stored_reference(store, wild))
        assert not gate.needs_reference
        good, dead = gate.check(wild, source="events[0]@7")
        assert len(good) == 0 and len(dead) == 1 and reason in dead[0].reason, dead
        assert gate.id_watermark is None and gate.ts_watermark is None  # the wild event set nothing
        assert len(gate.check(one(rest, i))[0]) == 1  # a good event alone passes
    sequence = sequences_from_log(stored)[int(rest.user_id[i])]
    assert stored_reference(store, one(rest, i)) == (
        sequence.last_event_id, int(max(sequence.timestamps[-1], stored.ts[stored.track_id == rest.track_id[i]].max(initial=0))))
    later = EventBatch.from_columns(**{**rest.columns(), "ts": rest.ts + 3 * DAY_MS})  # a backlog after an outage
    gate = PlausibilityGate(bounds())
    gate.seed(*stored_reference(store, later))
    assert len(gate.check(later)[0]) == len(later)
    nothing = FeatureStoreClient(tmp_path / "empty")
    nothing.apply()
    assert stored_reference(nothing, one(rest, i)) == (None, None)


def test_repeats_within_a_batch_keep_the_first_and_redelivery_passes_exact_repeats(log):
    head = log.select(np.arange(100))
    changed = one(log, 10, play_ms=int(log.play_ms[10]) + 1)
    good, dead = PlausibilityGate(bounds()).check(EventBatch.concat([head, changed, head.select(np.arange(3))]))
    assert np.array_equal(good.event_id, head.event_id) and len(dead) == 4
    assert "different content" in dead[0].reason and all("same content" in d.reason for d in dead[1:])
    gate = PlausibilityGate(EventBounds(redelivery=True))
    gate.check(head)
    again, dead = gate.check(EventBatch.concat([head, changed]))  # a redelivered batch, and a forgery
    assert len(again) == len(head) and len(dead) == 1 and "different content" in dead[0].reason


def test_repeats_of_an_accepted_id_in_one_batch_are_judged_against_the_accepted_event(log):
    """An other-content copy and an exact copy of an accepted event, arriving together: the
    exact copy is a plain repeat, not "different content" from its batch-mate."""
    gate = PlausibilityGate(bounds(), id_watermark=-1)
    gate.check(log)
    i = a_play(log)
    copies = EventBatch.concat([one(log, i, behaviour=BEHAVIOUR_CODE["like"]), one(log, i)])
    good, dead = gate.check(copies)
    assert len(good) == 0 and ["different content" in d.reason for d in dead] == [True, False]
    assert "same content" in dead[1].reason


def test_content_digest_sees_every_field_but_the_id(log):
    base = content_digest(one(log, 3))[0]
    assert content_digest(one(log, 3, event_id=99))[0] == base
    event = one(log, 3).columns()
    for field, value in [("ts", 1), ("user_id", 1), ("track_id", 1), ("scenario", 4), ("behaviour", 7),
                         ("request_id", 12), ("position", 9), ("arm", "other"), ("play_ms", 3)]:
        if event[field][0] == value:  # the change must be a change, whatever the simulator logged
            value = value - 1 if isinstance(value, int) else value + "-x"
        assert content_digest(one(log, 3, **{field: value}))[0] != base, field
    long_arms = [content_digest(one(log, 3, arm=arm))[0] for arm in ("treatment-a", "treatment-b")]
    assert long_arms[0] != long_arms[1]  # arms that share their first bytes and length


def test_the_embedded_pipeline_records_counts_and_stores_none_of_them(log, tmp_path):
    """End to end: DuckDB holds only the good events, Feast's sequences and track statistics
    equal the recompute from them, and every hostile event is a dead letter. Before the
    bounds, each of these was recorded, and the far-ahead id hid the user's later events."""
    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    recorder = RunRecorder(tmp_path / "run.duckdb")
    bus = InProcessBus()
    features = FeatureUpdater(store, 256, 1_000, 1_000, background=False)
    gate = PlausibilityGate(bounds(), id_watermark=-1, ts_watermark=int(log.ts.min()))
    pipeline = EventPipeline(bus, recorder, features, [], Stopwatch(), gate)
    half = len(log) // 2
    first, rest = log.select(np.arange(half)), log.select(np.arange(half, len(log)))
    hostile = hostile_events(first)
    pipeline.on_events(first)
    for event, _ in hostile:
        pipeline.on_events(event)
    pipeline.on_events(rest)  # later good events of the same users must still count
    pipeline.finish()
    recorded = recorder.read_events()
    assert np.array_equal(np.sort(recorded.event_id), log.event_id)
    letters = recorder.connection.execute("SELECT reason FROM dead_letters").fetchall()
    assert len(letters) == len(hostile)
    reference = sequences_from_log(log, 256)
    stored = store.get_sequences(sorted(reference))
    assert all(stored[u].equals(reference[u]) for u in reference)
    expected = track_stats_from_log(log)
    assert store.read_track_stats(expected.track_ids).equals(expected)
    recorder.close()
