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
    tokens = events.select(np.isin(events.behaviour, SEQUENCE_BEHAVIOUR_CODES))
    order = np.lexsort((tokens.event_id, tokens.user_id))
    return tokens.select(order)


def apply_events(
    current: Mapping[int, UserSequence], events: EventBatch, max_len: int = DEFAULT_MAX_LEN
) -> dict[int, UserSequence]:
    """Apply a batch of events to sequence state; return the new sequences of touched users.

    Pure: `current` is not modified. Users whose every token was a duplicate are not returned.
    """
    tokens = sequence_tokens(events)
    if len(tokens) == 0:
        return {}
    # Everything that does not depend on one user's stored sequence is done for the whole
    # batch at once; per user only the final two-piece concatenations remain (a batch holds
    # tens of users, and per-user numpy calls were most of the features stage's time).
    user, ids = tokens.user_id, tokens.event_id
    users, starts, counts = np.unique(user, return_index=True, return_counts=True)
    previous = [current.get(u) for u in users.tolist()]
    marks = np.array([-1 if p is None else p.last_event_id for p in previous], np.int64)
    # Skip redeliveries (at or below the user's high-water mark) and duplicates inside the batch.
    keep = ids > np.repeat(marks, counts)
    keep[1:] &= (ids[1:] != ids[:-1]) | (user[1:] != user[:-1])
    kept = np.add.reduceat(keep.astype(np.int64), starts)
    # Of each user's kept tokens only the last `max_len` can survive truncation.
    from_end = np.repeat(np.cumsum(kept), counts) - np.cumsum(keep)  # kept tokens after this one
    survivors = tokens.select(keep & (from_end < max_len))
    n_new = np.minimum(kept, max_len)
    ends = np.cumsum(n_new)
    columns = (survivors.track_id, survivors.behaviour, survivors.scenario, survivors.ts)
    touched = np.flatnonzero(kept)
    last_ids = survivors.event_id[ends[touched] - 1]

    updated: dict[int, UserSequence] = {}
    for i, user_id, end, n, last_id in zip(touched.tolist(), users[touched].tolist(), ends[touched].tolist(),
                                           n_new[touched].tolist(), last_ids.tolist()):
        stored = previous[i] or UserSequence.empty()
        start = end - n
        n_old = min(len(stored), max_len - n)
        if n_old:
            old = (stored.track_ids, stored.behaviours, stored.scenarios, stored.timestamps)
            arrays = [np.concatenate((o[len(o) - n_old:], c[start:end])) for o, c in zip(old, columns)]
        else:  # a copy, so the sequence does not keep the whole batch's arrays alive
            arrays = [c[start:end].copy() for c in columns]
        updated[user_id] = UserSequence(*arrays, last_event_id=last_id)
    return updated


def sequences_from_log(events: EventBatch, max_len: int = DEFAULT_MAX_LEN) -> dict[int, UserSequence]:
    """Reference recompute from a whole event log (e.g. read back from DuckDB)."""
    return apply_events({}, events, max_len)
