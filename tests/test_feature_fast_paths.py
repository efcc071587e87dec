"""Each fast path of the feature pipeline against the plain version it replaced.

The fast paths (numpy ValueProto decoding, direct SQLite reads, multi-row upserts, the
batch-gathered `apply_events`, in-place track statistics) must give exactly what the
reference gives: protobuf itself, Feast's `online_read`, `executemany`, the per-user loop.
"""

from __future__ import annotations

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from hypothesis import given, settings, strategies as st

from features.feast_codec import (decode_float64_lists, decode_int64_lists, decode_int64s, encode_float64_lists,
                                  encode_int64_lists, encode_int64s)
from features.sequence import UserSequence, apply_events, apply_events_reference, sequences_from_log
from features.sqlite_rows import FeatureColumns, sqlite_ts
from features.store import FeatureStoreClient
from features.track_stats import TrackStats, apply_track_events, apply_track_events_reference
from features.updater import FeatureUpdater
from streaming.events import EventBatch
from streaming.online_state import TrackStatsState

from tests.support import HOUR_MS, assert_same_sequences, random_sequence
from tests.support import event_log as features_event_log

EPOCH_2026_MS = 1_767_225_600_000


def event_log(n: int, n_users: int = 20, n_tracks: int = 30, seed: int = 0) -> EventBatch:
    """`tests.test_features.event_log` over 72 hours from 2026-01-01 (real epoch times)."""
    return features_event_log(n, n_users, n_tracks, seed=seed, start_ms=EPOCH_2026_MS)


# -- decoding: what protobuf parses -------------------------------------------------------

INT64S = st.lists(st.integers(-2**63, 2**63 - 1), max_size=30)
WIDE_OR_UNIFORM = st.one_of(INT64S, st.lists(st.integers(2**35, 2**42 - 1), max_size=30),
                            st.lists(st.integers(0, 127), max_size=30))


def protobuf_lists(field: str, lists: list[list]) -> list[bytes]:
    """Each list as protobuf serialises `ValueProto(<field>=...)`, empty lists included."""
    blobs = []
    for values in lists:
        proto = ValueProto()
        getattr(proto, field).SetInParent()
        getattr(proto, field).val.extend(values)
        blobs.append(proto.SerializeToString())
    return blobs


@settings(max_examples=60, deadline=None)
@given(lists=st.lists(WIDE_OR_UNIFORM, max_size=6))
def test_int64_decoders_read_what_protobuf_wrote(lists):
    flat, lengths = decode_int64_lists(protobuf_lists("int64_list_val", lists))
    assert flat.tolist() == [v for values in lists for v in values]
    assert lengths.tolist() == [len(values) for values in lists]
    scalars = [v for values in lists for v in values]
    assert decode_int64s([ValueProto(int64_val=v).SerializeToString() for v in scalars]).tolist() == scalars


@settings(max_examples=30, deadline=None)
@given(lists=st.lists(st.lists(st.floats(allow_nan=False), max_size=10), max_size=5))
def test_float64_list_decoder_reads_what_protobuf_wrote(lists):
    flat, lengths = decode_float64_lists(protobuf_lists("double_list_val", lists))
    assert flat.tolist() == [v for values in lists for v in values]
    assert lengths.tolist() == [len(values) for values in lists]


def test_decoders_fall_back_to_protobuf_for_other_layouts():
    """Valid protobuf that is not laid out as our encoder writes it (unpacked values, an
    unset value) is still decoded, by protobuf."""
    unpacked = bytes([0x72, 4, 0x08, 5, 0x08, 7])  # Int64List with two unpacked val fields
    assert ValueProto.FromString(unpacked).int64_list_val.val == [5, 7]
    flat, lengths = decode_int64_lists([encode_int64_lists(np.array([1, 2]), np.array([2]))[0], unpacked, b""])
    assert flat.tolist() == [1, 2, 5, 7] and lengths.tolist() == [2, 2, 0]
    assert decode_int64s([b"", encode_int64s(np.array([300]))[0]]).tolist() == [0, 300]


