"""Candidate generation: a few hundred released tracks per request, from several sources.

(One module past 500 lines on purpose: the sources, the batched passes and their private
request and pick structures are one mechanism read together; the one-source-at-a-time
reference is ranker/candidates/reference.py.)

Rankers only reorder what they are given, so this stage decides what can be recommended
at all. Each request draws from sources in priority order, each up to its quota (a share
of `n_candidates` that depends on the scenario):

- `popular`: recency-decayed engagement counts over the whole catalog;
- `user_genre`: the most popular tracks of the genres the user engages with;
- `recent_artist`: other tracks by artists in the user's latest positive tokens;
- `query_genre`, `query_genre_random`, `query_artist` (search): the query's genre by
  popularity and at random, and the query artist's tracks;
- `seed_artist`, `seed_genre` (radio): the seed track's artist and genre;
- `random`: uniform exploration over released tracks, so new tracks get shown at all.

A source's leftover quota (too few tracks, duplicates of earlier sources, unreleased
tracks) is backfilled from global popularity, then at random; search backfills from the
query genre only and radio from the seed genre first.

Everything is vectorised over the batch of requests: each source yields a [B, k] matrix of
track ids (-1 = none), and a masked pass applies the release filter, de-duplication and the
quota. Batches hold only tens of requests, so numpy calls, not array sizes, are the cost:
one pass takes, for all rows at once, each row's next source in its priority order (rows of
different scenarios in one pass), and sources reading the same group index share a gather.
The two steps that still cost most as numpy calls, that pass (`merge_stage`) and the
best-first gather (`gather_best`), are compiled loops (`ranker/candidates/kernels.py`).
`generate_with_sources_reference` (ranker/candidates/reference.py), one source at a time,
is the plain version the batched one must match (the tests check it). Popularity is learned online from the event stream
(`observe`); the per-group popularity orders are rebuilt at most every `refresh_ms` of
simulated time, since re-sorting the catalog per batch would cost more than the rest.

The history helpers here (`history_profiles`) are shared with the baseline rankers, so
"the user's recent artists" means the same thing in retrieval and in ranking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from features.sequence import UserSequence
from ranker.candidates.kernels import gather_best, merge_stage
from ranker.interface import SequenceSource, SlateRequest, TrackMetadata
from streaming.events import BEHAVIOUR_CODE, BEHAVIOURS, SCENARIO_CODE, SCENARIOS, EventBatch

DAY_MS = 24 * 3600 * 1000

# Tokens that say the user liked what they heard (used for history profiles and co-occurrence).
POSITIVE_BEHAVIOURS = ("full_play", "like", "share", "add_to_playlist")
IS_POSITIVE = np.isin(np.arange(len(BEHAVIOURS)), [BEHAVIOUR_CODE[b] for b in POSITIVE_BEHAVIOURS])
# What counts towards a track's popularity: any listen started, plus positive signals.
POPULARITY_WEIGHT = np.array([1.0 if b in ("play",) + POSITIVE_BEHAVIOURS else 0.0 for b in BEHAVIOURS])

SOURCES: tuple[str, ...] = (
    "seed_artist", "seed_genre", "query_artist", "query_genre", "query_genre_random",
    "recent_artist", "user_genre", "popular", "random",
)
RANDOM_SOURCES = frozenset({"query_genre_random", "random"})  # may propose a track twice
IS_RANDOM_SOURCE = np.array([source in RANDOM_SOURCES for source in SOURCES])
BACKFILL = "backfill"  # label of tracks that filled leftover quota
# "model": a learned source's picks (ranker/candidates/learned.py), never produced here.
SOURCE_LABELS: tuple[str, ...] = SOURCES + (BACKFILL, "model")
SOURCE_CODE = {name: i for i, name in enumerate(SOURCE_LABELS)}

DEFAULT_QUOTAS: dict[str, dict[str, float]] = {
    "home_feed": {"recent_artist": 0.25, "user_genre": 0.30, "popular": 0.25, "random": 0.20},
    "daily_mix": {"recent_artist": 0.35, "user_genre": 0.35, "popular": 0.15, "random": 0.15},
    "radio": {"seed_artist": 0.30, "seed_genre": 0.45, "user_genre": 0.15, "random": 0.10},
    # Search stays inside the query: the genre by popularity and at random, and the artist.
    "search": {"query_artist": 0.30, "query_genre": 0.50, "query_genre_random": 0.20},
    "library": {"recent_artist": 0.30, "user_genre": 0.30, "popular": 0.25, "random": 0.15},
}
# Where leftover quota goes, in order. Search stays inside the query; radio near its seed.
BACKFILL_ORDER: dict[str, tuple[str, ...]] = {
    "search": ("query_genre", "query_genre_random"),
    "radio": ("seed_genre", "popular", "random"),
}
DEFAULT_BACKFILL = ("popular", "random")
OVERSAMPLE = 2  # a source proposes this many times its quota, to survive filtering


class DecayClock:
    """Lazy exponential decay for counters learned from a stream.

    Values are stored inflated by exp((ts - origin) / tau), so "decay everything" costs
    nothing per event; `decay_to(now)` converts back. When inflation grows large the owner
    rebases (multiplies its arrays once) to stay far from float overflow.
    """

    REBASE_EXPONENT = 20.0

    def __init__(self, half_life_ms: float) -> None:
        if not half_life_ms > 0:
            raise ValueError(f"half_life_ms must be > 0, got {half_life_ms}")
        self.tau = half_life_ms / math.log(2)
        self.origin: int | None = None

    def weights(self, ts: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Inflated weights of events at `ts`; rebases `arrays` in place first if needed."""
        newest = int(ts.max())
        if self.origin is None:
            self.origin = newest
        elif (newest - self.origin) / self.tau > self.REBASE_EXPONENT:
            factor = math.exp(-(newest - self.origin) / self.tau)
            for array in arrays:
                array *= factor
            self.origin = newest
        return np.exp((ts - self.origin) / self.tau)

    def decay_to(self, now_ts: int) -> float:
        """Multiplier turning stored values into values decayed to `now_ts`."""
        return 1.0 if self.origin is None else math.exp(-(now_ts - self.origin) / self.tau)


