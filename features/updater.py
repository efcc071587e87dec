"""The embedded path's feature pipeline: events in, batched pushes to the Feast online store.

It is the in-process twin of the Faust `sequence_builder` and `track_stats` agents and
calls the same pure functions, so both transports produce the same features. State lives
in memory for speed; Feast receives the changed rows every `flush_ms` of simulated time
(pushing per event would cap the loop at a few hundred events/s; see docs/results.md).
"""

from __future__ import annotations

from typing import Protocol

from features.sequence import UserSequence, apply_events
from features.track_stats import TrackStats, apply_track_events
from streaming.events import EventBatch


class FeatureWriter(Protocol):
    def write_sequences(self, sequences: dict[int, UserSequence], event_ts: int) -> None: ...
    def write_track_stats(self, stats: TrackStats, event_ts: int) -> None: ...


class FeatureUpdater:
    def __init__(self, store: FeatureWriter, max_len: int, flush_ms: int) -> None:
        self.store = store
        self.max_len = max_len
        self.flush_ms = flush_ms
        self.sequences: dict[int, UserSequence] = {}
        self.track_stats = TrackStats.empty()
        self._pending_sequences: dict[int, UserSequence] = {}
        self._pending_tracks = TrackStats.empty()
        self._last_flush_ts: int | None = None
        self._latest_ts = 0
        self.rows_written = 0
        self.flushes = 0

    def on_events(self, events: EventBatch) -> None:
        if len(events) == 0:
            return
        updated = apply_events(self.sequences, events, self.max_len)
        self.sequences.update(updated)
        self._pending_sequences.update(updated)
        touched = apply_track_events(self.track_stats, events)
        self.track_stats = self.track_stats.upsert(touched)
        self._pending_tracks = self._pending_tracks.upsert(touched)
        self._latest_ts = max(self._latest_ts, int(events.ts.max()))
        if self._last_flush_ts is None:
            self._last_flush_ts = self._latest_ts
        if self._latest_ts - self._last_flush_ts >= self.flush_ms:
            self.flush()

    def flush(self) -> None:
        """Push everything pending; called on the flush cadence and once at the end."""
        if self._pending_sequences:
            self.store.write_sequences(self._pending_sequences, self._latest_ts)
            self.rows_written += len(self._pending_sequences)
            self._pending_sequences = {}
        if len(self._pending_tracks):
            self.store.write_track_stats(self._pending_tracks, self._latest_ts)
            self.rows_written += len(self._pending_tracks)
            self._pending_tracks = TrackStats.empty()
        self._last_flush_ts = self._latest_ts
        self.flushes += 1
