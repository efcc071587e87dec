"""Tastes with structure (user model 2): several interests, chosen by context, that drift and shift.

Each user holds `n_interests` taste vectors, each a Dirichlet mixture of genre centroids plus a
personal offset as in model 1, with a weight, an hour of day it is most likely and a log-weight
per scenario. At each session start the active interest is drawn with

    P(k) proportional to weight_k * exp(interest_hour_strength * cos(2 pi (hour - hour_k) / 24)
                                      + scenario_k[scenario])

and becomes `users.taste`, which everything else reads (oracle, drift, queries); the interest
left behind keeps what the last session taught it. Why: listening depends on context and time
of day (Hansen et al. 2020, contextual user embeddings at Spotify), and users have several
distinct interests (Li et al. 2019, multi-interest retrieval), so a ranker that reads the hour,
the scenario and a long history can tell which interest is on; a short history sees one.

Slow drift is model 1's random walk and pull toward consumed tracks, on the active interest.
Occasional shifts: at a session start, with P = 1 - exp(-days since the last session /
taste_shift_days), the chosen interest is replaced by a fresh one (tastes change over months
and years, Moore et al. 2013, "Taste over time", Last.fm).
"""

from __future__ import annotations

import math

import numpy as np

from simulator.catalog import Catalog, unit_rows
from simulator.config import DAY_MS, HOUR_MS, SimConfig
from streaming.events import SCENARIOS


def fresh_interest(config: SimConfig, catalog: Catalog, rng: np.random.Generator, n: int) -> np.ndarray:
    """n taste vectors as model 1 draws them: a sparse genre mixture plus a personal offset."""
    d = config.latent_dim
    mix = rng.dirichlet(np.full(config.n_genres, config.taste_concentration), n)
    return unit_rows(mix @ catalog.genre_centroids + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d))


def generate_interests(users, config: SimConfig, catalog: Catalog, rng: np.random.Generator) -> None:
    """Give every user `n_interests` interests; the first is the model-1 taste they already have."""
    U, K = users.n_users, config.n_interests
    interests = np.empty((U, K, config.latent_dim))
    interests[:, 0] = users.taste
    if K > 1:
        # Later interests stay near the first one in genre space half the time: people's
        # interests are related more often than not.
        others = fresh_interest(config, catalog, rng, U * (K - 1)).reshape(U, K - 1, -1)
        related = rng.random((U, K - 1, 1)) < 0.5
        interests[:, 1:] = unit_rows(np.where(related, others + 1.5 * users.taste[:, None], others))
    users.interests = interests
    users.interest_weight = rng.dirichlet(np.full(K, 2.0), U)
    users.interest_hour = rng.random((U, K)) * 24
    users.interest_scenario = config.interest_scenario_sigma * rng.standard_normal((U, K, len(SCENARIOS)))
    users.active_interest = np.zeros(U, np.int64)
    users.interest_rows = [list(zip(w, h, s)) for w, h, s in zip(
        users.interest_weight.tolist(), users.interest_hour.tolist(), users.interest_scenario.tolist())]


def choose_interest(users, user: int, scenario: int, now_ms: int, elapsed_days: float, config: SimConfig,
                    catalog: Catalog, rng: np.random.Generator, uniform) -> None:
    """Store the active interest, draw the session's interest from context, maybe shift it."""
    active = int(users.active_interest[user])
    users.interests[user, active] = users.taste[user]
    hour = ((config.start_ts + now_ms) % DAY_MS) / HOUR_MS
    strength = config.interest_hour_strength
    weights = [w * math.exp(strength * math.cos(2 * math.pi * (hour - h) / 24) + s[scenario])  # Python scalars
               for w, h, s in users.interest_rows[user]]
    draw, k = uniform() * sum(weights), 0
    while k < len(weights) - 1 and draw >= weights[k]:
        draw -= weights[k]
        k += 1
    shifted = uniform() < 1.0 - math.exp(-max(elapsed_days, 0.0) / config.taste_shift_days)
    if shifted:
        users.interests[user, k] = fresh_interest(config, catalog, rng, 1)[0]
        users.taste_shifts += 1
    if shifted or k != active:
        users.active_interest[user] = k
        users.taste[user] = users.interests[user, k]
