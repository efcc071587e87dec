"""Simulator parameters: one frozen pydantic model, validated on construction.

Everything that shapes the simulated platform lives here, so a run is fully described by
its `SimConfig` (it is stored with every run). Errors name the field, e.g.
"n_users: Input should be greater than or equal to 1".

Behaviour differs by scenario (`ScenarioParams`): that difference is what ASTRO's per-scenario
attention temperature is meant to capture, so it must be strong enough to matter:
- home_feed: exploratory browsing; moderate examination decay, popularity helps.
- daily_mix: a personal mix; strong taste weight, long slates, people listen through.
- radio: lean-back; tracks auto-play (high examination, slow decay, almost all played),
  few skips, and similarity to the seed track matters.
- search: high intent; steep position decay and the query genre dominates.
- library: organic plays of the user's own tracks; no ranking call, almost no skips.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from streaming.events import SCENARIOS

DEFAULT_START_TS = int(datetime(2026, 1, 5, tzinfo=timezone.utc).timestamp() * 1000)  # a Monday
DAY_MS = 86_400_000
HOUR_MS = 3_600_000


USER_MODEL_ENV = "CLIMBER_SIM__USER_MODEL"
USER_MODEL_2_DATE = "2026-12-06"  # frozen configs dated before it ran user model 1
USER_MODEL_3_DATE = "2026-12-07"  # ... and from it user model 3 (on 2026-12-06 a config names 3 itself)
USER_MODELS = (1, 2, 3)
DEFAULT_USER_MODEL = 3  # since 2026-12-06 (model 2 before it that day): what a SimConfig gets unless told


def _default_user_model() -> int:
    value = os.environ.get(USER_MODEL_ENV, str(DEFAULT_USER_MODEL)).strip()
    if value not in ("1", "2", "3"):
        raise ValueError(f"{USER_MODEL_ENV}: expected 1, 2 or 3, got {value!r}")
    return int(value)


class ScenarioParams(BaseModel):
    """How users meet a slate in one scenario (logits are log-odds; see docs/simulator.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    slate_size: int = Field(10, ge=1, le=200)
    examine_first: float = Field(0.95, gt=0, le=1)  # P(examine position 0)
    examine_decay: float = Field(0.85, gt=0, le=1)  # P(examine k) = examine_first * decay**k
    play_bias: float = 0.0  # intercept of P(play | examined)
    full_bias: float = 0.0  # intercept of P(full play | played)
    taste_weight: float = Field(3.0, ge=0)  # weight of user-track affinity in both logits
    popularity_weight: float = Field(0.8, ge=0)  # weight of hidden popularity in the play logit
    context_weight: float = Field(0.0, ge=0)  # weight of the query genre / seed-track match
    continue_bias: float = 0.0  # intercept of P(ask for another slate)


DEFAULT_SCENARIO_PARAMS: dict[str, ScenarioParams] = {
    "home_feed": ScenarioParams(slate_size=10, examine_first=0.95, examine_decay=0.84, play_bias=-0.3,
                                full_bias=0.2, taste_weight=3.0, popularity_weight=1.3, continue_bias=0.6),
    "daily_mix": ScenarioParams(slate_size=15, examine_first=0.97, examine_decay=0.9, play_bias=0.4,
                                full_bias=0.5, taste_weight=3.5, popularity_weight=0.5, continue_bias=0.8),
    "radio": ScenarioParams(slate_size=10, examine_first=0.99, examine_decay=0.95, play_bias=2.5,
                            full_bias=0.8, taste_weight=2.0, popularity_weight=0.5, context_weight=2.0,
                            continue_bias=1.2),
    "search": ScenarioParams(slate_size=8, examine_first=0.98, examine_decay=0.7, play_bias=0.0,
                             full_bias=0.4, taste_weight=1.5, popularity_weight=1.3, context_weight=3.0,
                             continue_bias=-0.2),
    "library": ScenarioParams(slate_size=10, examine_first=0.99, examine_decay=0.9, play_bias=6.0,
                              full_bias=1.8, taste_weight=1.0, popularity_weight=0.0, continue_bias=0.4),
}


class SimConfig(BaseModel):
    """The whole simulated world. Defaults give a 2000-user, 20000-track, 7-day run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_users: int = Field(2000, ge=1, le=10_000_000)
    n_tracks: int = Field(20_000, ge=10, le=100_000_000)
    n_artists: int | None = Field(None, ge=1, description="default n_tracks // 10")
    n_genres: int = Field(20, ge=1, le=1000)
    latent_dim: int = Field(16, ge=2, le=512)
    days: float = Field(7.0, gt=0, le=366)
    seed: int = Field(42, ge=0)
    # Which user model: 3 (the default, DEFAULT_USER_MODEL) is model 2 plus albums played on in
    # order, a slate-aware oracle and the weekday lunch dip. 2 returns users by a satisfaction-driven
    # hazard with weekly cycle, daily profiles and churn; 1 is the model before it (session starts
    # drawn up front). Models 1 and 2 are kept so frozen configs measured on them still give their
    # event logs bit for bit. Pin one with CLIMBER_SIM__USER_MODEL=2 (or 1) in the environment: it
    # sets the default of every SimConfig, so `climber simulate|sandbox|bench sim|bench stream` and
    # `python -m simulator` all obey.
    user_model: Literal[1, 2, 3] = Field(default_factory=lambda: _default_user_model())
    start_ts: int = Field(DEFAULT_START_TS, ge=0, description="simulated epoch ms at the start")

    # Catalog
    new_release_fraction: float = Field(0.05, ge=0, le=0.9)
    popularity_zipf: float = Field(1.0, gt=0, le=3, description="Zipf exponent of artist popularity")
    track_popularity_sigma: float = Field(0.8, ge=0, description="lognormal spread of tracks within an artist")
    off_genre_fraction: float = Field(0.1, ge=0, le=1, description="tracks outside their artist's genre")
    artist_spread: float = Field(0.35, ge=0, description="artist offset from its genre centroid")
    track_spread: float = Field(0.25, ge=0, description="track offset from its artist")
    median_duration_s: float = Field(210.0, gt=10, le=3600)

    # Users
    sessions_per_day_median: float = Field(1.2, gt=0, le=100)
    sessions_per_day_sigma: float = Field(0.9, ge=0, le=3, description="lognormal spread of activity")
    chronotype_sigma_h: float = Field(1.5, ge=0, le=12, description="spread of users' daily-cycle shift")
    taste_concentration: float = Field(0.3, gt=0, description="Dirichlet concentration of genre taste")
    taste_walk_per_day: float = Field(0.05, ge=0, description="random-walk step of taste per sqrt(day)")
    taste_learning_rate: float = Field(0.02, ge=0, le=1, description="pull of a consumed track on taste")
    library_size: int = Field(200, ge=1, le=100_000, description="tracks a user's library keeps")
    initial_library: int = Field(30, ge=0, description="library tracks a user has at the start")
    library_popularity: float = Field(1.5, ge=0, description="how strongly popular tracks fill starting libraries")
    scenario_mix_concentration: float = Field(3.0, gt=0, description="how alike users' scenario mixes are")
    genre_fatigue: float = Field(0.12, ge=0, description="full-play logit lost per same-genre play in a session")
    genre_fatigue_free: int = Field(4, ge=0, description="same-genre plays in a session before fatigue")
    artist_fatigue: float = Field(0.7, ge=0, description="full-play logit lost per repeat of an artist")
    max_slates_per_session: int = Field(40, ge=1)
    full_play_shift: float = Field(-0.8, description="added to every full-play logit (user_model 2; skips to Lamere's share)")
    fast_skip_share: float = Field(0.5, gt=0, lt=1, description="skips within 5 s of the start (user_model 2)")
    skip_tail_s: float = Field(40.0, gt=0, description="mean play time of the other skips beyond 5 s (user_model 2)")

    # Tastes with structure (user_model 2; see simulator/tastes.py)
    n_interests: int = Field(3, ge=1, le=16, description="taste vectors per user; the session's context picks one")
    interest_hour_strength: float = Field(1.0, ge=0, description="how strongly the hour of day picks the interest")
    interest_scenario_sigma: float = Field(1.0, ge=0, description="spread of interests' log-weights per scenario")
    taste_shift_days: float = Field(60.0, gt=0, description="mean days between shifts of a user's interest")
    familiarity_weight: float = Field(0.6, ge=0, description="logit bonus for a track the user recently loved")
    repeat_memory_days: float = Field(3.0, gt=0, description="time constant of that bonus since the track was loved")
    artist_continuation: float = Field(0.5, ge=0, description="logit bonus for one more track by the artist just played")

    # Albums (user_model 3; see docs/simulator.md "Albums")
    album_size_median: float = Field(12.0, ge=1, description="median tracks on an album (published: about 12)")
    album_size_sigma: float = Field(0.25, ge=0, description="lognormal spread of album sizes")
    album_size_min: int = Field(7, ge=1, description="fewest tracks on an album; fewer left over make an EP or single")
    album_size_max: int = Field(18, ge=1, description="most tracks on an album")
    album_listen_share: float = Field(0.3, ge=0, le=1, description="P(a library slate puts on an album) (ours)")
    album_continue: float = Field(0.9, ge=0, le=1, description="P(an album listen goes on to the next track)")
    album_continuation: float = Field(0.5, ge=0, description="logit bonus for the next track of the album just played (ours)")

    # Returning and leaving (user_model 2; see docs/simulator.md "Return and leave")
    mood_memory_days: float = Field(4.0, gt=0, description="time constant of the satisfaction memory")
    mood_gain: float = Field(0.3, ge=0, le=1, description="weight of one session in the mood, right after another")
    mood_sensitivity: float = Field(1.5, ge=0, description="log session rate per unit of mood")
    satisfaction_reference: float = Field(0.3, description="satisfaction users expect at the start (mood is relative to it)")
    expectation_gain: float = Field(0.05, ge=0, le=1, description="per session, how fast expectation follows satisfaction")
    bad_session_below: float = Field(-0.5, description="a session with satisfaction below this is a bad one")
    dormancy_after: int = Field(3, ge=1, description="bad sessions in a row that make a user go dormant")
    dormancy_days: float = Field(6.0, gt=0, description="mean break of a dormant user")
    churn_probability: float = Field(0.25, ge=0, le=1, description="P(a user going dormant never comes back)")
    profile_shift_sigma_h: float = Field(0.75, ge=0, le=12, description="spread of users' daily-profile shift")
    weekend_activity: float = Field(0.8, gt=0, description="weekend session rate over weekday rate")
    weekday_lunch_dip: float = Field(0.3, ge=0, lt=1, description="user_model 3: share of weekday 12-13 h "
                                     "sessions early birds and working-hours listeners skip for lunch")

    # Platform
    # The ranking tick: requests queue at most this long, and each slate is requested this
    # long before it is shown (prefetch), so users never wait. See platform.py.
    batch_window_ms: int = Field(120_000, ge=1, description="ranking tick and prefetch lead, simulated ms")
    scenario_params: dict[str, ScenarioParams] = Field(default_factory=lambda: dict(DEFAULT_SCENARIO_PARAMS))
    scenario_switch: float = Field(0.3, ge=0, le=1, description="P(next slate of a session is another scenario)")

    @field_validator("user_model", mode="before")
    @classmethod
    def _user_model_from_text(cls, value):
        """`CLIMBER_SIM__USER_MODEL=1` reaches a nested SimConfig (SandboxSettings) as the text
        "1", which a Literal[1, 2, 3] would refuse."""
        if isinstance(value, str) and value.strip() in {str(model) for model in USER_MODELS}:
            return int(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> "SimConfig":
        unknown = set(self.scenario_params) - set(SCENARIOS)
        if unknown:
            raise ValueError(f"scenario_params: unknown scenario(s) {sorted(unknown)}; known: {list(SCENARIOS)}")
        if self.n_artists is not None and self.n_artists > self.n_tracks:
            raise ValueError(f"n_artists: {self.n_artists} artists cannot exceed n_tracks={self.n_tracks}")
        if self.album_size_min > self.album_size_max:
            raise ValueError(f"album_size_min: {self.album_size_min} exceeds album_size_max={self.album_size_max}")
        if self.initial_library > self.library_size:
            raise ValueError(f"initial_library: {self.initial_library} exceeds library_size={self.library_size}")
        return self

    @property
    def artists(self) -> int:
        return self.n_artists if self.n_artists is not None else max(1, self.n_tracks // 10)

    @property
    def horizon_ms(self) -> int:
        return int(round(self.days * DAY_MS))

    @property
    def end_ts(self) -> int:
        return self.start_ts + self.horizon_ms

    def scenario(self, name: str) -> ScenarioParams:
        """Parameters of one scenario; defaults fill scenarios the config leaves out."""
        return self.scenario_params.get(name) or DEFAULT_SCENARIO_PARAMS[name]
