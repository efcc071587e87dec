"""Listeners: hidden state for all users at once, as arrays indexed by user id.

Why arrays: a reaction step handles every slate of a batch together, and per-user Python
objects would make that a loop. Each user has
- a taste vector (unit, in the catalog's latent space): a Dirichlet mixture over genre
  centroids plus a personal offset. It takes a random walk between sessions and moves
  toward what the user fully plays or likes (RecSim's interest evolution);
- an activity level (sessions per day, lognormal: a few heavy listeners, many light ones)
  and a chronotype shift of the shared hour-of-day cycle `HOURLY_ACTIVITY`;
- a scenario mix (Dirichlet around a platform-wide mix), and propensities: skip tolerance,
  like/share/playlist/dislike biases, session stickiness;
- a library (ring buffer of liked and fully played tracks) that library sessions and radio
  seeds draw from, seeded at the start with popular tracks close to the user's taste;
- session fatigue: same-genre play counts and the last few artists played in the session
  (SARDINE's boredom, KuaiSim's slate fatigue).
"""

from __future__ import annotations

import bisect
import math

from dataclasses import dataclass

import numpy as np

from simulator.catalog import Catalog, unit_rows
from simulator.config import DAY_MS, HOUR_MS, SimConfig
from streaming.events import SCENARIOS

# Relative session starts per hour of day (UTC, before each user's chronotype shift):
# a night trough, a morning commute, lunch, and an evening peak.
HOURLY_ACTIVITY = np.array([0.45, 0.28, 0.18, 0.13, 0.13, 0.22, 0.5, 0.95, 1.25, 1.05, 0.9, 0.95,
                            1.15, 1.1, 0.95, 0.95, 1.1, 1.4, 1.55, 1.6, 1.6, 1.45, 1.15, 0.8])
# Platform-wide scenario mix (order of streaming.events.SCENARIOS); users vary around it.
SCENARIO_MIX = {"home_feed": 0.3, "daily_mix": 0.15, "radio": 0.15, "search": 0.14, "library": 0.26}
RECENT_ARTISTS = 8


