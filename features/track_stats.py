"""Track statistics: per-track behaviour counts, all-time and recent, and the pure function
that applies events to them.

Like `features.sequence.apply_events`, `apply_track_events` is the one place events become
track statistics; the embedded `FeatureUpdater` and the Faust `track_stats` agent both call
it, and it returns only the touched tracks' new rows so a writer pushes only what changed.

Counts are kept for every behaviour in `streaming.events.BEHAVIOURS` (impressions, plays,
full plays, skips, likes, shares, ...), indexed by behaviour code.

The recent window is an exponentially decayed count with time constant `RECENT_TAU_MS`
(24 simulated hours): each event weighs exp(-age / tau). For a steady event rate this
equals the number of events in the last 24 h, with no bucket edges. We chose it over
tumbling hourly buckets because
- a row only needs one number per behaviour plus `as_of_ts`, the time the decayed values
  refer to; a reader decays them to its own clock (`TrackStats.recent_at`), so tracks that
  got no events need no rewrite to stay correct, and a writer pushes only touched tracks;
- the sum of exponentials does not depend on the order events arrive in, so stats built
  from any split or interleaving of the log (Kafka partitions, batches) agree up to
  floating-point rounding.

This function counts every event it is given. Track events arrive from every user
partition, so a per-track high-water mark (the sequences' trick) would drop legitimate
out-of-order events; the Kafka path's track worker skips redelivered copies with a mark
per track *and* user partition, kept beside these rows (`streaming.online_state.TrackStatsState`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streaming.events import BEHAVIOURS, EventBatch

RECENT_TAU_MS = 24 * 3600 * 1000
N_BEHAVIOURS = len(BEHAVIOURS)
# Feature names in the Feast `track_stats` view, column i of `totals` / `recent` is behaviour code i.
TOTAL_FEATURES: tuple[str, ...] = tuple(f"{name}_total" for name in BEHAVIOURS)
RECENT_FEATURES: tuple[str, ...] = tuple(f"{name}_recent" for name in BEHAVIOURS)


@dataclass(frozen=True)
class TrackStats:
    """Statistics of a set of tracks as columns, one row per track, sorted by track id."""

    track_ids: np.ndarray  # int64 [K], sorted, unique
    totals: np.ndarray  # int64 [K, N_BEHAVIOURS], all-time counts per behaviour code
    recent: np.ndarray  # float64 [K, N_BEHAVIOURS], decayed counts as of `as_of_ts`
    as_of_ts: np.ndarray  # int64 [K], simulated epoch ms: the newest event seen per track

    def __len__(self) -> int:
        return len(self.track_ids)

    @classmethod
    def empty(cls) -> "TrackStats":
        return cls.zeros(np.zeros(0, np.int64))

    @classmethod
    def zeros(cls, track_ids: np.ndarray) -> "TrackStats":
        """Rows for tracks never seen: zero counts, as of time 0."""
        k = len(track_ids)
        return cls(
            np.asarray(track_ids, np.int64),
            np.zeros((k, N_BEHAVIOURS), np.int64),
            np.zeros((k, N_BEHAVIOURS), np.float64),
            np.zeros(k, np.int64),
        )

    def _rows(self, index: np.ndarray) -> "TrackStats":
        return TrackStats(self.track_ids[index], self.totals[index], self.recent[index], self.as_of_ts[index])

    def lookup(self, track_ids: np.ndarray) -> "TrackStats":
        """Rows for `track_ids` in the order given; tracks not held here get zero rows.
        The result is a valid TrackStats (e.g. for `upsert`) only if the ids are sorted
        and unique."""
        track_ids = np.asarray(track_ids, np.int64)
        index = np.searchsorted(self.track_ids, track_ids)
        found = index < len(self)
        found[found] = self.track_ids[index[found]] == track_ids[found]
        result = TrackStats.zeros(track_ids)
        held = self._rows(index[found])
        result.totals[found] = held.totals
        result.recent[found] = held.recent
        result.as_of_ts[found] = held.as_of_ts
        return result

    def holds(self, track_ids: np.ndarray) -> np.ndarray:
        """Whether each of `track_ids` has a row here (a binary search, no sort)."""
        track_ids = np.asarray(track_ids, np.int64)
        index = np.searchsorted(self.track_ids, track_ids)
        found = index < len(self)
        found[found] = self.track_ids[index[found]] == track_ids[found]
        return found

    def upsert(self, updates: "TrackStats") -> "TrackStats":
        """A new TrackStats with `updates`' rows replacing or adding to these.

        Both sides are sorted by id, so this is a merge: a binary search places each update,
        no re-sort (the embedded updater upserts a batch's tracks into the whole catalog's
        stats on every event batch)."""
        index = np.searchsorted(self.track_ids, updates.track_ids)
        replaced = index < len(self)
        replaced[replaced] = self.track_ids[index[replaced]] == updates.track_ids[replaced]
        added = ~replaced
        columns = zip(self._columns(), updates._columns())
        if not added.any():  # the steady state: every touched track was seen before
            return TrackStats(*(_overwrite(ours.copy(), index, theirs) for ours, theirs in columns))
        # An update's row in the result: its place among ours, after the updates added before it.
        rows = index + np.cumsum(added) - added
        from_updates = np.zeros(len(self) + int(added.sum()), bool)
        from_updates[rows] = True
        kept = np.ones(len(self), bool)
        kept[index[replaced]] = False
        merged = []
        for ours, theirs in columns:
            out = np.empty((len(from_updates),) + ours.shape[1:], ours.dtype)
            out[~from_updates] = ours[kept]
            merged.append(_overwrite(out, rows, theirs))
        return TrackStats(*merged)

    def upsert_in_place(self, updates: "TrackStats") -> "TrackStats":
        """`upsert` for state only its owner holds: when every update's track is already
        here (the steady state), its rows are overwritten in these arrays and `self` is
        returned, instead of copying the whole catalog's statistics on every event batch;
        otherwise the merged copy `upsert` makes. Callers must not share `self` (the
        embedded updater hands the writer `lookup` copies, never its state)."""
        index = np.searchsorted(self.track_ids, updates.track_ids)
        if len(updates) and int(index.max()) < len(self) and np.array_equal(self.track_ids[index], updates.track_ids):
            for ours, theirs in zip(self._columns()[1:], updates._columns()[1:]):
                ours[index] = theirs
            return self
        return self.upsert(updates)

    def _columns(self) -> tuple[np.ndarray, ...]:
        return self.track_ids, self.totals, self.recent, self.as_of_ts

    def recent_at(self, now_ts: int) -> np.ndarray:
        """Decayed counts as seen at `now_ts`. A row newer than `now_ts` is returned as
        stored rather than inflated: features may run slightly ahead of a batched request."""
        age = np.maximum(np.int64(now_ts) - self.as_of_ts, 0)
        return self.recent * np.exp(-age / RECENT_TAU_MS)[:, None]

    def equals(self, other: "TrackStats", rtol: float = 1e-9) -> bool:
        """Exact on counts and times; `recent` up to float rounding (sums in another order)."""
        return (
            np.array_equal(self.track_ids, other.track_ids)
            and np.array_equal(self.totals, other.totals)
            and np.array_equal(self.as_of_ts, other.as_of_ts)
            and np.allclose(self.recent, other.recent, rtol=rtol, atol=0.0)
        )


def _overwrite(out: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    out[rows] = values
    return out


def apply_track_events(current: TrackStats | None, events: EventBatch) -> TrackStats:
    """Apply a batch of events to track statistics; return the touched tracks' new rows.

    Pure: `current` is not modified. Keep full state with `state = state.upsert(updated)`.
    """
    if len(events) == 0:
        return TrackStats.empty()
    # Group events by track with one stable sort (what np.unique does, minus its overhead);
    # the newest event per track is a reduceat over the groups, not a slower ufunc.at.
    order = np.argsort(events.track_id, kind="stable")
    sorted_tracks = events.track_id[order]
    first = np.ones(len(order), bool)
    np.not_equal(sorted_tracks[1:], sorted_tracks[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    tracks = sorted_tracks[starts]
    event_row = np.empty(len(order), np.int64)
    event_row[order] = np.cumsum(first) - 1
    previous = (current if current is not None else TrackStats.empty()).lookup(tracks)

    as_of = np.maximum(previous.as_of_ts, np.maximum.reduceat(events.ts[order], starts))
    return _add_events(previous, tracks, event_row, as_of, events)


def apply_track_events_reference(current: TrackStats | None, events: EventBatch) -> TrackStats:
    """`apply_track_events` with np.unique and ufunc.at: the plain version the tests compare with."""
    if len(events) == 0:
        return TrackStats.empty()
    tracks, event_row = np.unique(events.track_id, return_inverse=True)
    previous = (current if current is not None else TrackStats.empty()).lookup(tracks)
    as_of = previous.as_of_ts.copy()
    np.maximum.at(as_of, event_row, events.ts)
    return _add_events(previous, tracks, event_row, as_of, events)


def _add_events(previous: TrackStats, tracks: np.ndarray, event_row: np.ndarray, as_of: np.ndarray,
                events: EventBatch) -> TrackStats:
    """The new rows of `tracks` (distinct, sorted): `previous` rows with every event added,
    event i to row `event_row[i]`; `as_of` is each row's new as-of time. Both versions of
    `apply_track_events` group events their own way and end here."""
    # Bring old decayed counts to the new as-of time, then add each event at its own age.
    recent = previous.recent * np.exp(-(as_of - previous.as_of_ts) / RECENT_TAU_MS)[:, None]
    cell = event_row * N_BEHAVIOURS + events.behaviour.astype(np.int64)
    size = len(tracks) * N_BEHAVIOURS
    weight = np.exp(-(as_of[event_row] - events.ts) / RECENT_TAU_MS)
    recent += np.bincount(cell, weights=weight, minlength=size).reshape(-1, N_BEHAVIOURS)
    totals = previous.totals + np.bincount(cell, minlength=size).reshape(-1, N_BEHAVIOURS)
    return TrackStats(tracks, totals, recent, as_of)


def track_stats_from_log(events: EventBatch) -> TrackStats:
    """Reference recompute from a whole event log."""
    return apply_track_events(None, events)
