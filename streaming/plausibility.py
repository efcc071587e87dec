"""Plausibility bounds: events that pass the contract's types but cannot be true of this stream.

`streaming.events` checks each event on its own (types, int64 ranges, known codes). Some
events are well-formed and still poison state that outlives them: an `event_id` of 10^15
raises its user's high-water mark, so every later real event of that user is skipped as
already applied; a year-9999 `ts` moves a track's decay clock so its counts are wrong
forever; an `event_id` sent twice with different content is recorded twice and counted
twice by the track statistics. So a `PlausibilityGate`, which sees the stream in order,
dead-letters (with the reason) every event that
  - names a user or track outside the catalogue's id space (`n_users`, `n_tracks`);
  - has a `play_ms` longer than its track (`track_duration_ms`, or `max_play_ms`);
  - has an `event_id` more than `max_id_lead` ahead of the stream's id watermark, or a
    `ts` more than `max_ts_lead_ms` ahead of its time watermark (the largest accepted so
    far; before anything is accepted, the reference below);
  - repeats an accepted `event_id` with different content, or, unless `redelivery` (for
    consumers whose at-least-once delivery repeats what they already stored, and whose
    apply is idempotent), with the same content.
A Kafka worker clears the remembered ids when its partitions change (a redelivered batch
then passes, as at-least-once delivery wants) and remembers a batch only once it is stored.
Repeats are found among the last `window` event ids (a ring of ids and content digests);
an event further behind the watermark than that is not checked for repeats. Late events
are not refused: a lagging partition or a slow client is normal, and only a watermark
that runs ahead can poison state.

Before a gate has accepted anything (a fresh worker, a replay) it judges a batch against
the larger of (a) what the store already holds for the batch's users and tracks
(`stored_reference`: their newest event id and time, a lower bound of the stream's
watermarks, given with `seed`) and (b) the batch's median when the batch has at least
`MEDIAN_MIN_EVENTS` events (one wild event cannot move a median of three; a backlog after
an outage is judged by its own median, not by the older stored state). A batch of one or
two events with nothing stored (a new stream's first events) is judged against itself:
nothing sane exists to judge it by, and it is logged.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from streaming.events import DeadLetter, EventBatch, dead_letters_for

if TYPE_CHECKING:
    from features.store import FeatureStoreClient

log = logging.getLogger("streaming.worker")
DAY_MS = 86_400_000
MEDIAN_MIN_EVENTS = 3  # a batch median a single wild event cannot set
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                 0x2545F4914F6CDD1D], dtype=np.uint64)


@dataclass(frozen=True)
class EventBounds:
    """What a plausible event of one stream looks like. None: no bound of that kind."""

    n_users: int | None = None  # user ids in [0, n_users)
    n_tracks: int | None = None  # track ids in [0, n_tracks)
    track_duration_ms: np.ndarray | None = None  # int64 [n_tracks]: play_ms <= the track's duration
    max_play_ms: int | None = None  # when per-track durations are not known here
    # The simulator's ids grow by one per event; a batch of a busy stream spans well under
    # a million of them, so a larger lead is not a real event.
    max_id_lead: int = 10_000_000
    # Reactions to a slate are stamped up to a slate's listening time (hours) ahead of the
    # request; a day ahead of everything else accepted is a broken clock or a forgery.
    max_ts_lead_ms: int = DAY_MS
    window: int = 1 << 20  # event ids remembered for repeats (16 MiB)
    redelivery: bool = False  # exact repeats pass (idempotent consumers under at-least-once)


def content_digest(batch: EventBatch) -> np.ndarray:
    """uint64 [N]: a digest of everything in each event but its id (equal content, equal digest)."""
    arms, arm_code = np.unique(batch.arm.astype(str), return_inverse=True)
    arm_hash = np.array([int.from_bytes(hashlib.blake2b(a.encode(), digest_size=8).digest(), "little")
                         for a in arms], dtype=np.uint64)[arm_code] if len(arms) else np.zeros(0, np.uint64)
    columns = (batch.ts, batch.user_id, batch.track_id, batch.scenario, batch.behaviour, batch.request_id,
               batch.position, batch.play_ms)
    digest = np.zeros(len(batch), np.uint64)
    with np.errstate(over="ignore"):
        for k, column in enumerate(columns):
            digest = (digest ^ column.astype(np.int64, copy=False).view(np.uint64)) * _MIX[k]
            digest ^= digest >> np.uint64(29)
        digest = (digest ^ arm_hash) * _MIX[8]
    return digest


class PlausibilityGate:
    """Applies `EventBounds` to a stream's batches, in order; keeps the watermarks and the
    ring of recent ids. One gate per stream reader (the sandbox, a replay, a worker)."""

    def __init__(self, bounds: EventBounds, id_watermark: int | None = None, ts_watermark: int | None = None):
        self.bounds = bounds
        self.id_watermark, self.ts_watermark = id_watermark, ts_watermark
        self._seeded = False
        self._stored_id: int | None = None  # lower bounds from the store (`seed`)
        self._stored_ts: int | None = None
        self._ids = np.full(bounds.window, -1, np.int64)
        self._digests = np.zeros(bounds.window, np.uint64)

    @property
    def needs_reference(self) -> bool:
        """Nothing accepted yet and no stored state asked for: call `seed` first."""
        return self.id_watermark is None and self.ts_watermark is None and not self._seeded

    def seed(self, stored_id: int | None, stored_ts: int | None) -> None:
        """What the store holds of the stream (`stored_reference`): the reference of the
        first batches until this gate has watermarks of its own."""
        self._seeded = True
        self._stored_id, self._stored_ts = stored_id, stored_ts

    def _reference(self, column: np.ndarray, watermark: int | None, stored: int | None) -> int:
        if watermark is not None:
            return watermark
        sane = [v for v in (stored, int(np.median(column)) if len(column) >= MEDIAN_MIN_EVENTS else None)
                if v is not None]
        if not sane:
            log.warning("plausibility: a first batch of %d event(s) with nothing stored is judged against itself",
                        len(column))
            return int(np.median(column))
        return max(sane)

    def forget_repeats(self) -> None:
        """Drop the remembered ids (a worker whose partitions changed: another may have them)."""
        self._ids.fill(-1)

    def check(self, batch: EventBatch, source: str = "", received_ts: int = 0, remember: bool = True
              ) -> tuple[EventBatch, list[DeadLetter]]:
        """The plausible events of `batch` (in order) and dead letters for the rest. With
        `remember=False` the caller calls `remember(good)` once the events are stored: a
        batch that never got stored must not make its own redelivery look like a repeat."""
        if len(batch) == 0:
            return batch, []
        b = self.bounds
        problems: list[tuple[np.ndarray, str]] = []
        if b.n_users is not None:
            problems.append((batch.user_id >= b.n_users, f"user_id outside the user space [0, {b.n_users})"))
        if b.n_tracks is not None:
            problems.append((batch.track_id >= b.n_tracks, f"track_id outside the catalogue [0, {b.n_tracks})"))
        if b.track_duration_ms is not None:
            known = batch.track_id < len(b.track_duration_ms)
            duration = b.track_duration_ms[np.where(known, batch.track_id, 0)]
            problems.append((known & (batch.play_ms > duration), "play_ms longer than the track"))
        if b.max_play_ms is not None:
            problems.append((batch.play_ms > b.max_play_ms, f"play_ms over {b.max_play_ms} (the longest track)"))
        id_ref = self._reference(batch.event_id, self.id_watermark, self._stored_id)
        ts_ref = self._reference(batch.ts, self.ts_watermark, self._stored_ts)
        problems.append((batch.event_id - id_ref > b.max_id_lead,
                         f"event_id more than {b.max_id_lead:,} ahead of the stream (watermark {id_ref})"))
        problems.append((batch.ts - ts_ref > b.max_ts_lead_ms,
                         f"ts more than {b.max_ts_lead_ms:,} ms ahead of the stream (watermark {ts_ref})"))
        bad = np.zeros(len(batch), bool)
        for mask, _ in problems:
            bad |= mask
        digest = content_digest(batch)
        for mask, reason in self._repeats(batch, digest, bad):  # only among events plausible so far
            problems.append((mask, reason))
            bad |= mask
        good = batch.select(~bad)
        if remember:
            self.remember(good, digest[~bad])
        dead = dead_letters_for(batch, bad, problems, "implausible", source, received_ts) if bad.any() else []
        return good, dead

    def _repeats(self, batch: EventBatch, digest: np.ndarray, bad: np.ndarray) -> list[tuple[np.ndarray, str]]:
        """Masks of the events (not already `bad`) that repeat an accepted event id, or an
        earlier good event of the batch, with their reasons."""
        slot = batch.event_id % self.bounds.window
        seen = (self._ids[slot] == batch.event_id) & ~bad
        same = seen & (self._digests[slot] == digest)
        # An id already accepted is judged against what was accepted (above). Among the
        # others, within the batch: sorted by id with the rest last, each id's first event
        # is the one kept; the good ones after it repeat it.
        fresh = ~bad & ~seen
        order = np.lexsort((np.arange(len(batch)), ~fresh, batch.event_id))
        ids, sorted_digest = batch.event_id[order], digest[order]
        run_start = np.r_[True, ids[1:] != ids[:-1]]
        first = np.maximum.accumulate(np.where(run_start, np.arange(len(ids)), 0))
        later, later_same = np.zeros(len(batch), bool), np.zeros(len(batch), bool)
        later[order] = ~run_start & fresh[order]
        later_same[order] = later[order] & (sorted_digest == sorted_digest[first])
        differs = (seen & ~same) | (later & ~later_same)
        reasons = [(differs, "event_id repeated with different content")]
        if not self.bounds.redelivery:
            reasons.append(((same | later_same) & ~differs,
                            "event_id repeated (same content, already accepted)"))
        return reasons

    def remember(self, good: EventBatch, digest: np.ndarray | None = None) -> None:
        """Count `good` (plausible events, as `check` returned them) as accepted."""
        if len(good) == 0:
            return
        slot = good.event_id % self.bounds.window
        self._ids[slot] = good.event_id
        self._digests[slot] = content_digest(good) if digest is None else digest
        top_id, top_ts = int(good.event_id.max()), int(good.ts.max())
        self.id_watermark = top_id if self.id_watermark is None else max(self.id_watermark, top_id)
        self.ts_watermark = top_ts if self.ts_watermark is None else max(self.ts_watermark, top_ts)


def stored_reference(store: "FeatureStoreClient", batch: EventBatch) -> tuple[int | None, int | None]:
    """The newest event id and time the store holds for `batch`'s users (their sequences'
    `last_event_id` and newest token) and tracks (`as_of_ts`); None where it holds none.
    Both are lower bounds of the stream's watermarks, read once by a fresh worker."""
    if len(batch) == 0:
        return None, None
    users = np.unique(batch.user_id[(batch.user_id >= 0)]).tolist()
    sequences = store.get_sequences(users).values()
    ids = [s.last_event_id for s in sequences if s.last_event_id >= 0]
    times = [int(s.timestamps[-1]) for s in sequences if len(s)]
    as_of = store.read_track_stats(np.unique(batch.track_id)).as_of_ts
    times += [int(as_of.max())] if len(as_of) and as_of.max() > 0 else []
    return (max(ids) if ids else None), (max(times) if times else None)
