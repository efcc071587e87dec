"""Ground truth: the user model's own engagement probabilities, from current hidden state.

The simulator draws reactions from exactly these logits (`Oracle.logits`), so the oracle is
not an estimate: `expected_engagement` is the true P(full play | examined) of a user-track
pair right now, given the user's taste, the track's hidden position and popularity, the
scenario, the query or seed of the request, and the user's current session fatigue. It
leaves out only what depends on the rest of the slate (repeats within one slate) and the
position effect (examination), which belongs to the slate, not the track. That makes it
the reference for regret: rank candidates by it and no ranker can do better on average.

Model (per examined item; sigma is the logistic function):
    affinity   = taste_u . latent_i                       (cosine, unit vectors)
    context    = +1 / -1 if the track is / is not in the search query's genre,
                 latent_seed . latent_i for radio, 0 otherwise
    fatigue    = genre_fatigue * max(0, same-genre plays this session - free)
                 + artist_fatigue * (plays of this artist among the session's last 8)
                 (model 2 and 3: the first repeat of an artist is a bonus instead, and a recently
                 loved track adds familiarity; model 3: a track that continues an album in
                 order has -album_continuation instead of its artist terms)
    play logit = play_bias_s + taste_w_s (affinity - c) + pop_w_s popularity_z + ctx_w_s context - fatigue / 2
    full logit = full_bias_s + taste_w_s (affinity - c) + skip_tolerance_u + ctx_w_s context / 2 - fatigue
    P(full play | examined) = sigma(play logit) * sigma(full logit)
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit as sigmoid

from simulator.catalog import Catalog
from simulator.config import DAY_MS, SimConfig
from simulator.users import Users
from streaming.events import SCENARIOS

AFFINITY_CENTER = 0.25
FAMILIAR_SLOTS = 32  # model 2's familiarity looks at this many of the user's latest library additions  # affinity of a so-so match; logits are centred there


class Oracle:
    def __init__(self, config: SimConfig, catalog: Catalog, users: Users) -> None:
        self.config, self.catalog, self.users = config, catalog, users
        params = [config.scenario(name) for name in SCENARIOS]
        self.play_bias = np.array([p.play_bias for p in params])
        self.full_bias = np.array([p.full_bias for p in params]) + (config.full_play_shift if config.user_model >= 2 else 0.0)
        self.taste_weight = np.array([p.taste_weight for p in params])
        self.popularity_weight = np.array([p.popularity_weight for p in params])
        self.context_weight = np.array([p.context_weight for p in params])
        self._familiar_back: np.ndarray | None = None  # 1..FAMILIAR_SLOTS, built on first use
        # `rank` orders for the slate (model 3) or per item (models 1 and 2, and the reference
        # the tests compare the slate-aware order with).
        self.slate_aware = config.user_model == 3

    def affinity(self, user_ids: np.ndarray, track_latent: np.ndarray) -> np.ndarray:
        return np.einsum("...d,...d->...", self.users.taste[user_ids], track_latent)

    def session_fatigue(self, user_ids: np.ndarray, track_ids: np.ndarray,
                        continues: np.ndarray | None = None) -> np.ndarray:
        """Boredom from this session so far: same genre beyond a free allowance, same artist.

        Model 3: a track that continues an album in order (`continues`; by default the next
        track of the album in progress) has no artist fatigue but `album_continuation` off."""
        config, users = self.config, self.users
        same_genre = users.session_genre_plays[user_ids, self.catalog.genre_id[track_ids]]
        recent = users.recent_artists[user_ids]  # [..., 8]
        same_artist = (recent == self.catalog.artist_id[track_ids][..., None]).sum(axis=-1)
        genre_term = config.genre_fatigue * np.maximum(0, same_genre - config.genre_fatigue_free)
        if config.user_model == 1:
            return genre_term + config.artist_fatigue * same_artist
        # Model 2: one more track by an artist just played is welcome (continuation); more tire.
        artist_term = (config.artist_fatigue * np.maximum(0, same_artist - 1)
                       - config.artist_continuation * (same_artist == 1))
        if users.album_next is not None:  # model 3
            if continues is None:
                continues = track_ids == users.album_next[user_ids]
            artist_term = np.where(continues, -config.album_continuation, artist_term)
        return genre_term + artist_term

    def familiarity(self, user_ids: np.ndarray, track_ids: np.ndarray) -> np.ndarray:
        """exp(-days since the user loved the track / repeat_memory_days) over the user's last
        FAMILIAR_SLOTS library additions; 0 for other tracks.

        Model 2's repeat consumption: recently loved tracks are the likeliest to be played again
        (Anderson et al. 2014: recency is the strongest signal of re-consumption); a track loved
        FAMILIAR_SLOTS additions ago is days old for all but the heaviest listeners."""
        users = self.users
        capacity = users.library.shape[1]
        if self._familiar_back is None or len(self._familiar_back) != min(FAMILIAR_SLOTS, capacity):
            self._familiar_back = 1 + np.arange(min(FAMILIAR_SLOTS, capacity))  # slot next-1 is the newest
        # Slots and weights are gathered per user ([..., 1, F] in a slate), then every track is compared.
        rows = user_ids[..., None]
        slots = (users.library_next[rows] - self._familiar_back) % capacity
        age_days = (users.now_ms - users.library_ms[rows, slots]) / DAY_MS
        weight = np.exp(-np.maximum(age_days, 0.0) / self.config.repeat_memory_days)
        match = track_ids[..., None] == users.library[rows, slots]  # [..., F]
        return np.where(match, weight, 0.0).max(axis=-1)

    def context_match(self, track_ids: np.ndarray, track_latent: np.ndarray, query_genre: np.ndarray,
                      seed_track: np.ndarray) -> np.ndarray:
        """+-1 for the search query's genre, seed similarity for radio, 0 without context."""
        catalog = self.catalog
        in_query = np.where(catalog.genre_id[track_ids] == query_genre, 1.0, -1.0)
        seed_similarity = np.einsum("...d,...d->...", catalog.latent[np.maximum(seed_track, 0)], track_latent)
        return np.where(query_genre >= 0, in_query, 0.0) + np.where(seed_track >= 0, seed_similarity, 0.0)

    def logits(self, user_ids: np.ndarray, track_ids: np.ndarray, scenario_codes: np.ndarray,
               query_genre: np.ndarray, seed_track: np.ndarray, fatigue: np.ndarray,
               track_latent: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(play logit, full-play logit); all arguments broadcast together.

        `track_latent` (= catalog.latent[track_ids]) may be passed by a caller that has it."""
        s = scenario_codes
        latent = self.catalog.latent[track_ids] if track_latent is None else track_latent
        centred = self.taste_weight[s] * (self.affinity(user_ids, latent) - AFFINITY_CENTER)
        context = self.context_weight[s] * self.context_match(track_ids, latent, query_genre, seed_track)
        play = (self.play_bias[s] + centred + self.popularity_weight[s] * self.catalog.popularity_z[track_ids]
                + context - 0.5 * fatigue)
        full = self.full_bias[s] + centred + self.users.skip_tolerance[user_ids] + 0.5 * context - fatigue
        if self.config.user_model >= 2 and self.config.familiarity_weight > 0:
            bonus = self.config.familiarity_weight * self.familiarity(user_ids, track_ids)
            play, full = play + bonus, full + bonus
        return play, full

    def expected_engagement(self, user_ids, track_ids, scenario_codes, ts: int | np.ndarray | None = None,
                            query_genre=None, seed_track=None) -> np.ndarray:
        """True P(full play | examined) for each (user, track, scenario), broadcasting.

        `query_genre` / `seed_track` (-1 = none) add a search query or radio seed. With
        `ts`, tracks not yet released at that time get 0: nobody can play them.
        """
        user_ids, track_ids, scenario_codes = (np.asarray(a, dtype=np.int64)
                                               for a in (user_ids, track_ids, scenario_codes))
        self._check_ids(user_ids, track_ids, scenario_codes)
        query_genre = np.asarray(-1 if query_genre is None else query_genre, dtype=np.int64)
        seed_track = np.asarray(-1 if seed_track is None else seed_track, dtype=np.int64)
        if (seed_track >= self.catalog.n_tracks).any():
            raise ValueError(f"seed_track: ids must be < n_tracks={self.catalog.n_tracks}")
        fatigue = self.session_fatigue(user_ids, track_ids)
        play, full = self.logits(user_ids, track_ids, scenario_codes, query_genre, seed_track, fatigue)
        engagement = sigmoid(play) * sigmoid(full)
        if ts is not None:
            engagement = np.where(self.catalog.release_ts[track_ids] <= np.asarray(ts), engagement, 0.0)
        return engagement

    def rank(self, user_id: int, track_ids: np.ndarray, scenario_code: int, ts: int, query_genre: int = -1,
             seed_track: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(score, order) of one request's candidates: score is `expected_engagement`, order is
        best first. Models 1 and 2: by score. Model 3: the slate's positions are filled
        greedily, each with the candidate worth most given the within-slate fatigue the tracks
        above it are expected to cause (each weighted by P(examined) * P(play) at its position),
        and a track that continues the album of the one above has no artist fatigue: the order
        the simulated user is best served by, which a per-item ranking misses."""
        from ranker.interface import order_by_score

        track_ids = np.asarray(track_ids, dtype=np.int64)
        score = self.expected_engagement(user_id, track_ids, scenario_code, ts=ts, query_genre=query_genre,
                                         seed_track=seed_track)
        if not self.slate_aware or len(track_ids) < 2:
            return score.astype(np.float32), order_by_score(score.astype(np.float32))
        config, catalog = self.config, self.catalog
        params = config.scenario(SCENARIOS[scenario_code])
        user = np.int64(user_id)
        fatigue = self.session_fatigue(user, track_ids)
        play, full = self.logits(user, track_ids, np.int64(scenario_code), np.int64(query_genre),
                                 np.int64(seed_track), fatigue)
        p_play = sigmoid(play)
        genre, artist = catalog.genre_id[track_ids], catalog.artist_id[track_ids]
        before = self.users.session_genre_plays[user_id, genre]
        free = config.genre_fatigue_free
        same_genre, same_artist = np.zeros(len(track_ids)), np.zeros(len(track_ids))  # expected, above
        open_ = catalog.release_ts[track_ids] <= ts
        chosen, follows = [], np.zeros(len(track_ids), bool)
        for k in range(min(params.slate_size, int(open_.sum()))):
            extra_genre = np.maximum(0, before + same_genre - free) - np.maximum(0, before - free)
            artist_term = np.where(follows, 0.0, config.artist_fatigue * same_artist)
            value = np.where(open_, p_play * sigmoid(full - config.genre_fatigue * extra_genre - artist_term), -1.0)
            j = int(np.argmax(value))
            chosen.append(j)
            open_[j] = False
            reach = params.examine_first * params.examine_decay ** k * p_play[j]
            same_genre += reach * (genre == genre[j])
            same_artist += reach * (artist == artist[j])
            follows = track_ids == catalog.albums.next_track[track_ids[j]]
        score = score.astype(np.float32)
        rest = order_by_score(score)
        rest = rest[~np.isin(rest, chosen)]
        return score, np.concatenate([np.array(chosen, np.int64), rest])

    def _check_ids(self, user_ids: np.ndarray, track_ids: np.ndarray, scenario_codes: np.ndarray) -> None:
        for name, ids, bound in (("user_ids", user_ids, self.users.n_users),
                                 ("track_ids", track_ids, self.catalog.n_tracks),
                                 ("scenario_codes", scenario_codes, len(SCENARIOS))):
            if ids.size and (ids.min() < 0 or ids.max() >= bound):
                raise ValueError(f"{name}: ids must be in [0, {bound}), got [{ids.min()}, {ids.max()}]")