class TrackPopularity:
    """Recency-decayed engagement counts per track (half-life `half_life_ms`), from events."""

    def __init__(self, n_tracks: int, half_life_ms: float = 3 * DAY_MS) -> None:
        self.n_tracks = n_tracks
        self._counts = np.zeros(n_tracks, np.float64)
        self._clock = DecayClock(half_life_ms)

    def observe(self, events: EventBatch) -> None:
        weight = POPULARITY_WEIGHT[events.behaviour]
        counted = weight > 0
        if not counted.any():
            return
        tracks = events.track_id[counted]
        check_track_ids(tracks, self.n_tracks, "events")
        inflated = weight[counted] * self._clock.weights(events.ts[counted], [self._counts])
        self._counts += np.bincount(tracks, weights=inflated, minlength=self.n_tracks)

    def at(self, now_ts: int) -> np.ndarray:
        """float64 [n_tracks]: decayed counts as of `now_ts`."""
        return self._counts * self._clock.decay_to(now_ts)

    def at_tracks(self, track_ids: np.ndarray, now_ts: int) -> np.ndarray:
        """`at(now_ts)[track_ids]` without decaying the whole catalog."""
        return self._counts[track_ids] * self._clock.decay_to(now_ts)

    def max_at(self, now_ts: int) -> float:
        """`at(now_ts).max(initial=0)`: decay is one positive factor, so it commutes with max."""
        return self._counts.max(initial=0.0) * self._clock.decay_to(now_ts)


