"""Feature state kept in the Feast online store itself, applied in idempotent batches.

This is the state design the Faust agents use (docs/streaming.md has the measurements
against a changelog-backed Faust table). A batch of events is applied as
read current rows of the touched users -> `apply_events` -> write the new rows, and only
then are the batch's Kafka offsets committed. A crash before the commit redelivers the
batch; `apply_events` skips every event at or below a user's `last_event_id`, so the redo
changes nothing already written: at-least-once delivery, exactly-once effect.

Reads are served from a write-through cache of the rows this worker wrote or read. That is
only valid while this worker is the rows' single writer, i.e. while it owns their
partitions, so the agent calls `forget()` on every rebalance. A worker can still believe it
owns a partition it lost (paused past the session timeout, then resumed): so every sequence
write is fenced (`FeatureStoreClient.write_sequences_fenced`): a row is replaced only if the
store still holds the row the update was computed from. A row that moved on is re-read and
the batch redone on it; a row that went back (the store lost acknowledged writes) is
re-written from this worker's newer state, and both are logged.
"""

from __future__ import annotations

import logging
from typing import Mapping

import numpy as np

from features.sequence import SEQUENCE_BEHAVIOUR_CODES, UserSequence, apply_events
from features.redis_rows import NotOwnerError
from features.store import FeatureStoreClient
from features.track_stats import TrackStats, apply_track_events
from streaming.topics import partition_of
from streaming.events import EventBatch
from streaming.topics import partition_of

log = logging.getLogger("streaming.worker")


class SequenceState:
    """User sequences of the users whose partitions this worker owns."""

    def __init__(self, store: FeatureStoreClient, max_len: int) -> None:
        self.store = store
        self.max_len = max_len
        self._cache: dict[int, UserSequence] = {}
        self.fenced_writes = 0  # rows another writer had moved on (this worker was stale)
        self.rewritten_after_loss = 0  # rows the store had lost, written again from the cache

    MAX_FENCED_ROUNDS = 20  # a row moves on under a write only while another worker writes it

    def apply(self, events: EventBatch) -> dict[int, UserSequence]:
        """Apply and write a batch; return the users' new sequences (duplicates change nothing)."""
        users = np.unique(events.user_id[np.isin(events.behaviour, SEQUENCE_BEHAVIOUR_CODES)]).tolist()
        missing = [u for u in users if u not in self._cache]
        if missing:
            self._cache.update(self.store.get_sequences(missing))
        result: dict[int, UserSequence] = {}
        stored_behind: dict[int, int] = {}  # user -> the older high-water mark the store holds
        for _ in range(self.MAX_FENCED_ROUNDS):
            updated = apply_events(self._cache, events, self.max_len)
            based_on = {u: stored_behind.get(u, self._cache[u].last_event_id) for u in updated}
            stale = set(self.store.write_sequences_fenced(updated, based_on))
            written = {u: seq for u, seq in updated.items() if u not in stale}
            self._cache.update(written)  # only after the write: a failed write is retried from the old state
            result.update(written)
            if not stale:
                return result
            stored = self.store.get_sequences(sorted(stale))
            ahead = [u for u in stale if stored[u].last_event_id >= self._cache[u].last_event_id]
            behind = [u for u in stale if stored[u].last_event_id < self._cache[u].last_event_id]
            if ahead:  # another worker wrote these users since: redo the batch on its rows
                self.fenced_writes += len(ahead)
                log.warning("fenced %d stale sequence writes: another worker wrote those users since (e.g. user "
                            "%d: stored event %d, this worker's %d); redoing them on the stored rows", len(ahead),
                            ahead[0], stored[ahead[0]].last_event_id, self._cache[ahead[0]].last_event_id)
                for u in ahead:
                    self._cache[u] = stored[u]
                    stored_behind.pop(u, None)
            if behind:  # the store lost acknowledged writes: rewrite from this worker's newer state
                self.rewritten_after_loss += len(behind)
                log.error("the online store lost acknowledged sequence writes of %d users (e.g. user %d: stored "
                          "event %d, written %d); re-writing them from this worker's state", len(behind), behind[0],
                          stored[behind[0]].last_event_id, self._cache[behind[0]].last_event_id)
                stored_behind.update({u: stored[u].last_event_id for u in behind})
            events = events.select(np.isin(events.user_id, sorted(stale)))
        raise RuntimeError(f"sequence writes of {len(stale)} users were fenced {self.MAX_FENCED_ROUNDS} times in a row")

    def forget(self) -> None:
        self._cache.clear()


