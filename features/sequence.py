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
    columns; per user only two copies remain (an int64 block for track ids and timestamps,
    an int8 block for behaviours and scenarios, whose rows become the sequence's arrays).
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
    previous: list[UserSequence | None] = []

    def marks_of(users: np.ndarray) -> np.ndarray:
        previous.extend(current.get(u) for u in users.tolist())
        return np.array([-1 if p is None else p.last_event_id for p in previous], np.int64)

    plan = _token_plan(events, max_len, marks_of)
    if plan is None:
        return None
    users, touched, survivors, new_starts, n_new, last_ids = plan
    empty = UserSequence.empty()
    stored = [empty if previous[i] is None else previous[i] for i in touched.tolist()]
    return users[touched].tolist(), stored, survivors, new_starts, n_new, last_ids.tolist()


def _token_plan(events: EventBatch, max_len: int, marks_of):
    """The batch-wide part of `_plan`, whatever holds the state: `marks_of(users)` gives the
    high-water marks of the batch's token users (sorted ids). Returns those users, the
    positions among them of the users that change, the surviving tokens, and per changed
    user where its new tokens start, how many there are and its new mark; None when
    nothing changes."""
    order = _token_order(events)
    if len(order) == 0:
        return None
    user, ids = events.user_id[order], events.event_id[order]
    first = np.ones(len(order), bool)  # the first token of each user (tokens are grouped by user)
    np.not_equal(user[1:], user[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    counts = np.diff(starts, append=len(order))
    users = user[starts]
    marks = marks_of(users)
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
    return users, touched, survivors, (ends - n_new)[touched], n_new[touched], survivors.event_id[ends[touched] - 1]


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


class SequenceTable:
    """Every user's sequence in one column table: a row per user of `max_len` slots for each
    of the four token columns (oldest first, `lengths` used), plus the high-water marks.

    The embedded updater applies each event batch here: a batch is a few hundred events of
    ~100 users, and with a `UserSequence` per user per batch (`apply_events`) the per-user
    copies and objects were most of its cost. Here a batch is a handful of whole-array
    gathers and one scatter into the touched rows, with no per-user Python. It gives the
    same sequences as `apply_events` (tests hold it to that); `apply_events` stays the one
    definition the other paths (Faust agents, replay, recompute from the log) call.

    Rows are handed out in order of first appearance (`row_of` maps user id -> row, -1 for
    none), so memory follows the users seen, not the largest user id.
    """

    def __init__(self, max_len: int = DEFAULT_MAX_LEN, capacity: int = 1024) -> None:
        self.max_len = max_len
        self.n_rows = 0
        self.row_of = np.full(capacity, -1, np.int64)
        self.user_of = np.zeros(capacity, np.int64)
        self.track_ids = np.zeros((capacity, max_len), np.int64)
        self.timestamps = np.zeros((capacity, max_len), np.int64)
        self.behaviours = np.zeros((capacity, max_len), np.int8)
        self.scenarios = np.zeros((capacity, max_len), np.int8)
        self.lengths = np.zeros(capacity, np.int64)
        self.last_ids = np.full(capacity, -1, np.int64)

    def __len__(self) -> int:
        return self.n_rows

    def rows(self, user_ids: np.ndarray) -> np.ndarray:
        """Rows of `user_ids` (ids >= 0), -1 for users without one."""
        user_ids = np.asarray(user_ids, np.int64)
        out = np.full(len(user_ids), -1, np.int64)
        inside = user_ids < len(self.row_of)
        out[inside] = self.row_of[user_ids[inside]]
        return out

    def _add_rows(self, user_ids: np.ndarray) -> None:
        """Rows for the (distinct, non-negative) users that have none yet."""
        if len(user_ids) and int(user_ids.min()) < 0:
            raise ValueError("SequenceTable: user ids must be >= 0")
        new = user_ids[self.rows(user_ids) < 0]
        if len(new) == 0:
            return
        top = int(user_ids.max())
        if top >= len(self.row_of):
            grown = np.full(max(top + 1, 2 * len(self.row_of)), -1, np.int64)
            grown[:len(self.row_of)] = self.row_of
            self.row_of = grown
        needed = self.n_rows + len(new)
        if needed > len(self.lengths):
            self._grow(max(needed, 2 * len(self.lengths)))
        rows = np.arange(self.n_rows, needed)
        self.row_of[new], self.user_of[rows], self.n_rows = rows, new, needed

    def _grow(self, capacity: int) -> None:
        for name in ("user_of", "track_ids", "timestamps", "behaviours", "scenarios", "lengths", "last_ids"):
            old = getattr(self, name)
            grown = np.zeros((capacity,) + old.shape[1:], old.dtype)
            if name == "last_ids":
                grown[:] = -1
            grown[:len(old)] = old
            setattr(self, name, grown)

    def apply(self, events: EventBatch) -> np.ndarray:
        """Apply a batch (as `apply_events` would); returns the rows that changed."""
        marks = lambda users: np.where((r := self.rows(users)) >= 0, self.last_ids[r], -1)  # noqa: E731
        plan = _token_plan(events, self.max_len, marks)
        if plan is None:
            return np.zeros(0, np.int64)
        users, touched, survivors, new_starts, n_new, last_ids = plan
        changed = users[touched]
        self._add_rows(changed)
        rows = self.row_of[changed]
        old_len = self.lengths[rows]
        n_old = np.minimum(old_len, self.max_len - n_new)  # stored tokens that stay
        columns = ((self.track_ids, survivors.track_id), (self.timestamps, survivors.ts),
                   (self.behaviours, survivors.behaviour), (self.scenarios, survivors.scenario))
        shift = n_old < old_len
        if shift.any():  # full rows: move the kept tail to the front (then append like the rest)
            self._shift_left(rows[shift], old_len[shift] - n_old[shift], n_old[shift])
        # Append: the survivors are the touched users' new tokens, user after user, so token t
        # goes to its row's next free slot; one scatter per column (the tables are contiguous,
        # so `reshape(-1)` is a view).
        slots = np.repeat(rows * self.max_len + n_old - new_starts, n_new) + np.arange(len(survivors.track_id))
        for table, new in columns:
            table.reshape(-1)[slots] = new
        self.lengths[rows] = n_old + n_new
        self.last_ids[rows] = last_ids
        return rows

    def _shift_left(self, rows: np.ndarray, drop: np.ndarray, keep: np.ndarray) -> None:
        """Drop the first `drop[i]` tokens of row `rows[i]`, moving its next `keep[i]` to the
        front; slots after them are zeroed (they get new tokens right after)."""
        slot = np.arange(self.max_len)[None, :]
        index = np.where(slot < keep[:, None], slot + drop[:, None], self.max_len)
        for table in (self.track_ids, self.timestamps, self.behaviours, self.scenarios):
            block = np.concatenate((table[rows], np.zeros((len(rows), 1), table.dtype)), axis=1)
            table[rows] = np.take_along_axis(block, index, axis=1)
        self.lengths[rows] = keep

    def snapshot(self, rows: np.ndarray) -> "SequenceRows":
        """Copies of these rows, safe to hand to another thread while the table changes."""
        return SequenceRows(self.user_of[rows], self.track_ids[rows], self.behaviours[rows],
                            self.scenarios[rows], self.timestamps[rows], self.lengths[rows], self.last_ids[rows])

    def to_dict(self) -> dict[int, UserSequence]:
        """Every held user's sequence (copies), keyed by user id: for checks and tests."""
        return self.snapshot(np.arange(self.n_rows)).sequences()


@dataclass(frozen=True)
class SequenceRows:
    """Some users' sequences as blocks (row i: user_ids[i], first lengths[i] slots used)."""

    user_ids: np.ndarray
    track_ids: np.ndarray
    behaviours: np.ndarray
    scenarios: np.ndarray
    timestamps: np.ndarray
    lengths: np.ndarray
    last_ids: np.ndarray

    def sequences(self) -> dict[int, UserSequence]:
        """One `UserSequence` per user; its arrays are views of these blocks."""
        return {u: UserSequence(self.track_ids[i, :n], self.behaviours[i, :n], self.scenarios[i, :n],
                                self.timestamps[i, :n], last_event_id=m)
                for i, (u, n, m) in enumerate(zip(self.user_ids.tolist(), self.lengths.tolist(),
                                                   self.last_ids.tolist()))}