def check_track_ids(track_ids: np.ndarray, n_tracks: int, where: str) -> None:
    if len(track_ids) and (track_ids.min() < 0 or track_ids.max() >= n_tracks):
        bad = track_ids[(track_ids < 0) | (track_ids >= n_tracks)][0]
        raise ValueError(f"{where}: track_id {bad} is not in the catalog (0..{n_tracks - 1})")


def popularity_order(tracks: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """`tracks` most popular first, ties in their given order: `tracks[argsort(-popularity[tracks],
    stable)]`. Most of a catalog is never played within a few days (popularity 0, tied) and
    keeps its order at the end, so only the played tracks need sorting."""
    values = popularity[tracks]
    if not (values >= 0).all():  # a negative or NaN value: no shortcut
        return tracks[np.argsort(-values, kind="stable")]
    played = values > 0
    top = tracks[played]
    return np.concatenate([top[np.argsort(-values[played], kind="stable")], tracks[~played]])


def first_occurrence(matrix: np.ndarray) -> np.ndarray:
    """bool mask, True where a value appears for the first time in its row (left to right)."""
    order = np.argsort(matrix, axis=1, kind="stable")
    rows = np.arange(len(matrix))[:, None]  # plain fancy indexing: take_along_axis costs more per call
    ordered = matrix[rows, order]
    first_sorted = np.ones(matrix.shape, bool)
    first_sorted[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = np.empty(matrix.shape, bool)
    first[rows, order] = first_sorted
    return first


def compact_left(matrix: np.ndarray, keep: np.ndarray, width: int, fill: int = -1) -> np.ndarray:
    """Per row, the kept values moved to the left in order, padded with `fill`, cut to `width`."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]
    rows = np.arange(len(matrix))[:, None]
    out = matrix[rows, order]
    out[~keep[rows, order]] = fill
    return out


@dataclass(frozen=True)
class HistoryProfile:
    """What a batch of users' sequences say about their taste, one row per user."""

    recent_tracks: np.ndarray  # int64 [B, R], latest positive tokens, most recent first, -1 pad
    recent_artists: np.ndarray  # int64 [B, R], their artists, -1 pad
    genre_share: np.ndarray  # float64 [B, n_genres], share of positive tokens per genre

    def distinct_recent_artists(self, width: int) -> np.ndarray:
        """int64 [B, width]: the user's most recent distinct artists, -1 pad."""
        keep = first_occurrence(self.recent_artists) & (self.recent_artists >= 0)
        return compact_left(self.recent_artists, keep, width)

    def top_genres(self, width: int) -> np.ndarray:
        """int64 [B, width]: genres with the largest share first (ties by id), -1 pad."""
        width = min(width, self.genre_share.shape[1])
        order = np.argsort(-self.genre_share, axis=1, kind="stable")[:, :width]
        return np.where(self.genre_share[np.arange(len(order))[:, None], order] > 0, order, -1)


def history_profiles(sequences: Mapping[int, UserSequence], user_ids: Sequence[int],
                     metadata: TrackMetadata, recent: int = 32) -> HistoryProfile:
    """Profiles of `user_ids` (users missing from `sequences` count as empty).

    All users' tokens are concatenated and handled in one pass: a batch has only tens of
    users, so per-user numpy calls would cost more than the work itself.
    `history_profiles_reference` (ranker/candidates/reference.py) is the per-user version it must agree with."""
    n_users, n_genres = len(user_ids), max(metadata.n_genres, 1)
    found = [(row, sequence) for row, user in enumerate(user_ids)
             if (sequence := sequences.get(int(user))) is not None and len(sequence)]
    recent_tracks = np.full((n_users, recent), -1, np.int64)
    if not found:
        return HistoryProfile(recent_tracks, recent_tracks.copy(), np.zeros((n_users, n_genres)))
    positive = IS_POSITIVE[np.concatenate([sequence.behaviours for _, sequence in found])]
    flat = np.concatenate([sequence.track_ids for _, sequence in found])[positive]
    check_track_ids(flat, metadata.n_tracks, "user sequences")
    rows = np.repeat([row for row, _ in found], [len(sequence) for _, sequence in found])[positive]
    # Position of each positive token counted from its user's latest one (0 = most recent).
    row_end = np.cumsum(np.bincount(rows, minlength=n_users))
    from_latest = row_end[rows] - 1 - np.arange(len(flat))
    latest = from_latest < recent
    recent_tracks[rows[latest], from_latest[latest]] = flat[latest]
    counts = np.bincount(rows * n_genres + metadata.genre_id[flat], minlength=n_users * n_genres)
    counts = counts.reshape(n_users, n_genres).astype(np.float64)
    genre_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    recent_artists = np.where(recent_tracks >= 0, metadata.artist_id[np.maximum(recent_tracks, 0)], -1)
    return HistoryProfile(recent_tracks, recent_artists, genre_share)




class _GroupIndex:
    """Released tracks grouped (by genre or artist), each group ordered by popularity."""

    def __init__(self, group_of_track: np.ndarray, by_popularity: np.ndarray) -> None:
        """`by_popularity`: the released tracks, most popular first (ties by id)."""
        n_groups = int(group_of_track.max()) + 1 if len(group_of_track) else 0
        groups = group_of_track[by_popularity]
        # A stable sort by group keeps the popularity order inside each group; on 16-bit
        # keys numpy sorts by radix, ~30x faster than re-sorting (group, -popularity) pairs.
        if n_groups <= np.iinfo(np.int16).max:
            groups = groups.astype(np.int16)
        self.tracks = by_popularity[np.argsort(groups, kind="stable")]
        sizes = np.bincount(groups, minlength=n_groups)
        self.start = np.concatenate([[0], np.cumsum(sizes)])
        self.n_groups = n_groups

    def gather(self, groups: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """int64 [B, k]: tracks from each row's groups ([B, G], -1 = none), interleaved
        group by group; best first (`gather_best`), or uniformly at random within the group with `rng`."""
        if len(self.tracks) == 0:
            return np.full((len(groups), k), -1, np.int64)
        if rng is None:
            return gather_best(self.tracks, self.start, np.ascontiguousarray(groups, np.int64), int(k))
        groups = np.where((groups >= 0) & (groups < self.n_groups), groups, -1)
        slot = np.arange(k)[None, :]
        if groups.shape[1] == 1:  # one group per row (search, radio): nothing to interleave
            n_valid, group = 1, groups  # [B, 1]: group bounds are looked up once per row, not per slot
        else:
            groups = compact_left(groups, groups >= 0, groups.shape[1])
            n_valid = np.maximum((groups >= 0).sum(axis=1, keepdims=True), 1)
            group = groups[np.arange(len(groups))[:, None], slot % n_valid]
        safe = np.maximum(group, 0)
        start = self.start[safe]
        size = self.start[safe + 1] - start
        rank = np.floor(rng.random((len(groups), k)) * size).astype(np.int64)
        ok = (group >= 0) & (rank < size)
        return np.where(ok, self.tracks[np.minimum(start + rank, len(self.tracks) - 1)], -1)


class CandidateGenerator:
    """Merges candidate sources per request; see the module docstring.

    `sequences` gives the user-history sources (`recent_artist`, `user_genre`); without it
    their quota is backfilled from popularity. `observe(events)` is meant to be subscribed
    to the event bus.
    """

    def __init__(self, metadata: TrackMetadata, seed: int = 0, n_candidates: int = 200,
                 sequences: SequenceSource | None = None,
                 quotas: Mapping[str, Mapping[str, float]] | None = None,
                 half_life_ms: float = 3 * DAY_MS, refresh_ms: int = 15 * 60_000,
                 history_artists: int = 5, history_genres: int = 3) -> None:
        if n_candidates < 1:
            raise ValueError(f"n_candidates must be >= 1, got {n_candidates}")
        self.metadata = metadata
        self.n_candidates = n_candidates
        self.sequences = sequences
        self.refresh_ms = refresh_ms
        self.history_artists, self.history_genres = history_artists, history_genres
        self.popularity = TrackPopularity(metadata.n_tracks, half_life_ms)
        self.quota = self._quota_table({**DEFAULT_QUOTAS, **(quotas or {})})
        self.backfill = [BACKFILL_ORDER.get(scenario, DEFAULT_BACKFILL) for scenario in SCENARIOS]
        # Per scenario, its sources with a quota in priority order, then its backfill sources:
        # source codes [n_scenarios, n_stages], -1 past the end.
        self._stages = _code_table([[SOURCES[c] for c in np.flatnonzero(row)] for row in self.quota])
        self._backfill_stages = _code_table(self.backfill)
        self._rng = np.random.default_rng(seed)
        self._built_ts: int | None = None

    def _quota_table(self, quotas: Mapping[str, Mapping[str, float]]) -> np.ndarray:
        """int64 [n_scenarios, n_sources]: how many candidates each source may add."""
        table = np.zeros((len(SCENARIOS), len(SOURCES)), np.int64)
        for scenario, shares in quotas.items():
            if scenario not in SCENARIO_CODE:
                raise ValueError(f"quotas: unknown scenario {scenario!r}; expected one of {SCENARIOS}")
            unknown = set(shares) - set(SOURCES)
            if unknown:
                raise ValueError(f"quotas[{scenario!r}]: unknown source(s) {sorted(unknown)}; expected {SOURCES}")
            if any(not 0 <= s <= 1 for s in shares.values()) or sum(shares.values()) > 1 + 1e-9:
                raise ValueError(f"quotas[{scenario!r}]: shares must be in [0, 1] and sum to at most 1")
            for source, share in shares.items():
                table[SCENARIO_CODE[scenario], SOURCES.index(source)] = int(share * self.n_candidates)
        return table

    def observe(self, events: EventBatch) -> None:
        self.popularity.observe(events)

    def _refresh(self, now_ts: int) -> None:
        """Rebuild the popularity orders if older than `refresh_ms` of simulated time."""
        if self._built_ts is not None and 0 <= now_ts - self._built_ts < self.refresh_ms:
            return
        meta = self.metadata
        popularity = self.popularity.at(now_ts)
        released = np.flatnonzero(meta.release_ts <= now_ts)
        self._released = released
        self._popular = popularity_order(released, popularity)
        self._by_genre = _GroupIndex(meta.genre_id, self._popular)
        self._by_artist = _GroupIndex(meta.artist_id, self._popular)
        self._built_ts = now_ts

    def generate(self, requests: Sequence[SlateRequest]) -> list[np.ndarray]:
        """int64 track ids per request, in source priority order, unique and released."""
        return [tracks for tracks, _ in self.generate_with_sources(requests)]

    def generate_with_sources(self, requests: Sequence[SlateRequest]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per request (track ids, source codes into `SOURCE_LABELS`).

        Same result as `generate_with_sources_reference` (which takes one source at a time),
        in fewer numpy calls: a batch has only tens of requests, so the number of calls, not
        their size, is the cost. Sources only depend on each other through what a row has
        already taken, so every source's proposals are made first (in source order, which
        keeps the random draws in order), and then stage j takes, for all rows at once, from
        each row's j-th source; a row's sources in stage order are its sources in priority
        order, and different rows never share a taken set.
        """
        if not requests:
            return []
        batch = _RequestBatch.of(requests, self.metadata)
        self._refresh(int(batch.ts.max()))
        # Every proposal comes from the tracks released when the indexes were built; if that
        # is no later than the earliest request, the release check cannot drop anything.
        release_ts = None if self._built_ts <= int(batch.ts.min()) else self.metadata.release_ts
        picks = _Picks(len(requests), self.n_candidates, self.metadata.n_tracks, batch.seed_track, release_ts)
        quota = self.quota[batch.scenario]
        wanted = []
        for code in range(len(SOURCES)):
            rows = np.flatnonzero(quota[:, code])  # only requests whose scenario uses the source
            if len(rows):
                wanted.append((code, rows, int(quota[rows, code].max()) * OVERSAMPLE))
        proposals = self._propose_many(wanted, batch)
        for codes in self._stages[batch.scenario].T:
            rows = np.flatnonzero(codes >= 0)
            if len(rows):
                codes = codes[rows]
                picks.add(rows, _stage_matrix(rows, codes, proposals), quota[rows, codes], batch.ts[rows],
                          codes.astype(np.int8), IS_RANDOM_SOURCE[codes])
        self._backfill_picks(picks, batch)
        return [(picks.tracks[row, :n], picks.codes[row, :n]) for row, n in enumerate(picks.count.tolist())]

    def _backfill_picks(self, picks: "_Picks", batch: "_RequestBatch") -> None:
        """Fill what the quotas left empty, from each scenario's backfill sources in turn.
        Top lists restart at the top, so a row's proposals are n_candidates + what it misses."""
        for stage_codes in self._backfill_stages[batch.scenario].T:
            missing = self.n_candidates - picks.count
            codes = np.where(missing > 0, stage_codes, -1)
            wanted = []
            # Sources in order of their first request, full or not: the order of the random draws.
            for code in dict.fromkeys(stage_codes.tolist()):
                rows = np.flatnonzero(codes == code)
                if code >= 0 and len(rows):
                    wanted.append((code, rows, self.n_candidates + int(missing[rows].max()) * OVERSAMPLE))
            proposals = self._propose_many(wanted, batch)
            rows = np.flatnonzero(codes >= 0)
            if len(rows):
                codes = codes[rows]
                picks.add(rows, _stage_matrix(rows, codes, proposals), missing[rows], batch.ts[rows],
                          np.full(len(rows), SOURCE_CODE[BACKFILL], np.int8), IS_RANDOM_SOURCE[codes])

    def _propose(self, source: str, rows: np.ndarray, k: int, batch: "_RequestBatch") -> np.ndarray:
        """int64 [len(rows), k]: what `source` suggests for those requests, best first, -1 = none."""
        if source == "popular":
            return self._popular_rows(len(rows), k)
        if source == "random":
            return self._random_rows(len(rows), k)
        index, groups = self._source_groups(source, rows, batch)
        return index.gather(groups, k, self._rng if source in RANDOM_SOURCES else None)

    def _source_groups(self, source: str, rows: np.ndarray, batch: "_RequestBatch") -> tuple[_GroupIndex, np.ndarray]:
        """The group index a source reads and each request's groups in it ([len(rows), G], -1 = none)."""
        meta = self.metadata
        if source == "recent_artist":
            profile = batch.profile(self.sequences, meta)
            return self._by_artist, profile.distinct_recent_artists(self.history_artists)[rows]
        if source == "user_genre":
            return self._by_genre, batch.profile(self.sequences, meta).top_genres(self.history_genres)[rows]
        seed = batch.seed_track[rows]
        if source == "seed_artist":
            return self._by_artist, np.where(seed >= 0, meta.artist_id[np.maximum(seed, 0)], -1)[:, None]
        if source == "seed_genre":
            return self._by_genre, np.where(seed >= 0, meta.genre_id[np.maximum(seed, 0)], -1)[:, None]
        if source == "query_artist":
            return self._by_artist, batch.query_artist[rows, None]
        if source in ("query_genre", "query_genre_random"):
            return self._by_genre, batch.query_genre[rows, None]
        raise ValueError(f"unknown candidate source {source!r}")

    def _propose_many(self, wanted: Sequence[tuple[int, np.ndarray, int]], batch: "_RequestBatch"
                      ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """`{code: (rows, _propose(SOURCES[code], rows, k, batch))}` for `wanted` (code, rows, k).

        Deterministic sources that read the same group index share one gather: a row's
        first k proposals do not depend on k, and one group padded with -1 gathers as it does
        alone. Random sources draw in `wanted` order, so the random stream is unchanged."""
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        shared: dict[int, list] = {}  # id(index) -> [(code, rows, k, groups)]
        for code, rows, k in wanted:
            source = SOURCES[code]
            if source in RANDOM_SOURCES or source == "popular":
                out[code] = (rows, self._propose(source, rows, k, batch))
            else:
                index, groups = self._source_groups(source, rows, batch)
                shared.setdefault(id(index), [index]).append((code, rows, k, groups))
        for index, *parts in shared.values():
            width = max(groups.shape[1] for *_, groups in parts)
            groups = np.full((sum(len(rows) for _, rows, _, _ in parts), width), -1, np.int64)
            offsets = np.cumsum([0] + [len(rows) for _, rows, _, _ in parts])
            for (_, _, _, part), offset in zip(parts, offsets.tolist()):
                groups[offset: offset + len(part), : part.shape[1]] = part
            proposed = index.gather(groups, max(k for _, _, k, _ in parts))
            for (code, rows, k, _), offset in zip(parts, offsets.tolist()):
                out[code] = (rows, proposed[offset: offset + len(rows), :k])
        return out

    def _popular_rows(self, n_rows: int, k: int) -> np.ndarray:
        top = np.full(k, -1, np.int64)
        top[: min(k, len(self._popular))] = self._popular[:k]
        return np.broadcast_to(top, (n_rows, k))

    def _random_rows(self, n_rows: int, k: int) -> np.ndarray:
        if len(self._released) == 0 or k == 0:
            return np.full((n_rows, k), -1, np.int64)
        return self._released[self._rng.integers(0, len(self._released), size=(n_rows, k))]

def _code_table(names: Sequence[Sequence[str]]) -> np.ndarray:
    """int64 [len(names), longest]: source codes of each row's names, -1 padded."""
    table = np.full((len(names), max((len(row) for row in names), default=0)), -1, np.int64)
    for i, row in enumerate(names):
        table[i, : len(row)] = [SOURCES.index(name) for name in row]
    return table


def _stage_matrix(rows: np.ndarray, codes: np.ndarray, proposals: Mapping[int, tuple[np.ndarray, np.ndarray]]
                  ) -> np.ndarray:
    """int64 [len(rows), K]: row i's proposals from source codes[i] (made for that source's
    rows, `proposals[code] = (source rows, [n, k])`), -1 padded to the widest source."""
    used = dict.fromkeys(codes.tolist())
    if len(used) == 1:
        source_rows, proposed = proposals[codes[0]]
        if len(source_rows) == len(rows):  # the stage is exactly this source's rows
            return proposed
    matrix = np.full((len(rows), max(proposals[code][1].shape[1] for code in used)), -1, np.int64)
    for code in used:
        source_rows, proposed = proposals[code]
        here = np.flatnonzero(codes == code)
        matrix[here, : proposed.shape[1]] = proposed[np.searchsorted(source_rows, rows[here])]
    return matrix


class _Picks:
    """The candidates a batch has so far: per row its tracks and their source codes, in order,
    and `taken`, which tracks the row already has (a radio row starts with its seed).
    `release_ts` is None when every proposal is known to be released (no check needed)."""

    def __init__(self, n_rows: int, width: int, n_tracks: int, seed_track: np.ndarray,
                 release_ts: np.ndarray | None) -> None:
        self.release_ts = None if release_ts is None else np.ascontiguousarray(release_ts, np.int64)
        self.tracks = np.full((n_rows, width), -1, np.int64)
        self.codes = np.zeros((n_rows, width), np.int8)
        self.count = np.zeros(n_rows, np.int64)
        self.taken = np.zeros((n_rows, n_tracks), bool)
        radio = np.flatnonzero(seed_track >= 0)
        self.taken[radio, seed_track[radio]] = True  # radio never proposes its own seed

    def add(self, rows: np.ndarray, proposed: np.ndarray, quota: np.ndarray, ts: np.ndarray, codes: np.ndarray,
            may_repeat: np.ndarray) -> np.ndarray:
        """Append to each of `rows` its first `quota` proposals ([len(rows), k], -1 = none) that
        are released at the row's `ts` and not taken yet; `may_repeat` marks rows whose
        proposals can hold a track twice (random draws). Returns how many each row kept
        (`merge_stage`, compiled: a stage has only tens of rows)."""
        check_release = self.release_ts is not None
        return merge_stage(self.taken, self.tracks, self.codes, self.count, np.ascontiguousarray(rows, np.int64),
                           np.ascontiguousarray(proposed, np.int64), np.ascontiguousarray(quota, np.int64),
                           np.ascontiguousarray(ts, np.int64), np.ascontiguousarray(codes, np.int8),
                           np.ascontiguousarray(may_repeat, np.bool_),
                           self.release_ts if check_release else _NO_RELEASES, check_release)


_NO_RELEASES = np.zeros(0, np.int64)


@dataclass
class _RequestBatch:
    """The columns of a batch of slate requests that candidate sources read, checked once."""

    requests: Sequence[SlateRequest]
    ts: np.ndarray  # int64 [B]
    scenario: np.ndarray  # int64 [B], scenario codes
    seed_track: np.ndarray  # int64 [B], radio's seed, -1 elsewhere
    query_genre: np.ndarray  # int64 [B], search's genre, -1 elsewhere
    query_artist: np.ndarray  # int64 [B], search's artist if any, -1 elsewhere
    _profile: HistoryProfile | None = None

    @classmethod
    def of(cls, requests: Sequence[SlateRequest], meta: TrackMetadata) -> "_RequestBatch":
        scenario = np.array([_scenario_code(r) for r in requests], np.int64)
        radio, search = scenario == SCENARIO_CODE["radio"], scenario == SCENARIO_CODE["search"]
        return cls(
            requests=requests, ts=np.array([r.ts for r in requests], np.int64), scenario=scenario,
            seed_track=_context_ids(requests, radio, "seed_track", meta.n_tracks, required=True),
            query_genre=_context_ids(requests, search, "query_genre", meta.n_genres, required=True),
            query_artist=_context_ids(requests, search, "query_artist", meta.n_artists, required=False),
        )

    def profile(self, sequences: SequenceSource | None, meta: TrackMetadata) -> HistoryProfile:
        """History profiles of the batch's users (read once, on first use)."""
        if self._profile is None:
            users = [r.user_id for r in self.requests]
            found = sequences.get_sequences(sorted(set(users))) if sequences is not None else {}
            self._profile = history_profiles(found, users, meta)
        return self._profile


def _context_ids(requests: Sequence[SlateRequest], applies: np.ndarray, key: str, n_ids: int,
                 required: bool) -> np.ndarray:
    """int64 [B]: context[key] of the requests where `applies`, -1 elsewhere; checked to be an id."""
    out = np.full(len(requests), -1, np.int64)
    for i in np.flatnonzero(applies).tolist():
        request = requests[i]
        value = request.context.get(key)
        if value is None:
            if required:
                raise ValueError(f"{request.scenario} request {request.request_id} has no context[{key!r}]")
            continue
        if not _is_id(value, n_ids):
            raise ValueError(f"{request.scenario} request {request.request_id}: context[{key!r}]={value!r} "
                             f"is not an id in 0..{n_ids - 1}")
        out[i] = int(value)
    return out


def _is_id(value, n_ids: int) -> bool:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool) and number.is_integer() and 0 <= number < n_ids


def _scenario_code(request: SlateRequest) -> int:
    try:
        return SCENARIO_CODE[request.scenario]
    except KeyError:
        raise ValueError(f"request {request.request_id}: unknown scenario {request.scenario!r}; "
                         f"expected one of {SCENARIOS}") from None