class TrackStatsState:
    """Statistics of the tracks whose `events.by_track` partitions this worker owns.

    Unlike sequences, rows are written on a cadence (`flush()`), not per batch: a track
    row has 17 features and popular tracks are touched by nearly every batch, so writing
    per batch made this the slowest stage (~2,000 events/s on SQLite); a flush writes each
    touched track once.

    Exactly-once counts (`source_partitions` given, the Kafka path): an event reaches
    `events.by_track` again whenever a `sequence_builder` redoes a batch it had forwarded
    (a crash or a pause past a rebalance before its offsets were committed), and a track
    event is consumed again after a flush that its offset commit did not follow. Each row
    therefore carries, per `events` partition, the highest event id its counts include
    (`source_marks`), written in the same row write as the counts; an event at or below
    its track's mark for its user's partition is a copy and is skipped. Event ids grow in
    emission order and a partition's events stay in order all the way to every
    `events.by_track` partition (one forwarding owner at a time, in offset order), so the
    mark never passes an event not yet counted. The same id twice in one batch counts
    once. Without `source_partitions` (tests, tools) counting is at-least-once.
    """

    # The first-seen tier is merged into the settled one when it outgrows this share of it
    # (or `FRESH_MIN_ROWS`): each merge copies the settled rows, so merging rarely keeps
    # that copy at O(1) per row instead of O(catalogue) per batch.
    FRESH_SHARE = 0.25
    FRESH_MIN_ROWS = 4096

    def __init__(self, store: FeatureStoreClient, source_partitions: int | None = None) -> None:
        self.store = store
        self.source_partitions = source_partitions
        self._marks = _SourceMarks(source_partitions or 1)
        self.copies_skipped = 0  # events already counted (redelivered or forwarded again)
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
            if self.source_partitions:
                rows, marks = self.store.read_track_rows(unknown, self.source_partitions)
                self._marks.set(rows.track_ids, marks)
            else:
                rows = self.store.read_track_stats(unknown)
            self._fresh = self._fresh.upsert(rows)
        if self.source_partitions:
            events = self._new_events(events)
            if len(events) == 0:
                return
            tracks = np.unique(events.track_id)
            settled = self._settled.holds(tracks)
        updated = apply_track_events(self._rows(tracks, settled), events)
        self._settled = self._settled.upsert_in_place(updated.lookup(tracks[settled]))
        self._fresh = self._fresh.upsert_in_place(updated.lookup(tracks[~settled]))
        if len(self._fresh) > max(self.FRESH_MIN_ROWS, self.FRESH_SHARE * len(self._settled)):
            self._settled, self._fresh = self._settled.upsert(self._fresh), TrackStats.empty()
        self._dirty.append(tracks)

    def _new_events(self, events: EventBatch) -> EventBatch:
        """`events` less those their track's marks say are counted already (and less the
        second of an id seen twice); the marks of the tracks move up to what is kept."""
        _, first = np.unique(events.event_id, return_index=True)
        once = np.zeros(len(events), bool)
        once[first] = True
        tracks, row = np.unique(events.track_id, return_inverse=True)
        marks = self._marks.get(tracks)  # [K, P]
        partition = partition_of(events.user_id, self.source_partitions)
        keep = once & (events.event_id > marks[row, partition])
        np.maximum.at(marks, (row[keep], partition[keep]), events.event_id[keep])
        self._marks.set(tracks, marks)
        skipped = len(events) - int(keep.sum())
        if skipped:
            self.copies_skipped += skipped
            log.warning("skipped %d track events counted before (redelivered or forwarded again)", skipped)
            return events.select(keep)
        return events

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
        written = self.store.write_track_stats(self._rows(tracks, self._settled.holds(tracks)),
                                               marks=self._marks_of(tracks))
        self._dirty = []
        return written

    def flush_owned(self, owners: Mapping[int, bytes | None], partitions: int) -> list[int]:
        """`flush`, fenced by ownership; return the partitions whose rows were not written
        because this worker no longer owns them.

        `owners` (partition of `events.by_track` -> token from `claim_owner`): each
        partition's rows are written only while its token is the newest claim, so a worker
        paused past a rebalance cannot overwrite its successor's counts. The events behind
        a refused partition are the new owner's to count: it consumes them from the last
        commit, which this worker never advanced past them."""
        if not self._dirty:
            return []
        tracks = np.unique(np.concatenate(self._dirty))
        rows = self._rows(tracks, self._settled.holds(tracks))
        refused = []
        destination = partition_of(tracks, partitions)
        for partition in np.unique(destination).tolist():
            part = rows.lookup(tracks[destination == partition])
            try:
                if partition not in owners:
                    raise NotOwnerError(f"partition {partition} is not assigned to this worker")
                self.store.write_track_stats(part, owner=(f"tracks:{partition}", owners[partition]),
                                             marks=self._marks_of(part.track_ids))
            except NotOwnerError:
                refused.append(partition)
        self._dirty = []  # only now: a store outage above retries the whole flush
        if refused:  # rows of partitions another worker owns: the cache no longer holds them right
            self.forget()
        return refused

    def forget(self) -> None:
        """Drop the cache, unflushed changes included: their events were not acked, so
        whoever owns the partitions next gets them again."""
        self._settled = self._fresh = TrackStats.empty()
        self._marks = _SourceMarks(self.source_partitions or 1)
        self._dirty = []

    def _marks_of(self, tracks: np.ndarray) -> np.ndarray | None:
        return self._marks.get(tracks) if self.source_partitions else None


class _SourceMarks:
    """Per held track, the highest event id counted per `events` partition (-1: none)."""

    def __init__(self, partitions: int) -> None:
        self._row: dict[int, int] = {}
        self._values = np.full((1024, partitions), -1, np.int64)

    def get(self, tracks: np.ndarray) -> np.ndarray:
        """A copy, [len(tracks), partitions]; tracks not held read -1."""
        rows = np.fromiter((self._row.get(t, -1) for t in tracks.tolist()), np.int64, len(tracks))
        marks = self._values[np.maximum(rows, 0)]
        marks[rows < 0] = -1
        return marks

    def set(self, tracks: np.ndarray, marks: np.ndarray) -> None:
        rows = []
        for track in tracks.tolist():
            row = self._row.get(track)
            if row is None:
                row = self._row[track] = len(self._row)
            rows.append(row)
        if len(self._row) > len(self._values):
            grown = np.full((2 * len(self._row), self._values.shape[1]), -1, np.int64)
            grown[:len(self._values)] = self._values
            self._values = grown
        self._values[rows] = marks