def test_round_trip_of_mixed_widths():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 40, 50)
    flat = rng.integers(-2**62, 2**62, int(lengths.sum())) >> rng.integers(0, 62, int(lengths.sum()))
    got, got_lengths = decode_int64_lists(encode_int64_lists(flat, lengths))
    assert got.tolist() == flat.tolist() and got_lengths.tolist() == lengths.tolist()
    doubles = rng.normal(size=int(lengths.sum()))
    got, _ = decode_float64_lists(encode_float64_lists(doubles, lengths))
    assert np.array_equal(got, doubles)


# -- the store: fast reads and multi-row writes against Feast's own paths -----------------


def assert_same(got: dict[int, UserSequence], expected: dict[int, UserSequence]) -> None:
    """`assert_same_sequences`, and the users in the same order."""
    assert list(got) == list(expected)
    assert_same_sequences(got, expected)


def test_fast_sequence_reads_equal_feasts_online_read(client):
    rng = np.random.default_rng(1)
    written = {u: random_sequence(int(rng.integers(0, 300)), rng, u) for u in range(40)}
    written[40] = UserSequence.empty()
    client.write_sequences(written, event_ts=1_000)
    users = [5, 40, 999, 5, *range(41)]
    assert_same(client.get_sequences(users), client.get_sequences_via_feast(users))
    assert_same(client.get_sequences(users), {u: written.get(u, UserSequence.empty()) for u in users})


def test_fast_track_reads_equal_feasts_online_read(client):
    stats = apply_track_events(None, event_log(2_000, n_tracks=300))
    client.write_track_stats(stats)
    ids = np.array([7, 10_000, *stats.track_ids[::3]])
    assert client.read_track_stats(ids).equals(client.read_track_stats_via_feast(ids), rtol=0)


@pytest.mark.parametrize("users", [1, 7, 300])
def test_multi_row_upsert_stores_the_rows_executemany_stores(client, tmp_path, users):
    """Same rows, byte for byte, as the one-`executemany` reference; chunking included
    (300 users are 1,800 rows: more than one full chunk)."""
    reference = FeatureStoreClient(tmp_path / "reference")
    reference.apply()
    rng = np.random.default_rng(users)
    seqs = {u: random_sequence(int(rng.integers(0, 256)), rng, u) for u in range(users)}
    for store, method in ((client, "upsert"), (reference, "upsert_reference")):
        values = list(seqs.values())
        lengths = np.array([len(s) for s in values])
        columns = FeatureColumns(len(values))
        columns.int64_lists(("track_ids", "timestamps"), [np.concatenate([s.track_ids for s in values]),
                                                          np.concatenate([s.timestamps for s in values])], lengths)
        columns.int64s(("length",), [lengths])
        stamps = [sqlite_ts(1_767_225_600_123)] * users
        getattr(store._sqlite, method)(store._table("user_sequence"), store._keys("user_id", list(seqs)), columns,
                                       stamps)

    def stored(store):
        connection = store.store.provider.online_store._get_conn(store.store.config)
        return sorted(connection.execute("SELECT entity_key, feature_name, value, value_text, event_ts, created_ts "
                                         "FROM climber_user_sequence").fetchall())
    assert stored(client) == stored(reference)


# -- sequences: the batch-gathered apply_events against the per-user loop ------------------


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 600), max_size=6), max_len=st.sampled_from([1, 5, 32, 256]),
       redeliver=st.booleans())
