"""When listeners come back, and when they stop: a satisfaction-driven hazard (user model 2).

Each user's session starts are a non-homogeneous Poisson process with intensity

    lambda_u(t) = base_u * exp(mood_sensitivity * mood_u(t)) * profile_{p_u}(t - shift_u) * week(t)

- `base_u`: sessions per day at neutral mood (lognormal over users: many light listeners);
- `profile_p`: one of four daily profiles, early birds, working-hours listeners, evening
  listeners and night owls, in roughly equal shares (Louail & Barthelemy 2017 classify the
  users of a streaming log into these four groups of similar sizes), each shifted per user
  by a small `shift_u`; weekend days use a later, flatter version of each profile and the
  weekly factor `weekend_activity` (Zhang et al. 2013 find weekday and weekend shapes differ;
  the factor and the later start are our choice); user model 3 adds the weekday lunch dip
  Zhang et al. report (session arrivals drop over the lunch break on weekdays and rise again
  after it; gone at weekends): early birds and working-hours listeners, the two groups whose
  weekday is a working day, start `weekday_lunch_dip` fewer sessions from 12:00 to 13:00;
- `mood_u`: a fading average of satisfaction. At the end of each session
  mood <- k * mood + (1 - k) * (satisfaction - expectation), k = (1 - mood_gain) exp(-dt / mood_memory_days),
  with dt the time since the last update; expectation starts at `satisfaction_reference` and
  follows the user's own sessions slowly (`expectation_gain` per session: people get used to
  a service, so a steady policy settles instead of spiralling up or down), where satisfaction is the session's (full plays + likes + shares + playlists/2
  - 0.7 skips - 2 dislikes) per examined item. Between sessions mood decays toward 0, so a
  bad week is forgotten over a few `mood_memory_days`. A ranker that satisfies brings its
  users back sooner; one that does not makes them come back later (KuaiSim's retention
  module plays the same role);
- leaving: `dormancy_after` bad sessions in a row (satisfaction below `bad_session_below`)
  make the user go dormant: with P `churn_probability` for good, else for an exponential
  break of mean `dormancy_days`.

The next start is drawn by inverting the cumulative intensity (profile times week, hourly
steps) at the current rate; since mood decays, a draw more than a day ahead is redrawn from
a day later with the decayed mood (exact for a rate held a day at a time, by the Poisson
process's lack of memory). All draws come from the platform's scalar uniform stream.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable

import numpy as np

from simulator.config import DAY_MS, HOUR_MS, SimConfig

# Relative session starts by local hour, per profile (each row's mean is 1 after normalising).
DAILY_PROFILES = {
    "early_bird": [0.1, 0.05, 0.03, 0.03, 0.06, 0.25, 0.9, 1.8, 2.0, 1.9, 1.5, 1.2,
                   1.1, 1.0, 0.9, 0.9, 1.0, 1.2, 1.3, 1.1, 0.8, 0.5, 0.3, 0.15],
    "working_hours": [0.1, 0.05, 0.03, 0.03, 0.05, 0.15, 0.5, 1.3, 1.9, 1.9, 1.6, 1.4,
                      1.4, 1.6, 1.7, 1.6, 1.5, 1.4, 1.0, 0.7, 0.5, 0.4, 0.3, 0.2],
    "evening": [0.3, 0.15, 0.08, 0.05, 0.05, 0.08, 0.2, 0.5, 0.7, 0.6, 0.5, 0.5,
                0.6, 0.6, 0.6, 0.7, 0.9, 1.4, 2.1, 2.3, 2.2, 1.9, 1.4, 0.8],
    "night_owl": [1.6, 1.3, 0.9, 0.5, 0.3, 0.15, 0.1, 0.2, 0.4, 0.5, 0.5, 0.6,
                  0.7, 0.7, 0.7, 0.8, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9, 2.0, 1.9],
}
PROFILE_NAMES = tuple(DAILY_PROFILES)
PROFILE_SHARES = np.array([0.25, 0.25, 0.25, 0.25])
# Leisure curve blended into weekend profiles: a late start and a long afternoon and evening.
WEEKEND_LEISURE = np.array([0.4, 0.25, 0.15, 0.1, 0.08, 0.08, 0.1, 0.2, 0.4, 0.7, 1.0, 1.2,
                            1.3, 1.3, 1.3, 1.3, 1.3, 1.4, 1.5, 1.6, 1.6, 1.5, 1.2, 0.8])
MARGIN_HOURS = 48  # the intensity grid reaches this far before the start and after the end
LUNCH_HOUR = 12  # the weekday lunch dip (user model 3) falls in 12:00-13:00
AT_WORK_ON_WEEKDAYS = ("early_bird", "working_hours")  # the profiles the lunch break reaches


def _unit_mean(x: np.ndarray) -> np.ndarray:
    return x / x.mean(axis=-1, keepdims=True)


def weekday_profiles(lunch_dip: float = 0.0) -> np.ndarray:
    """[profile, hour] relative intensity on a weekday (mean 1 per row). `lunch_dip` > 0 (user
    model 3): the profiles at work on weekdays lose that share of their 12:00-13:00 sessions."""
    profiles = np.array(list(DAILY_PROFILES.values()), dtype=np.float64)
    if lunch_dip > 0:  # models 1 and 2 never come here: their grid stays bit for bit
        at_work = [PROFILE_NAMES.index(name) for name in AT_WORK_ON_WEEKDAYS]
        profiles[at_work, LUNCH_HOUR] *= 1.0 - lunch_dip
    return _unit_mean(profiles)


def weekend_profiles() -> np.ndarray:
    """[profile, hour] on a weekend day: the weekday profile an hour later, blended with leisure
    (no lunch dip: the source sees it on weekdays only)."""
    return _unit_mean(0.6 * np.roll(weekday_profiles(), 1, axis=1) + 0.4 * _unit_mean(WEEKEND_LEISURE))


class ReturnModel:
    """Per-user return state and the draw of each next session start (simulated ms since start)."""

    def __init__(self, config: SimConfig, sessions_per_day: np.ndarray, rng: np.random.Generator) -> None:
        U = len(sessions_per_day)
        self.config = config
        self.base_rate = sessions_per_day  # per day at neutral mood
        self.profile = rng.choice(len(PROFILE_NAMES), U, p=PROFILE_SHARES)
        self.shift_ms = (config.profile_shift_sigma_h * HOUR_MS * rng.standard_normal(U)).astype(np.int64)
        self.mood = np.zeros(U)
        self.expectation = np.full(U, config.satisfaction_reference)  # what the user has come to expect
        self.mood_ms = np.zeros(U, np.int64)  # when mood was last updated
        self.bad_run = np.zeros(U, np.int64)
        self.churned = np.zeros(U, bool)
        self.dormant_spells = 0
        # The fixed per-user values as Python scalars for the draws below (numpy scalars cost more).
        self._base_rate_rows = np.asarray(self.base_rate, np.float64).tolist()
        self._profile_rows = self.profile.tolist()
        self._shift_rows = self.shift_ms.tolist()
        self._build_grid()

    def _build_grid(self) -> None:
        """Cumulative intensity per profile on an hourly grid, in days of average activity."""
        config = self.config
        n_hours = int(np.ceil(config.horizon_ms / HOUR_MS)) + 2 * MARGIN_HOURS
        hour_ts = config.start_ts + (np.arange(n_hours) - MARGIN_HOURS) * HOUR_MS
        hour_of_day = (hour_ts // HOUR_MS) % 24
        weekday = (hour_ts // DAY_MS + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
        weekend = weekday >= 5
        week = np.where(weekend, config.weekend_activity, 1.0)
        week = week / (5 + 2 * config.weekend_activity) * 7  # a week holds 7 average days
        lunch_dip = config.weekday_lunch_dip if config.user_model >= 3 else 0.0
        profiles = np.where(weekend[None, :], weekend_profiles()[:, hour_of_day],
                            weekday_profiles(lunch_dip)[:, hour_of_day])
        self.intensity = profiles * week[None, :] / 24  # [P, H] average days per hour
        self.cumulative = np.concatenate([np.zeros((len(profiles), 1)), np.cumsum(self.intensity, axis=1)], axis=1)
        # Scalar draws read Python lists (bisect, math): numpy per scalar costs microseconds.
        self._cumulative_rows = self.cumulative.tolist()
        self._intensity_rows = self.intensity.tolist()

    def rate(self, user: int, at_ms: int) -> float:
        """Sessions per average day for this user at `at_ms`, with the mood decayed to then."""
        decay = math.exp(-(at_ms - int(self.mood_ms[user])) / (self.config.mood_memory_days * DAY_MS))
        return self._base_rate_rows[user] * math.exp(self.config.mood_sensitivity * float(self.mood[user]) * decay)

    def next_start(self, user: int, after_ms: int, uniform: Callable[[], float]) -> int | None:
        """The user's next session start after `after_ms`, or None if it falls past the horizon."""
        if self.churned[user]:
            return None
        horizon = self.config.horizon_ms
        profile, shift = self._profile_rows[user], self._shift_rows[user]
        cumulative, intensity = self._cumulative_rows[profile], self._intensity_rows[profile]
        t = after_ms
        while t < horizon:
            x = (t - shift) / HOUR_MS + MARGIN_HOURS  # position on the grid, hours
            hour = int(x)
            if hour < 0 or hour >= len(intensity):
                return None
            here = cumulative[hour] + (x - hour) * intensity[hour]
            target = here - math.log(1.0 - uniform()) / self.rate(user, t)
            at = bisect.bisect_right(cumulative, target) - 1
            if at >= len(intensity):
                return None
            start = int(((at + (target - cumulative[at]) / intensity[at]) - MARGIN_HOURS) * HOUR_MS) + shift
            start = max(start, t)
            if start <= t + DAY_MS:
                return start if start < horizon else None
            t += DAY_MS  # the rate moves with the mood: draw again a day later
        return None

    def end_session(self, user: int, end_ms: int, satisfaction: float, uniform: Callable[[], float]) -> int | None:
        """Update mood and the run of bad sessions; the next start (None: gone or past the horizon)."""
        config = self.config
        decay = math.exp(-(end_ms - int(self.mood_ms[user])) / (config.mood_memory_days * DAY_MS))
        keep = decay * (1.0 - config.mood_gain)  # what the new session leaves of the old mood
        expected = float(self.expectation[user])
        self.mood[user] = keep * float(self.mood[user]) + (1.0 - keep) * (satisfaction - expected)
        self.expectation[user] = expected + config.expectation_gain * (satisfaction - expected)
        self.mood_ms[user] = end_ms
        bad_run = int(self.bad_run[user]) + 1 if satisfaction < config.bad_session_below else 0
        self.bad_run[user] = bad_run
        after = end_ms
        if bad_run >= config.dormancy_after:
            self.bad_run[user] = 0
            self.dormant_spells += 1
            if uniform() < config.churn_probability:
                self.churned[user] = True
                return None
            after = end_ms + int(-math.log(1.0 - uniform()) * config.dormancy_days * DAY_MS)
        return self.next_start(user, after, uniform)
