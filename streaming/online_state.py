"""Feature state kept in the Feast online store itself, applied in idempotent batches.

This is the state design the Faust agents use (docs/streaming.md has the measurements
against a changelog-backed Faust table). A batch of events is applied as
read current rows of the touched users -> `apply_events` -> write the new rows, and only
then are the batch's Kafka offsets committed. A crash before the commit redelivers the
batch; `apply_events` skips every event at or below a user's `last_event_id`, so the redo
changes nothing already written: at-least-once delivery, exactly-once effect.

Reads are served from a write-through cache of the rows this worker wrote or read. That is
only valid while this worker is the rows' single writer, i.e. while it owns their
partitions, so the agent calls `forget()` on every rebalance.
"""

from __future__ import annotations

import numpy as np

from features.sequence import SEQUENCE_BEHAVIOUR_CODES, UserSequence, apply_events
from features.store import FeatureStoreClient
from features.track_stats import TrackStats, apply_track_events
from streaming.events import EventBatch


class SequenceState:
    """User sequences of the users whose partitions this worker owns."""

    def __init__(self, store: FeatureStoreClient, max_len: int) -> None:
        self.store = store
        self.max_len = max_len
        self._cache: dict[int, UserSequence] = {}

    def apply(self, events: EventBatch) -> dict[int, UserSequence]:
        """Apply and write a batch; return the users' new sequences (duplicates change nothing)."""
        users = np.unique(events.user_id[np.isin(events.behaviour, SEQUENCE_BEHAVIOUR_CODES)]).tolist()
        missing = [u for u in users if u not in self._cache]
        if missing:
            self._cache.update(self.store.get_sequences(missing))
        updated = apply_events(self._cache, events, self.max_len)
        if updated:
            self.store.write_sequences(updated)
        self._cache.update(updated)  # only after the write: a failed write is retried from the old state
        return updated

    def forget(self) -> None:
        self._cache.clear()


class TrackStatsState:
    """Statistics of the tracks whose `events.by_track` partitions this worker owns.

    Unlike sequences, rows are written on a cadence (`flush()`), not per batch: a track
    row has 17 features and popular tracks are touched by nearly every batch, so writing
    per batch made this the slowest stage (~2,000 events/s on SQLite); a flush writes each
    touched track once. Counting is at-least-once (see features.track_stats): events
    redelivered after a crash between a flush and the offset commit are counted again.
    """

    # The first-seen tier is merged into the settled one when it outgrows this share of it
    # (or `FRESH_MIN_ROWS`): each merge copies the settled rows, so merging rarely keeps
    # that copy at O(1) per row instead of O(catalogue) per batch.
    FRESH_SHARE = 0.25
    FRESH_MIN_ROWS = 4096

    def __init__(self, store: FeatureStoreClient) -> None:
        self.store = store
        # Two sorted tiers, so that a batch with tracks never seen before copies only the
        # small one (a track worker's catalogue keeps growing for a long time: popularity
        # has a long tail): settled rows, updated in place, and first-seen rows.
        self._settled = TrackStats.empty()
        self._fresh = TrackStats.empty()
        self._dirty: list[np.ndarray] = []  # ids of the tracks changed since the last flush, per batch

    def add(self, events: EventBatch) -> None:
        """Apply events in memory; they reach Feast at the next `flush()`.

        Cheap per batch: rows are updated in place (this worker's own state; a flush
        writes a copy), and changed ids are only collected here and made unique at the
        flush, instead of copying the cache and merging sets every batch."""
        if len(events) == 0:
            return
        tracks = np.unique(events.track_id)
        settled = self._settled.holds(tracks)
        unknown = tracks[~settled & ~self._fresh.holds(tracks)]
        if len(unknown):
            self._fresh = self._fresh.upsert(self.store.read_track_stats(unknown))
        updated = apply_track_events(self._rows(tracks, settled), events)
        self._settled = self._settled.upsert_in_place(updated.lookup(tracks[settled]))
        self._fresh = self._fresh.upsert_in_place(updated.lookup(tracks[~settled]))
        if len(self._fresh) > max(self.FRESH_MIN_ROWS, self.FRESH_SHARE * len(self._settled)):
            self._settled, self._fresh = self._settled.upsert(self._fresh), TrackStats.empty()
        self._dirty.append(tracks)

    def _rows(self, tracks: np.ndarray, settled: np.ndarray) -> TrackStats:
        """Copies of the rows of `tracks` (sorted, distinct, all held), `settled[i]` saying
        which tier holds track i."""
        rows = self._settled.lookup(tracks)
        if not settled.all():
            fresh = self._fresh.lookup(tracks[~settled])
            rows.totals[~settled], rows.recent[~settled], rows.as_of_ts[~settled] = fresh.totals, fresh.recent, fresh.as_of_ts
        return rows

    def flush(self) -> int:
        """Write the rows changed since the last flush; return how many."""
        if not self._dirty:
            return 0
        tracks = np.unique(np.concatenate(self._dirty))
        written = self.store.write_track_stats(self._rows(tracks, self._settled.holds(tracks)))
        self._dirty = []
        return written

    def forget(self) -> None:
        """Drop the cache, unflushed changes included: their events were not acked, so
        whoever owns the partitions next gets them again."""
        self._settled = self._fresh = TrackStats.empty()
        self._dirty = []
