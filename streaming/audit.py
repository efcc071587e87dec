"""Compare an online store with the recompute from the event log: what a fault cost.

Used by the fault tests (tests/test_faults.py), the results table in docs/results.md and
the runbook's "verify" steps (docs/streaming.md). A token is one (timestamp, track,
behaviour, scenario) entry of a user's sequence; a count is one event in a track's totals.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass


from features.sequence import UserSequence, sequences_from_log
from features.store import FeatureStoreClient
from features.track_stats import track_stats_from_log
from streaming.events import EventBatch


@dataclass
class StoreAudit:
    events: int
    users: int
    users_wrong: int  # stored sequence differs from the recompute in any way
    users_missing: int  # no row at all
    tokens_lost: int  # in the recompute, not in the store
    tokens_doubled: int  # in the store more often than in the recompute (or not in it at all)
    track_counts_lost: int  # track totals below the recompute, summed
    track_counts_doubled: int  # track totals above the recompute, summed (at-least-once)
    example_users: list[int]

    @property
    def sequences_exact(self) -> bool:
        return self.users_wrong == 0

    def to_dict(self) -> dict:
        return asdict(self)


def _tokens(seq: UserSequence) -> Counter:
    return Counter(zip(seq.timestamps.tolist(), seq.track_ids.tolist(), seq.behaviours.tolist(),
                       seq.scenarios.tolist()))


def audit_store(store: FeatureStoreClient, log: EventBatch, max_len: int = 256, tracks: bool = True) -> StoreAudit:
    """The store's sequences (and track totals) against the recompute from `log`."""
    reference = sequences_from_log(log, max_len)
    users = sorted(reference)
    stored = store.get_sequences(users)
    wrong = [u for u in users if not stored[u].equals(reference[u])]
    lost = doubled = 0
    for u in wrong:
        want, have = _tokens(reference[u]), _tokens(stored[u])
        lost += sum((want - have).values())
        doubled += sum((have - want).values())
    counts_lost = counts_doubled = 0
    if tracks:
        expected = track_stats_from_log(log)
        found = store.read_track_stats(expected.track_ids)
        diff = found.totals - expected.totals
        counts_lost, counts_doubled = int(-diff[diff < 0].sum()), int(diff[diff > 0].sum())
    return StoreAudit(events=len(log), users=len(users), users_wrong=len(wrong),
                      users_missing=sum(1 for u in wrong if stored[u].last_event_id < 0),
                      tokens_lost=int(lost), tokens_doubled=int(doubled), track_counts_lost=counts_lost,
                      track_counts_doubled=counts_doubled, example_users=wrong[:5])


def last_token_ids(log: EventBatch, max_len: int = 256) -> dict[int, int]:
    return {u: s.last_event_id for u, s in sequences_from_log(log, max_len).items()}
