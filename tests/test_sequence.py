"""The pure sequence function: tokens, truncation, idempotence, batch-split invariance."""

import numpy as np
from hypothesis import given, settings, strategies as st

from features.sequence import UserSequence, apply_events, sequences_from_log
from streaming.events import BEHAVIOUR_CODE, EventBatch


def random_log(n: int, n_users: int = 4, seed: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch.from_columns(
        event_id=np.arange(n), ts=np.arange(n) * 1000, user_id=rng.integers(0, n_users, n),
        track_id=rng.integers(0, 50, n), scenario=rng.integers(0, 5, n), behaviour=rng.integers(0, 8, n),
    )


def test_impressions_are_not_tokens_and_order_is_kept():
    log = random_log(200)
    seqs = sequences_from_log(log, max_len=1000)
    for user, seq in seqs.items():
        mine = (log.user_id == user) & (log.behaviour != BEHAVIOUR_CODE["impression"])
        assert seq.track_ids.tolist() == log.track_id[mine].tolist()
        assert seq.timestamps.tolist() == log.ts[mine].tolist()
        assert seq.last_event_id == int(log.event_id[mine][-1])


def test_truncates_to_the_most_recent_tokens():
    log = random_log(500, n_users=1)
    seq = sequences_from_log(log, max_len=16)[0]
    full = sequences_from_log(log, max_len=10_000)[0]
    assert len(seq) == 16 and np.array_equal(seq.track_ids, full.track_ids[-16:])


def test_reapplying_the_same_events_changes_nothing():
    log = random_log(300)
    state = sequences_from_log(log)
    assert apply_events(state, log) == {}
    duplicated = EventBatch.concat([log, log])
    again = sequences_from_log(duplicated)
    assert all(again[u].equals(state[u]) for u in state)


def test_input_state_is_not_mutated():
    log = random_log(100)
    state = sequences_from_log(log.select(np.arange(50)))
    snapshot = {u: UserSequence(*(a.copy() for a in (s.track_ids, s.behaviours, s.scenarios, s.timestamps)),
                                s.last_event_id) for u, s in state.items()}
    apply_events(state, log.select(np.arange(50, 100)))
    assert all(state[u].equals(snapshot[u]) for u in state)


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=6), max_len=st.integers(1, 64))
def test_any_split_into_batches_gives_the_reference(cuts, max_len):
    log = random_log(400, seed=1)
    reference = sequences_from_log(log, max_len)
    state: dict = {}
    bounds = [0, *sorted(cuts), len(log)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        state.update(apply_events(state, log.select(np.arange(lo, hi)), max_len))
    assert state.keys() == reference.keys()
    assert all(state[u].equals(reference[u]) for u in reference)


@settings(max_examples=40, deadline=None)
@given(windows=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 400)), min_size=1, max_size=8),
       max_len=st.integers(1, 64))
def test_redelivered_and_overlapping_batches_give_the_reference(windows, max_len):
    """Batches that re-send earlier events (at-least-once delivery) change nothing, as long as
    every event is delivered at least once, in order per user."""
    log = random_log(400, seed=2)
    reference = sequences_from_log(log, max_len)
    state: dict = {}
    delivered = 0
    for a, b in windows:  # replay some already-delivered range, then continue where we were
        lo, hi = min(a, b, delivered), max(a, b, delivered)
        batch = log.select(np.arange(lo, hi))
        state.update(apply_events(state, EventBatch.concat([batch, batch]), max_len))
        delivered = max(delivered, hi)
    state.update(apply_events(state, log.select(np.arange(delivered, len(log))), max_len))
    assert state.keys() == reference.keys()
    assert all(state[u].equals(reference[u]) for u in reference)


def test_sequences_own_their_arrays():
    """A sequence must not be a view into a batch's arrays (it would keep them all alive)."""
    log = random_log(300)
    state = sequences_from_log(log.select(np.arange(150)), max_len=32)
    state.update(apply_events(state, log.select(np.arange(150, 300)), max_len=32))
    arrays = [a for s in state.values() for a in (s.track_ids, s.behaviours, s.scenarios, s.timestamps)]
    assert arrays and all(a.base is None for a in arrays)
