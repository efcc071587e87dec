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
    users, starts = np.unique(tokens.user_id, return_index=True)
    ends = np.append(starts[1:], len(tokens))
    updated: dict[int, UserSequence] = {}
    for user, start, end in zip(users.tolist(), starts.tolist(), ends.tolist()):
        previous = current.get(user) or UserSequence.empty()
        ids = tokens.event_id[start:end]
        # Skip redeliveries (at or below the high-water mark) and duplicates inside the batch.
        keep = ids > previous.last_event_id
        keep[1:] &= ids[1:] != ids[:-1]
        if not keep.any():
            continue
        sl = np.arange(start, end)[keep]
        updated[user] = UserSequence(
            track_ids=np.concatenate([previous.track_ids, tokens.track_id[sl]])[-max_len:],
            behaviours=np.concatenate([previous.behaviours, tokens.behaviour[sl]])[-max_len:],
            scenarios=np.concatenate([previous.scenarios, tokens.scenario[sl]])[-max_len:],
            timestamps=np.concatenate([previous.timestamps, tokens.ts[sl]])[-max_len:],
            last_event_id=int(ids[keep][-1]),
        )
    return updated


def sequences_from_log(events: EventBatch, max_len: int = DEFAULT_MAX_LEN) -> dict[int, UserSequence]:
    """Reference recompute from a whole event log (e.g. read back from DuckDB)."""
    return apply_events({}, events, max_len)
