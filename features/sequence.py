"""User behaviour sequences: the one pure function that turns events into sequence state.

The embedded loop, the Faust agents and replay all call `apply_events`, so a sequence is
the same whichever path built it (the end-to-end tests compare them against a recompute
from the DuckDB event log with `sequences_from_log`).

Which events become tokens: every behaviour except `impression`. Impressions say what was
shown, not what the user did, and would outnumber real behaviour about 3:1, pushing the
user's actual history out of a 256-token window.

Idempotence: each sequence carries `last_event_id`, the highest event id applied. Event ids
grow in emission order and a user's events stay in order (Kafka keys by user_id), so an
event at or below that mark is a duplicate (redelivery after a crash) and is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from streaming.events import BEHAVIOUR_CODE, EventBatch

DEFAULT_MAX_LEN = 256
SEQUENCE_BEHAVIOUR_CODES = np.array(
    sorted(code for name, code in BEHAVIOUR_CODE.items() if name != "impression"), dtype=np.int8
)


@dataclass(frozen=True)
class UserSequence:
    """The last `max_len` behaviour tokens of one user, oldest first."""

    track_ids: np.ndarray  # int64 [L]
    behaviours: np.ndarray  # int8 [L], codes into streaming.events.BEHAVIOURS
    scenarios: np.ndarray  # int8 [L], codes into streaming.events.SCENARIOS
    timestamps: np.ndarray  # int64 [L], simulated epoch ms
    last_event_id: int = -1  # high-water mark for idempotent re-application

    def __len__(self) -> int:
        return len(self.track_ids)

    @classmethod
    def empty(cls) -> "UserSequence":
        return cls(
            np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int8), np.zeros(0, np.int64), -1
        )

    def equals(self, other: "UserSequence") -> bool:
        return (
            self.last_event_id == other.last_event_id
            and np.array_equal(self.track_ids, other.track_ids)
            and np.array_equal(self.behaviours, other.behaviours)
            and np.array_equal(self.scenarios, other.scenarios)
            and np.array_equal(self.timestamps, other.timestamps)
        )


def sequence_tokens(events: EventBatch) -> EventBatch:
    """The events that become sequence tokens, ordered by (user_id, event_id)."""
    return events.select(_token_order(events))


_IS_TOKEN = np.zeros(256, bool)  # by behaviour code (as uint8: a negative code is not a token)
_IS_TOKEN[SEQUENCE_BEHAVIOUR_CODES.astype(np.uint8)] = True


def _token_order(events: EventBatch) -> np.ndarray:
    """Positions of the token events, ordered by (user_id, event_id)."""
    positions = np.flatnonzero(_IS_TOKEN[events.behaviour.astype(np.uint8)])
    return positions[np.lexsort((events.event_id[positions], events.user_id[positions]))]


def apply_events(
    current: Mapping[int, UserSequence], events: EventBatch, max_len: int = DEFAULT_MAX_LEN
) -> dict[int, UserSequence]:
    """Apply a batch of events to sequence state; return the new sequences of touched users.

    Pure: `current` is not modified. Users whose every token was a duplicate are not returned.

    Every touched user's new arrays (the surviving tail of the stored sequence, then the new
    tokens) are gathered for the whole batch at once, with one index shared by the four
    columns; per user only its four slices are copied.
    Copies, not views of the batch's arrays: a view would keep the whole batch alive for as
    long as its least active user goes without events. `apply_events_reference` is the
    plain per-user version the tests hold this to.
    """
    plan = _plan(current, events, max_len)
    if plan is None:
        return {}
    touched_users, stored, survivors, new_starts, n_new, last_ids = plan
    old_lengths = np.fromiter((len(s.track_ids) for s in stored), np.int64, len(stored))
    held = [s for s, n in zip(stored, old_lengths.tolist()) if n]
    n_old = np.minimum(old_lengths, max_len - n_new)
    # Segments, user by user: the kept tail of the stored arrays, then the new tokens; as
    # positions in (all stored arrays back to back) followed by (the survivors).
    old_base = np.cumsum(old_lengths) - old_lengths
    total_old = int(old_lengths.sum())
    segment_starts = np.stack((old_base + old_lengths - n_old, total_old + new_starts), axis=1).ravel()
    segment_lengths = np.stack((n_old, n_new), axis=1).ravel()
    sizes = n_old + n_new
    ends = np.cumsum(sizes)
    index = np.repeat(segment_starts - (np.cumsum(segment_lengths) - segment_lengths), segment_lengths)
    index += np.arange(len(index))

    def gathered(name: str, new: np.ndarray) -> np.ndarray:
        if not held:
            return new[index]
        return np.concatenate([getattr(s, name) for s in held] + [new])[index]

    wide = np.empty((2, len(index)), np.int64)  # track ids, timestamps
    wide[0], wide[1] = gathered("track_ids", survivors.track_id), gathered("timestamps", survivors.ts)
    narrow = np.empty((2, len(index)), np.int8)  # behaviours, scenarios
    narrow[0], narrow[1] = gathered("behaviours", survivors.behaviour), gathered("scenarios", survivors.scenario)

    updated: dict[int, UserSequence] = {}
    track_ids, timestamps, behaviours, scenarios = wide[0], wide[1], narrow[0], narrow[1]
    for user_id, start, end, last_id in zip(touched_users, (ends - sizes).tolist(), ends.tolist(), last_ids):
        updated[user_id] = UserSequence(track_ids[start:end].copy(), behaviours[start:end].copy(),
                                        scenarios[start:end].copy(), timestamps[start:end].copy(),
                                        last_event_id=last_id)
    return updated


def _plan(current: Mapping[int, UserSequence], events: EventBatch, max_len: int):
    """What `apply_events` does for the batch as a whole: which users change, their stored
    sequences, the tokens that survive dedup and truncation (grouped by user, in order),
    where each touched user's new tokens start among them and how many there are, and
    each touched user's new high-water mark. None when nothing changes."""
    order = _token_order(events)
    if len(order) == 0:
        return None
    user, ids = events.user_id[order], events.event_id[order]
    first = np.ones(len(order), bool)  # the first token of each user (tokens are grouped by user)
    np.not_equal(user[1:], user[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(starts, append=len(order))
    users = user[starts]
    previous = [current.get(u) for u in users.tolist()]
    marks = np.array([-1 if p is None else p.last_event_id for p in previous], np.int64)
    # Skip redeliveries (at or below the user's high-water mark) and duplicates inside the batch.
    keep = ids > np.repeat(marks, counts)
    keep[1:] &= (ids[1:] != ids[:-1]) | first[1:]
    kept = np.add.reduceat(keep.astype(np.int64), starts)
    # Of each user's kept tokens only the last `max_len` can survive truncation.
    from_end = np.repeat(np.cumsum(kept), counts) - np.cumsum(keep)  # kept tokens after this one
    survivors = _Tokens(events, order[keep & (from_end < max_len)])
    n_new = np.minimum(kept, max_len)
    ends = np.cumsum(n_new)
    touched = np.flatnonzero(kept)
    if len(touched) == 0:
        return None
    empty = UserSequence.empty()
    stored = [empty if previous[i] is None else previous[i] for i in touched.tolist()]
    return (users[touched].tolist(), stored, survivors, (ends - n_new)[touched], n_new[touched],
            survivors.event_id[ends[touched] - 1].tolist())


class _Tokens:
    """The surviving tokens' columns that sequences need (not a whole EventBatch select)."""

    def __init__(self, events: EventBatch, rows: np.ndarray) -> None:
        self.track_id, self.behaviour = events.track_id[rows], events.behaviour[rows]
        self.scenario, self.ts, self.event_id = events.scenario[rows], events.ts[rows], events.event_id[rows]


def apply_events_reference(
    current: Mapping[int, UserSequence], events: EventBatch, max_len: int = DEFAULT_MAX_LEN
) -> dict[int, UserSequence]:
    """`apply_events` one user at a time: the plain version the tests compare it with."""
    plan = _plan(current, events, max_len)
    if plan is None:
        return {}
    touched_users, stored, survivors, new_starts, n_new, last_ids = plan
    columns = (survivors.track_id, survivors.behaviour, survivors.scenario, survivors.ts)
    updated: dict[int, UserSequence] = {}
    for user_id, seq, start, n, last_id in zip(touched_users, stored, new_starts.tolist(), n_new.tolist(), last_ids):
        n_old = min(len(seq), max_len - n)
        old = (seq.track_ids, seq.behaviours, seq.scenarios, seq.timestamps)
        arrays = [np.concatenate((o[len(o) - n_old:], c[start:start + n])) for o, c in zip(old, columns)]
        updated[user_id] = UserSequence(*arrays, last_event_id=last_id)
    return updated


def sequences_from_log(events: EventBatch, max_len: int = DEFAULT_MAX_LEN) -> dict[int, UserSequence]:
    """Reference recompute from a whole event log (e.g. read back from DuckDB)."""
    return apply_events({}, events, max_len)
