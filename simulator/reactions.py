"""How listeners react to slates: all slates of one batch at once, as [rows, positions] arrays.

Per shown item, in order of position (a row is one slate of one user):
1. examined with P = examine_first_s * examine_decay_s ** position (position bias);
2. played with P = sigma(play logit) (oracle.py); radio and library almost always play;
3. played to the end (full_play) with P = sigma(full logit - within-slate fatigue), else
   skipped after a few seconds to about half the track;
4. after a full play: like, share, add_to_playlist; after a skip: dislike. Their logits
   are the user's own bias plus 0.6 * the full-play logit, so good matches earn them.

Within-slate fatigue counts the same genre and artist among earlier *played* items of the
slate (play decisions are drawn first, so this needs no loop over positions). The user
listens through the slate: each played track takes its play_ms plus a 1 s gap, each
examined-but-passed one 3 s, so event timestamps grow along the slate and the slate's
length in time is what the session waits before it asks for more.

Whether the session goes on is drawn from the slate's satisfaction (full plays, likes and
playlists up; skips and dislikes down), the user's stickiness, the scenario and how many
slates the session already had.

Then user state learns from the slate: taste moves toward fully played and liked tracks,
those tracks join the library, and session fatigue counts the plays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.catalog import Catalog
from simulator.config import SimConfig
from simulator.oracle import Oracle, sigmoid
from simulator.users import Users
from streaming.events import BEHAVIOUR_CODE, SCENARIOS

FIRST_DELAY_MS = 2_000  # from a slate appearing to the first play
GAP_MS = 1_000  # between two played tracks
BROWSE_MS = 3_000  # looking at an item and passing it by
SIGNAL_SLOPE = 0.6  # how strongly like/share/playlist/dislike follow the full-play logit
# Satisfaction per examined item: full plays, likes, shares, playlist adds, skips, dislikes.
SATISFACTION_WEIGHTS = np.array([1.0, 1.0, 1.0, 0.5, -0.7, -2.0])

# Event columns held while events wait to be emitted (all int64, one row per event).
EVENT_COLUMNS = ("ts", "user_id", "track_id", "scenario", "behaviour", "request_id", "position", "play_ms")
_KIND_BEHAVIOURS = ("impression", "play", "end", "like", "share", "add_to_playlist", "dislike")
_KIND_CODES = np.array([BEHAVIOUR_CODE.get(k, -1) for k in _KIND_BEHAVIOURS], dtype=np.int64)  # "end": -1, set per row
_END_KIND = _KIND_BEHAVIOURS.index("end")


@dataclass
class Slates:
    """One batch of slates to react to. Rows are distinct users (a user is in one session)."""

    users: np.ndarray  # int64 [R]
    scenario: np.ndarray  # int64 [R] codes
    query_genre: np.ndarray  # int64 [R], -1 = none
    seed_track: np.ndarray  # int64 [R], -1 = none
    request_id: np.ndarray  # int64 [R], -1 = organic (library)
    shown_at: np.ndarray  # int64 [R], simulated epoch ms the slate appears
    slate_index: np.ndarray  # int64 [R], 0 for a session's first slate
    tracks: np.ndarray  # int64 [R, S], padded with 0 where ~mask
    mask: np.ndarray  # bool [R, S]


@dataclass
class SlateOutcome:
    events: np.ndarray  # int64 [N, len(EVENT_COLUMNS)], in (row, position, kind) order
    duration_ms: np.ndarray  # int64 [R], time the user spends on the slate
    keep_going: np.ndarray  # bool [R], whether the session asks for another slate
    satisfied: np.ndarray  # float64 [R], the slate's satisfaction sum (SATISFACTION_WEIGHTS . counts)
    examined: np.ndarray  # int64 [R], items the user looked at
    engagement: np.ndarray | None  # float64 [R, S], the oracle's P(full play | examined) when shown, if recorded


class ReactionModel:
    def __init__(self, config: SimConfig, catalog: Catalog, users: Users, oracle: Oracle) -> None:
        self.config, self.catalog, self.users, self.oracle = config, catalog, users, oracle
        params = [config.scenario(name) for name in SCENARIOS]
        longest = max(p.slate_size for p in params)
        # P(examine position k) per scenario: examine_first * examine_decay ** k
        self.examine = np.array([p.examine_first * p.examine_decay ** np.arange(longest) for p in params])
        self.continue_bias = np.array([p.continue_bias for p in params])
        self.signal_biases = np.stack([users.like_bias, users.share_bias, users.playlist_bias, users.dislike_bias])
        self.signal_slopes = np.array([SIGNAL_SLOPE, SIGNAL_SLOPE, SIGNAL_SLOPE, -SIGNAL_SLOPE])[:, None, None]
        self._earlier_cache: dict[int, np.ndarray] = {}
        self.record_engagement = False  # set by the platform when an oracle_sink wants it

    def react(self, slates: Slates, rng: np.random.Generator) -> SlateOutcome:
        config, catalog, users = self.config, self.catalog, self.users
        tracks, mask = slates.tracks, slates.mask
        R, S = tracks.shape
        u = slates.users[:, None]
        s = slates.scenario[:, None]
        draws = rng.random((8, R, S))

        latent = catalog.latent[tracks]
        continues = self._album_continues(slates) if catalog.albums is not None else None
        session_fatigue = self.oracle.session_fatigue(u, tracks, continues)
        play_logit, full_logit = self.oracle.logits(u, tracks, s, slates.query_genre[:, None],
                                                    slates.seed_track[:, None], session_fatigue, latent)
        examined = mask & (draws[0] < self.examine[slates.scenario, :S])
        p_play = sigmoid(play_logit)
        played = examined & (draws[1] < p_play)

        genre, artist = catalog.genre_id[tracks], catalog.artist_id[tracks]
        # The oracle's expected_engagement at show time, when someone keeps it (platform.oracle_sink).
        # Model 3 adds the within-slate fatigue the user meets, expected over the earlier positions'
        # examination and play (draws the oracle cannot know): a slate-aware ceiling.
        engagement = None
        if self.record_engagement:
            expected_fatigue = 0.0
            if catalog.albums is not None:
                reached = np.where(mask, self.examine[slates.scenario, :S] * p_play, 0.0)
                expected_fatigue = self._slate_fatigue(u, genre, artist, reached, continues)
            engagement = p_play * sigmoid(full_logit - expected_fatigue)
        full_logit = full_logit - self._slate_fatigue(u, genre, artist, played, continues)
        full = played & (draws[2] < sigmoid(full_logit))
        skip = played & ~full
        biases = self.signal_biases[:, slates.users, None]  # [4, R, 1]: like, share, playlist, dislike
        signal = draws[3:7] < sigmoid(biases + self.signal_slopes * full_logit)
        like, share, playlist = full & signal[0], full & signal[1], full & signal[2]
        dislike = skip & signal[3]

        duration = catalog.duration_ms[tracks]
        skip_ms = self._skip_ms(duration, draws[7])
        play_ms = np.where(full, duration, np.where(skip, skip_ms, 0))
        step = np.where(played, play_ms + GAP_MS, np.where(examined, BROWSE_MS, 0))
        ends_after = np.cumsum(step, axis=1)
        start = slates.shown_at[:, None] + FIRST_DELAY_MS + ends_after - step
        duration_ms = FIRST_DELAY_MS + ends_after[:, -1]

        counts = np.stack([full, like, share, playlist, skip, dislike]).sum(axis=2)  # [6, R]
        n_examined = examined.sum(1)
        satisfied = SATISFACTION_WEIGHTS @ counts
        satisfaction = satisfied / np.maximum(n_examined, 1)
        continue_logit = (self.continue_bias[slates.scenario] + users.stickiness[slates.users]
                          + 2.0 * satisfaction - 0.1 * slates.slate_index)
        keep_going = rng.random(R) < sigmoid(continue_logit)
        keep_going &= slates.slate_index + 1 < config.max_slates_per_session

        organic = slates.request_id < 0
        end = start + play_ms
        events = self._events(slates, organic, start, end, play_ms,
                              (mask & ~organic[:, None], played, played, like, share, playlist, dislike), full)
        self._learn(slates, organic, latent, played, full, like, playlist, genre, artist)
        return SlateOutcome(events=events, duration_ms=duration_ms.astype(np.int64), keep_going=keep_going,
                            satisfied=satisfied, examined=n_examined, engagement=engagement)

    def _skip_ms(self, duration: np.ndarray, u: np.ndarray) -> np.ndarray:
        """How long a skipped track played. Model 1: 2 s to ~60% of the track. Model 2: Lamere's
        shape, half of skips within 5 s of the start and the rest spread out with a mean of
        `skip_tail_s` more, so ~3/4 of skips come within 30 s (24.1% of plays within 5 s,
        35.1% within 30 s, 48.6% before the end)."""
        if self.config.user_model == 1:
            return np.minimum(duration - 1_000, 2_000 + (u ** 2 * 0.6 * duration).astype(np.int64))
        fast = self.config.fast_skip_share
        early = 1_000 + (u / fast * 4_000)  # uniform 1-5 s for u < fast
        tail = 5_000 - np.log(np.maximum(1.0 - (u - fast) / (1.0 - fast), 1e-12)) * (self.config.skip_tail_s * 1000)
        return np.minimum(duration - 1_000, np.where(u < fast, early, tail).astype(np.int64))

    def _album_continues(self, slates: Slates) -> np.ndarray:
        """Model 3: [R, S] True where a track continues an album in order: the next track of the
        session's album in progress, or the next track after its neighbour above in the slate."""
        tracks = slates.tracks
        continues = tracks == self.users.album_next[slates.users][:, None]
        continues[:, 1:] |= self.catalog.albums.next_track[tracks[:, :-1]] == tracks[:, 1:]
        return continues & slates.mask

    def _slate_fatigue(self, u: np.ndarray, genre: np.ndarray, artist: np.ndarray, played: np.ndarray,
                       continues: np.ndarray | None = None) -> np.ndarray:
        """Extra full-play fatigue from same-genre / same-artist plays earlier in this slate
        (model 3: none from the artist for a track that continues an album in order). `played`
        is bool (what happened) or float (P(played), for the expected fatigue)."""
        config = self.config
        earlier = self._earlier(genre.shape[1])
        # [R, k, j]: j is an earlier played position (or, for floats, how likely it was played)
        combine = np.logical_and if played.dtype == bool else np.multiply
        prior = combine(played[:, None, :], earlier)
        same_genre = combine(genre[:, :, None] == genre[:, None, :], prior).sum(-1)
        same_artist = combine(artist[:, :, None] == artist[:, None, :], prior).sum(-1)
        before = self.users.session_genre_plays[u, genre]
        free = config.genre_fatigue_free
        extra_genre = np.maximum(0, before + same_genre - free) - np.maximum(0, before - free)
        if continues is not None:
            same_artist = np.where(continues, 0, same_artist)
        return config.genre_fatigue * extra_genre + config.artist_fatigue * same_artist

    def _earlier(self, S: int) -> np.ndarray:
        if S not in self._earlier_cache:
            self._earlier_cache[S] = np.tri(S, S, -1, dtype=bool)
        return self._earlier_cache[S]

    @staticmethod
    def _events(slates: Slates, organic: np.ndarray, start: np.ndarray, end: np.ndarray, play_ms: np.ndarray,
                happened: tuple[np.ndarray, ...], full: np.ndarray) -> np.ndarray:
        """Event rows for everything that happened, ordered by (row, position, kind)."""
        R, S = start.shape
        valid = np.stack(happened, axis=-1)  # [R, S, kinds]
        rows, positions, kinds = np.nonzero(valid)
        behaviour = _KIND_CODES[kinds]
        is_end = kinds == _END_KIND
        behaviour[is_end] = np.where(full[rows[is_end], positions[is_end]],
                                     BEHAVIOUR_CODE["full_play"], BEHAVIOUR_CODE["skip"])
        ts = np.where(kinds == 0, slates.shown_at[rows],
                      np.where(kinds == 1, start[rows, positions], end[rows, positions]))
        out = np.empty((len(rows), len(EVENT_COLUMNS)), np.int64)
        out[:, 0] = ts
        out[:, 1] = slates.users[rows]
        out[:, 2] = slates.tracks[rows, positions]
        out[:, 3] = slates.scenario[rows]
        out[:, 4] = behaviour
        out[:, 5] = slates.request_id[rows]
        out[:, 6] = np.where(organic[rows], -1, positions)
        out[:, 7] = np.where(is_end, play_ms[rows, positions], 0)
        return out

    def _learn(self, slates: Slates, organic: np.ndarray, latent: np.ndarray, played: np.ndarray, full: np.ndarray,
               like: np.ndarray, playlist: np.ndarray, genre: np.ndarray, artist: np.ndarray) -> None:
        users, tracks = self.users, slates.tracks
        consumed = (full | like).astype(np.float64) + 0.5 * playlist
        users.drift_toward(slates.users, latent, consumed, self.config.taste_learning_rate)
        keep = (full | like | playlist) & ~organic[:, None]
        users.add_to_library(slates.users, tracks, keep, slates.shown_at - self.config.start_ts)
        users.note_plays(slates.users, artist, genre, played)
        if users.album_next is not None:  # model 3: the album in progress, from the slate's last play
            last = played.shape[1] - 1 - np.argmax(played[:, ::-1], axis=1)
            rows = np.flatnonzero(played.any(axis=1))
            track, finished = tracks[rows, last[rows]], full[rows, last[rows]]
            users.album_next[slates.users[rows]] = np.where(finished, self.catalog.albums.next_track[track], -1)
