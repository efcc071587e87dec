"""The catalog: tracks with public metadata and hidden taste-space positions and popularity.

Hidden structure (what a good ranker has to discover from behaviour):
- latent vector = genre centroid + artist offset + track noise, normalised to unit length,
  so user-track affinity is a cosine in [-1, 1];
- popularity: Zipf over artists (exponent `popularity_zipf`) times a lognormal track
  factor, kept as a standardised log popularity `popularity_z`. It raises the chance a
  listener plays a track (familiarity), which gives the long tail of plays.

Public metadata (`metadata()`) is only artist, genre, duration and release time (and, in user
model 3, each track's album and track number: albums.py). A share
`new_release_fraction` of tracks is released during the simulated days; the rest came out
in the ten years before the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.interface import TrackMetadata
from simulator.albums import ALBUM_RNG_KEY, Albums
from simulator.config import DAY_MS, SimConfig

BACK_CATALOG_DAYS = 3650


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class Catalog:
    artist_id: np.ndarray  # int64 [T]
    genre_id: np.ndarray  # int64 [T]
    duration_ms: np.ndarray  # int64 [T]
    release_ts: np.ndarray  # int64 [T]
    latent: np.ndarray  # float64 [T, d], unit rows (hidden)
    popularity_z: np.ndarray  # float64 [T], standardised log popularity (hidden)
    genre_centroids: np.ndarray  # float64 [G, d], unit rows (hidden)
    albums: Albums | None = None  # user model 3

    @property
    def n_tracks(self) -> int:
        return len(self.artist_id)

    def metadata(self) -> TrackMetadata:
        """The public part: what any recommender may know."""
        albums = self.albums
        return TrackMetadata(artist_id=self.artist_id, genre_id=self.genre_id,
                             duration_ms=self.duration_ms, release_ts=self.release_ts,
                             album_id=None if albums is None else albums.album_id,
                             album_track=None if albums is None else albums.track_number)

    @classmethod
    def generate(cls, config: SimConfig, rng: np.random.Generator) -> "Catalog":
        T, A, G, d = config.n_tracks, config.artists, config.n_genres, config.latent_dim
        centroids = unit_rows(rng.standard_normal((G, d)))

        artist_genre = rng.integers(0, G, A)
        artist_latent = centroids[artist_genre] + config.artist_spread * rng.standard_normal((A, d)) / np.sqrt(d)
        artist_rank = rng.permutation(A) + 1
        artist_log_pop = -config.popularity_zipf * np.log(artist_rank)

        # Every artist has at least one track; popular artists tend to have more.
        extra = rng.choice(A, T - A, p=_softmax(0.5 * artist_log_pop)) if T > A else np.zeros(0, np.int64)
        artist_id = rng.permutation(np.concatenate([np.arange(A), extra])).astype(np.int64)

        genre_id = artist_genre[artist_id].astype(np.int64)
        latent = artist_latent[artist_id] + config.track_spread * rng.standard_normal((T, d)) / np.sqrt(d)
        off_genre = rng.random(T) < config.off_genre_fraction
        if G > 1 and off_genre.any():
            other = (genre_id[off_genre] + rng.integers(1, G, off_genre.sum())) % G
            genre_id[off_genre] = other
            latent[off_genre] = 0.5 * latent[off_genre] + 0.5 * centroids[other]
        latent = unit_rows(latent)

        log_pop = artist_log_pop[artist_id] + config.track_popularity_sigma * rng.standard_normal(T)
        popularity_z = (log_pop - log_pop.mean()) / max(log_pop.std(), 1e-9)

        duration_s = config.median_duration_s * np.exp(0.3 * rng.standard_normal(T))
        duration_ms = (np.clip(duration_s, 45, 900) * 1000).astype(np.int64)

        is_new = rng.random(T) < config.new_release_fraction
        back_catalog = config.start_ts - (rng.random(T) * BACK_CATALOG_DAYS * DAY_MS).astype(np.int64)
        fresh = config.start_ts + (rng.random(T) * config.horizon_ms).astype(np.int64)
        release_ts = np.where(is_new, fresh, np.maximum(back_catalog, 0)).astype(np.int64)

        albums = None
        if config.user_model == 3:  # its own generator: the catalogue above and every later draw are model 2's
            albums = Albums.generate(artist_id, release_ts, config.start_ts, config,
                                     np.random.default_rng((config.seed, ALBUM_RNG_KEY)))
        return cls(artist_id=artist_id, genre_id=genre_id, duration_ms=duration_ms, release_ts=release_ts,
                   latent=latent, popularity_z=popularity_z, genre_centroids=centroids, albums=albums)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()
