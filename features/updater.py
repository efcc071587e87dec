"""The embedded path's feature pipeline: events in, batched pushes to the Feast online store.

It is the in-process twin of the Faust `sequence_builder` and `track_stats` agents and
calls the same pure functions, so both transports produce the same features. State lives
in memory; Feast receives changed rows in batches, never per event (a per-event push caps
the loop at a few hundred events/s):

- a user's pending sequence is pushed right before that user is ranked (`flush_users`), so
  the ranker reads its own writes without rewriting every active user on every tick;
- everything else pending is pushed every `flush_ms` of simulated time, and track
  statistics (one row per touched track) every `track_flush_ms`.

Writes run on one background thread (`background=True`), in submission order, so an older
row of a user can never overwrite a newer one. SQLite does its work without the GIL, so
they use the second core while the simulator and rankers run. `flush_users` waits until
its own write (and so every earlier one) is committed: read-your-writes for the ranker.
The periodic pushes that fall due while events arrive are handed to the writer right
after that wait, so they run alongside the ranking and simulation of the next tick
instead of delaying the next ranking call; if no ranking call comes, they go with the
next event batch.

Track statistics are kept as one row per track id from 0 up (zeros until a track's first
event) and updated in place, so an event batch costs work in its own tracks, not a copy of
the catalog's statistics; a push hands the writer a copy of the touched rows only.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterable, Protocol

import numpy as np

from features.sequence import UserSequence, apply_events
from features.track_stats import TrackStats, apply_track_events
from streaming.events import EventBatch


_DENSE_TRACK_LIMIT = 1 << 18  # rows of zeros held ahead for track ids below this (~40 MB at most)


class FeatureWriter(Protocol):
    def write_sequences(self, sequences: dict[int, UserSequence], event_ts: int) -> int: ...
    def write_track_stats(self, stats: TrackStats, event_ts: int) -> int: ...


class FeatureUpdater:
    def __init__(self, store: FeatureWriter, max_len: int, flush_ms: int, track_flush_ms: int,
                 background: bool = True) -> None:
        self.store = store
        self.max_len = max_len
        self.flush_ms = flush_ms
        self.track_flush_ms = track_flush_ms
        self.sequences: dict[int, UserSequence] = {}
        self.track_stats = TrackStats.empty()
        self._pending_sequences: dict[int, UserSequence] = {}
        self._dirty_tracks: list[np.ndarray] = []  # ids touched since the last track push
        self._last_flush_ts: int | None = None
        self._last_track_flush_ts: int | None = None
        self._latest_ts = 0
        self._sequences_due = self._tracks_due = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="feast-writer") if background else None
        self._last_write: Future | None = None
        self.sequence_rows_written = 0
        self.track_rows_written = 0

    @property
    def rows_written(self) -> int:
        return self.sequence_rows_written + self.track_rows_written

    def on_events(self, events: EventBatch) -> None:
        if len(events) == 0:
            return
        if self._sequences_due or self._tracks_due:  # no ranking call came since they fell due
            self._write_due()
        updated = apply_events(self.sequences, events, self.max_len)
        self.sequences.update(updated)
        self._pending_sequences.update(updated)
        self._hold_rows_for(events.track_id)
        touched = apply_track_events(self.track_stats, events)
        self.track_stats = self.track_stats.upsert_in_place(touched)  # only the writer's copies leave
        self._dirty_tracks.append(touched.track_ids)
        self._latest_ts = max(self._latest_ts, int(events.ts.max()))
        if self._last_flush_ts is None:
            self._last_flush_ts = self._last_track_flush_ts = self._latest_ts
        if self._latest_ts - self._last_flush_ts >= self.flush_ms:
            self._sequences_due, self._last_flush_ts = True, self._latest_ts
        if self._latest_ts - self._last_track_flush_ts >= self.track_flush_ms:
            self._tracks_due, self._last_track_flush_ts = True, self._latest_ts
        if self._writer is None:
            self._write_due()

    def _hold_rows_for(self, track_ids: np.ndarray) -> None:
        """Keep a row for every track id from 0 up to the largest seen (zeros, as of 0, for
        tracks without events, exactly what `lookup` gives a track it does not hold), so
        a batch's tracks are nearly always held and `upsert_in_place` writes into the
        arrays instead of merging a copy of the catalog's statistics. Growth doubles;
        ids past `_DENSE_TRACK_LIMIT` are merged in as they come."""
        if len(track_ids) == 0:
            return
        top, held = int(track_ids.max()), len(self.track_stats)
        if held <= top < _DENSE_TRACK_LIMIT and int(track_ids.min()) >= 0:
            rows = np.arange(min(max(top + 1, 2 * held, 1024), _DENSE_TRACK_LIMIT), dtype=np.int64)
            self.track_stats = TrackStats.zeros(rows).upsert_in_place(self.track_stats)

    def flush_users(self, user_ids: Iterable[int]) -> None:
        """Make these users' pending sequences readable in Feast (they are about to be
        ranked), then start the periodic pushes that are due."""
        self._write_sequences([u for u in user_ids if u in self._pending_sequences])
        self.wait()
        self._write_due()

    def flush(self) -> None:
        """Push everything pending and wait for it (at the end of a run)."""
        self._write_sequences(list(self._pending_sequences))
        self._write_tracks()
        self._sequences_due = self._tracks_due = False
        self.wait()

    def wait(self) -> None:
        """Block until every write handed to the writer is committed; re-raises its error."""
        if self._last_write is not None:
            self._last_write.result()

    def close(self) -> None:
        """Stop the writer thread once the writes handed to it are done (call `flush` first
        to push what is still pending)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)

    def _write_due(self) -> None:
        if self._sequences_due:
            self._write_sequences(list(self._pending_sequences))
        if self._tracks_due:
            self._write_tracks()
        self._sequences_due = self._tracks_due = False

    def _submit(self, write, *args) -> None:
        if self._writer is None:
            write(*args)
        else:
            self._last_write = self._writer.submit(write, *args)

    def _write_sequences(self, user_ids: list[int]) -> None:
        if not user_ids:
            return
        batch = {u: self._pending_sequences.pop(u) for u in dict.fromkeys(user_ids)}
        self._submit(self.store.write_sequences, batch, self._latest_ts)
        self.sequence_rows_written += len(batch)

    def _write_tracks(self) -> None:
        if self._dirty_tracks:
            rows = self.track_stats.lookup(np.unique(np.concatenate(self._dirty_tracks)))  # a copy
            self._dirty_tracks = []
            self._submit(self.store.write_track_stats, rows, self._latest_ts)
            self.track_rows_written += len(rows)