@dataclass
class Users:
    taste: np.ndarray  # float64 [U, d], unit rows
    sessions_per_day: np.ndarray  # float64 [U]
    chronotype_ms: np.ndarray  # int64 [U], shift of the daily cycle
    scenario_cdf: np.ndarray  # float64 [U, n_scenarios], cumulative scenario mix
    skip_tolerance: np.ndarray  # float64 [U], added to the full-play logit
    like_bias: np.ndarray  # float64 [U]
    share_bias: np.ndarray  # float64 [U]
    playlist_bias: np.ndarray  # float64 [U]
    dislike_bias: np.ndarray  # float64 [U]
    stickiness: np.ndarray  # float64 [U], added to the continue-session logit
    library: np.ndarray  # int64 [U, L], -1 where empty
    library_count: np.ndarray  # int64 [U], filled slots
    library_next: np.ndarray  # int64 [U], ring write position
    session_genre_plays: np.ndarray  # int32 [U, G], reset at session start
    recent_artists: np.ndarray  # int64 [U, RECENT_ARTISTS], -1 where empty, reset at session start
    recent_next: np.ndarray  # int64 [U]
    last_walk_ms: np.ndarray  # int64 [U], simulated ms of the last taste random-walk step
    library_ms: np.ndarray  # int64 [U, L], simulated ms each library slot was (last) filled
    # User model 2 (tastes.py): several interests; `taste` is the active one.
    interests: np.ndarray | None = None  # float64 [U, K, d], unit rows
    interest_hour: np.ndarray | None = None  # float64 [U, K], hour of day each interest is most likely
    interest_scenario: np.ndarray | None = None  # float64 [U, K, n_scenarios], log-weight per scenario
    active_interest: np.ndarray | None = None  # int64 [U]
    interest_weight: np.ndarray | None = None  # float64 [U, K], how much of the time each interest is on
    # The three fixed arrays above as Python rows, per user [(weight, hour, log-weight per scenario)] * K:
    # choose_interest reads a few scalars per session, and Python floats are cheaper there than numpy's.
    interest_rows: list | None = None
    scenario_rows: list | None = None  # scenario_cdf as Python rows (fixed after generation), built on first draw
    taste_shifts: int = 0
    # User model 3 (albums.py): the next track of the album whose track this session fully played
    # last, -1 if none (its last track was skipped, the album ended, or nothing yet).
    album_next: np.ndarray | None = None  # int64 [U], reset at session start
    now_ms: int = 0  # simulated ms of the tick being ranked (the platform sets it)

    @property
    def n_users(self) -> int:
        return len(self.taste)

    @classmethod
    def generate(cls, config: SimConfig, catalog: Catalog, rng: np.random.Generator) -> "Users":
        U, d, G, L = config.n_users, config.latent_dim, config.n_genres, config.library_size
        genre_mix = rng.dirichlet(np.full(G, config.taste_concentration), U)
        taste = unit_rows(genre_mix @ catalog.genre_centroids + 0.3 * rng.standard_normal((U, d)) / np.sqrt(d))

        spread = config.sessions_per_day_sigma * rng.standard_normal(U)
        sessions_per_day = config.sessions_per_day_median * np.exp(spread)
        chronotype_ms = (config.chronotype_sigma_h * HOUR_MS * rng.standard_normal(U)).astype(np.int64)
        base_mix = np.array([SCENARIO_MIX[s] for s in SCENARIOS])
        scenario_mix = rng.dirichlet(base_mix * len(SCENARIOS) * config.scenario_mix_concentration, U)

        users = cls(
            taste=taste, sessions_per_day=np.minimum(sessions_per_day, 48.0), chronotype_ms=chronotype_ms,
            scenario_cdf=np.cumsum(scenario_mix, axis=1),
            skip_tolerance=rng.normal(0.0, 0.5, U), like_bias=rng.normal(-2.6, 0.6, U),
            share_bias=rng.normal(-5.0, 0.6, U), playlist_bias=rng.normal(-3.6, 0.6, U),
            dislike_bias=rng.normal(-2.2, 0.5, U), stickiness=rng.normal(0.0, 0.8, U),
            library=np.full((U, L), -1, np.int64), library_count=np.zeros(U, np.int64),
            library_next=np.zeros(U, np.int64), session_genre_plays=np.zeros((U, G), np.int32),
            recent_artists=np.full((U, RECENT_ARTISTS), -1, np.int64), recent_next=np.zeros(U, np.int64),
            last_walk_ms=np.zeros(U, np.int64), library_ms=np.zeros((U, L), np.int64),
        )
        users._seed_libraries(config, catalog, rng)
        return users

    def _seed_libraries(self, config: SimConfig, catalog: Catalog, rng: np.random.Generator) -> None:
        """Start each library with popular back-catalog tracks that suit the user's taste."""
        k = config.initial_library
        released = np.flatnonzero(catalog.release_ts <= config.start_ts)
        if k == 0 or len(released) == 0:
            return
        weights = np.exp(config.library_popularity * catalog.popularity_z[released])
        pool = released[rng.choice(len(released), (self.n_users, 4 * k), p=weights / weights.sum())]
        fit = np.einsum("ud,ukd->uk", self.taste, catalog.latent[pool]) + rng.gumbel(0, 0.3, pool.shape)
        best = np.take_along_axis(pool, np.argsort(-fit, axis=1)[:, :k], axis=1)
        rows = np.arange(self.n_users)
        self.add_to_library(rows, best, np.ones(best.shape, bool), now_ms=-30 * DAY_MS)  # old favourites

    # ---- arrivals --------------------------------------------------------------------

    def session_starts(self, config: SimConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """All session start times (ms since start, sorted) and their users, drawn up front.

        A non-homogeneous Poisson process per user: a Poisson count over the horizon, then
        times by inverting the cumulative hour-of-day intensity, shifted by the chronotype.
        """
        horizon = config.horizon_ms
        counts = rng.poisson(self.sessions_per_day * config.days)
        users = np.repeat(np.arange(self.n_users), counts)
        first_hour = (config.start_ts // HOUR_MS) % 24
        n_hours = int(np.ceil(horizon / HOUR_MS))
        intensity = HOURLY_ACTIVITY[(first_hour + np.arange(n_hours)) % 24].copy()
        intensity[-1] *= (horizon - (n_hours - 1) * HOUR_MS) / HOUR_MS
        cumulative = np.concatenate([[0.0], np.cumsum(intensity)])
        target = rng.random(len(users)) * cumulative[-1]
        hour = np.clip(np.searchsorted(cumulative, target, side="right") - 1, 0, n_hours - 1)
        within = (target - cumulative[hour]) / np.maximum(intensity[hour], 1e-12)
        t = (hour + np.clip(within, 0, 1)) * HOUR_MS + self.chronotype_ms[users]
        t = np.mod(t, horizon).astype(np.int64)
        order = np.lexsort((users, t))
        return t[order], users[order]

    # ---- per-session choices (scalar; `u` is a uniform draw in [0, 1)) -------------------

    def begin_session(self, user: int, now_ms: int, config: SimConfig, rng: np.random.Generator) -> None:
        """Taste random walk for the time since the last session; fresh session fatigue."""
        elapsed_days = (now_ms - int(self.last_walk_ms[user])) / DAY_MS
        if config.taste_walk_per_day > 0 and elapsed_days > 0:  # math.sqrt: the same doubles as np.sqrt, on scalars
            step = rng.standard_normal(self.taste.shape[1]) * (config.taste_walk_per_day * math.sqrt(elapsed_days))
            row = self.taste[user] + step / math.sqrt(self.taste.shape[1])
            self.taste[user] = row / max(math.sqrt(row @ row), 1e-12)
        self.last_walk_ms[user] = now_ms
        self.session_genre_plays[user] = 0
        self.recent_artists[user] = -1
        if self.album_next is not None:
            self.album_next[user] = -1

    def draw_scenario(self, user: int, u: float) -> int:
        if self.scenario_rows is None:  # bisect on Python rows: np.searchsorted's answer, for less per call
            self.scenario_rows = self.scenario_cdf.tolist()
        cdf = self.scenario_rows[user]
        return min(bisect.bisect_right(cdf, u * cdf[-1]), len(SCENARIOS) - 1)

    def draw_query_genre(self, user: int, catalog: Catalog, u: float, sharpness: float = 6.0) -> int:
        """A search query's genre: mostly the genres closest to the user's current taste."""
        logits = sharpness * (catalog.genre_centroids @ self.taste[user])
        cdf = np.cumsum(np.exp(logits - logits.max()))
        return int(min(np.searchsorted(cdf, u * cdf[-1], side="right"), len(cdf) - 1))

    def draw_library_track(self, user: int, u: float) -> int:
        """A track from the user's library, or -1 when it is empty."""
        count = self.library_count[user]
        return int(self.library[user, int(u * count)]) if count else -1

    # ---- learning from what was consumed (vectorised over one row per user) ---------------

    def add_to_library(self, users: np.ndarray, tracks: np.ndarray, mask: np.ndarray,
                       now_ms: int | np.ndarray = 0) -> None:
        """Append the masked tracks of each row; `now_ms` (scalar or one per row) stamps them."""
        times = np.asarray(now_ms, np.int64)
        times = np.broadcast_to(times[:, None] if times.ndim else times, tracks.shape)
        _ring_append(self.library, self.library_next, users, tracks, mask, also=(self.library_ms, times))
        self.library_count[users] = np.minimum(self.library_count[users] + mask.sum(axis=1), self.library.shape[1])

    def note_plays(self, users: np.ndarray, artists: np.ndarray, genres: np.ndarray, played: np.ndarray) -> None:
        """Session fatigue state: same-genre counts and recent artists. `users` are unique."""
        R, G = len(users), self.session_genre_plays.shape[1]
        rows = np.broadcast_to(np.arange(R)[:, None], played.shape)
        counts = np.bincount((rows * G + genres)[played], minlength=R * G).reshape(R, G)
        self.session_genre_plays[users] += counts.astype(np.int32)
        _ring_append(self.recent_artists, self.recent_next, users, artists, played)

    def drift_toward(self, users: np.ndarray, latents: np.ndarray, weight: np.ndarray, rate: float) -> None:
        """Move taste toward consumed tracks: taste += rate * sum_k w_k (latent_k - taste)."""
        if rate == 0:
            return
        taste = self.taste[users]
        pull = np.einsum("rs,rsd->rd", weight, latents) - weight.sum(axis=1, keepdims=True) * taste
        self.taste[users] = unit_rows(taste + rate * pull)


def _ring_append(buffer: np.ndarray, next_slot: np.ndarray, users: np.ndarray, values: np.ndarray,
                 mask: np.ndarray, also: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Append the masked values of each row (in order) to that user's ring buffer.

    `users` must be unique. Only each row's last `capacity` values are kept, so no slot is
    written twice in one call. `also` = (buffer, values) is written at the same slots.
    """
    capacity = buffer.shape[1]
    rank = np.cumsum(mask, axis=1) - 1  # order of each kept value within its row
    count = mask.sum(axis=1)
    keep = mask & (rank >= (count - capacity)[:, None])
    rows, cols = np.nonzero(keep)
    slot = (next_slot[users][rows] + rank[rows, cols]) % capacity
    buffer[users[rows], slot] = values[rows, cols]
    if also is not None:  # a parallel buffer written at the same slots (library times)
        also[0][users[rows], slot] = also[1][rows, cols]
    next_slot[users] = (next_slot[users] + count) % capacity