def test_apply_events_equals_the_per_user_reference(cuts, max_len, redeliver):
    log = event_log(600, n_users=8)
    bounds = sorted({0, 600, *cuts})
    fast: dict[int, UserSequence] = {}
    reference: dict[int, UserSequence] = {}
    for start, end in zip(bounds, bounds[1:]):
        batch = log.select(np.arange(start, end))
        if redeliver and start:  # the previous events again, with the new ones
            batch = EventBatch.concat([log.select(np.arange(max(0, start - 50), start)), batch])
        got, expected = apply_events(fast, batch, max_len), apply_events_reference(reference, batch, max_len)
        assert_same(dict(sorted(got.items())), dict(sorted(expected.items())))
        fast.update(got)
        reference.update(expected)
    assert_same(dict(sorted(fast.items())), dict(sorted(sequences_from_log(log, max_len).items())))


# -- track statistics: sort-based grouping and in-place updates ----------------------------


@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 800), max_size=5), shuffle=st.booleans())
def test_track_events_equal_the_unique_and_ufunc_at_reference(cuts, shuffle):
    log = event_log(800, n_tracks=40, seed=2)
    if shuffle:
        log = log.select(np.random.default_rng(len(cuts)).permutation(len(log)))
    bounds = sorted({0, 800, *cuts})
    fast = reference = TrackStats.empty()
    for start, end in zip(bounds, bounds[1:]):
        batch = log.select(np.arange(start, end))
        got, expected = apply_track_events(fast, batch), apply_track_events_reference(reference, batch)
        assert got.equals(expected, rtol=0)
        fast, reference = fast.upsert_in_place(got), reference.upsert(expected)
        assert fast.equals(reference, rtol=0)


def test_upsert_in_place_writes_into_held_rows_and_merges_new_ones():
    stats = apply_track_events(None, event_log(300, n_tracks=10))
    held = stats.lookup(stats.track_ids[:3])
    assert stats.upsert_in_place(TrackStats.zeros(held.track_ids)) is stats  # no copy
    assert stats.lookup(held.track_ids).totals.sum() == 0
    merged = stats.upsert_in_place(TrackStats.zeros(np.array([3, 42])))
    assert merged is not stats and 42 in merged.track_ids.tolist()
    assert merged.holds(np.array([42, 43, 3])).tolist() == [True, False, True]


def test_updater_writes_the_same_track_rows_as_a_recompute(client):
    """The updater's dense, in-place track state pushes exactly the touched tracks' rows."""
    log = event_log(3_000, n_tracks=500)
    updater = FeatureUpdater(client, max_len=16, flush_ms=1000 * HOUR_MS, track_flush_ms=1000 * HOUR_MS,
                             background=False)  # one push at the end
    for chunk in np.array_split(np.arange(len(log)), 17):
        updater.on_events(log.select(chunk))
    updater.flush()
    expected = apply_track_events_reference(None, log)
    assert updater.track_rows_written == len(expected)
    assert client.read_track_stats(np.arange(600)).equals(expected.lookup(np.arange(600)), rtol=1e-12)


@pytest.mark.parametrize("fresh_min_rows", [TrackStatsState.FRESH_MIN_ROWS, 8])
def test_track_stats_state_flushes_what_a_recompute_gives(client, fresh_min_rows):
    """Whether first-seen tracks stay in their own tier (the default, at this size) or are
    merged into the settled rows every few batches (8), a flush writes the recompute."""
    log = event_log(2_000, n_tracks=200, seed=5)
    state = TrackStatsState(client)
    state.FRESH_MIN_ROWS = fresh_min_rows
    for chunk in np.array_split(np.arange(len(log)), 9):
        state.add(log.select(chunk))
        if chunk[0] % 2:
            state.flush()
    state.flush()
    assert state.flush() == 0
    expected = apply_track_events_reference(None, log)
    assert client.read_track_stats(expected.track_ids).equals(expected, rtol=1e-12)
    restarted = TrackStatsState(client)  # restores rows from Feast, then counts on
    restarted.add(log.select(np.arange(10)))
    restarted.flush()
    again = apply_track_events_reference(expected, log.select(np.arange(10)))
    assert client.read_track_stats(again.track_ids).equals(again, rtol=1e-12)
