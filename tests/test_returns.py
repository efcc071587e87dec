"""User model 2: returns driven by satisfaction, leaving, cycles, facts against published figures."""

from __future__ import annotations

import numpy as np
import pytest

from ranker.interface import TrackMetadata
from simulator.config import DAY_MS, HOUR_MS, SimConfig
from simulator.facts import hourly_session_starts, stylised_facts
from simulator.platform import MusicPlatform
from simulator.policies import PopularityRecommender, RandomRecommender
from simulator.retention import activity_per_user, run_shuffle_ab
from simulator.returns import ReturnModel, weekday_profiles, weekend_profiles
from streaming.events import EventBatch
from tests.support import log_hash

FACTS_SIZE = dict(n_users=2000, n_tracks=20_000, days=7.0)  # the default: the ranges are set for this catalogue
SMALL = dict(n_users=600, n_tracks=6000, days=7.0)


def run(policy: str, **config) -> tuple[MusicPlatform, EventBatch]:
    batches: list[EventBatch] = []
    platform = MusicPlatform(SimConfig(**config), None, batches.append)
    metadata = platform.catalog.metadata()
    if policy == "random":
        platform.recommender = RandomRecommender(metadata, 1)
    else:
        popular = platform.recommender = PopularityRecommender(metadata, 1)
        platform.sink = lambda batch: (batches.append(batch), popular.observe(batch))
    platform.run()
    return platform, EventBatch.concat(batches)


def test_user_model_1_gives_the_old_event_log_bit_for_bit():
    """The hash of this run before user model 2 existed (commit 956e354): frozen configs pin model 1."""
    _, events = run("random", n_users=200, n_tracks=2000, days=2.0, seed=5, user_model=1)
    assert log_hash(events)[:16] == "d2e7b3e1d4235707"


def test_user_model_2_gives_the_pinned_event_log_bit_for_bit():
    """Model 2's log as configs/2026-12-06-oracle-ceiling-model-2.yaml measured it: a speed-up must
    keep it; a change of the model changes this hash and dates a new frozen config."""
    _, events = run("random", n_users=120, n_tracks=1500, days=2.0, seed=8, user_model=2)
    assert log_hash(events)[:16] == "2382afa5157def8d"


def test_the_default_is_user_model_3_with_its_pinned_log():
    """The default world since 2026-12-06: albums, the slate-aware oracle, the weekday lunch dip.
    A change of it changes this hash and dates a new frozen config."""
    assert SimConfig().user_model == 3
    _, events = run("random", n_users=120, n_tracks=1500, days=2.0, seed=8)
    assert log_hash(events)[:16] == "f3026d82cae89b86"


def test_user_model_2_same_seed_same_log():
    config = dict(n_users=120, n_tracks=1500, days=2.0, seed=8, user_model=2)
    assert log_hash(run("random", **config)[1]) == log_hash(run("random", **config)[1])
    assert log_hash(run("random", **config)[1]) != log_hash(run("random", **{**config, "seed": 9})[1])


@pytest.fixture(scope="module")
def facts_run():
    return run("popularity", **FACTS_SIZE)


def test_facts_hold_under_the_logging_policy(facts_run):
    platform, events = facts_run
    facts = stylised_facts(events, platform.catalog.metadata())
    assert len(facts) >= 14 and all(f.source for f in facts)
    assert [f.name for f in facts if not f.ok] == [], [(f.name, round(f.value, 3)) for f in facts]


def test_facts_fail_a_uniform_policy_and_a_broken_simulator():
    platform, events = run("random", **SMALL)
    failed = {f.name for f in stylised_facts(events, platform.catalog.metadata()) if not f.ok}
    assert {"play_gini", "top1pct_play_share"} <= failed  # real listening is not uniform
    # Skips at the old model's timing (2 s to 60% of the track): Lamere's within-5 s share fails.
    platform, events = run("popularity", **SMALL, fast_skip_share=0.01, skip_tail_s=120)
    failed = {f.name for f in stylised_facts(events, platform.catalog.metadata()) if not f.ok}
    assert "skip_within_5s_share" in failed


def test_a_shuffled_ranking_loses_users_not_only_plays():
    lifts, _ = run_shuffle_ab(SimConfig(n_users=1000, n_tracks=3000, days=4.0, seed=11))
    by_metric = {lift.metric: lift for lift in lifts}
    for metric in ("active_days", "sessions", "full_plays"):
        assert by_metric[metric].relative < -0.05 and by_metric[metric].p_value < 0.05, by_metric[metric]


def make_returns(**config) -> ReturnModel:
    config = SimConfig(n_users=4, n_tracks=100, days=28.0, **config)
    return ReturnModel(config, np.full(4, 2.0), np.random.default_rng(0))


def stream(seed: int):
    rng = np.random.default_rng(seed)
    return lambda: float(rng.random())


def test_mood_moves_the_next_start_and_fades_over_days():
    returns = make_returns()
    gaps = {}
    for label, satisfaction in (("happy", 1.0), ("unhappy", -0.3)):
        draws = []
        for seed in range(300):
            returns.mood[:] = 0
            returns.mood_ms[:] = 0
            returns.bad_run[:] = 0
            returns.expectation[:] = returns.config.satisfaction_reference
            start = returns.end_session(0, DAY_MS, satisfaction, stream(seed))
            draws.append(start - DAY_MS)
        gaps[label] = np.median(draws)
    assert gaps["happy"] < 0.8 * gaps["unhappy"]
    returns.mood[0], returns.mood_ms[0] = -1.0, 0
    assert returns.rate(0, 0) < 0.5 * returns.rate(0, 20 * DAY_MS)  # a bad spell is forgotten


def test_a_run_of_bad_sessions_makes_users_dormant_or_gone():
    returns = make_returns(churn_probability=1.0, dormancy_after=3)
    u = stream(0)
    assert returns.end_session(1, HOUR_MS, -1.0, u) is not None
    assert returns.end_session(1, 2 * HOUR_MS, -1.0, u) is not None
    assert returns.end_session(1, 3 * HOUR_MS, -1.0, u) is None and returns.churned[1]
    assert returns.next_start(1, 4 * HOUR_MS, u) is None
    returns = make_returns(churn_probability=0.0, dormancy_after=2, dormancy_days=10)
    returns.end_session(2, HOUR_MS, -1.0, u)
    assert returns.end_session(2, 2 * HOUR_MS, -1.0, u) > 2 * HOUR_MS + DAY_MS and not returns.churned[2]


def test_profiles_and_week():
    weekday, weekend = weekday_profiles(), weekend_profiles()
    assert np.allclose(weekday.mean(axis=1), 1) and np.allclose(weekend.mean(axis=1), 1)
    assert len(weekday) == 4  # early birds, working hours, evening, night owls
    assert (weekday[:3, 2:5].mean(axis=1) < 0.2).all() and weekday[3, 2:5].mean() < 1  # 2-5 am: sleep
    returns = make_returns(weekend_activity=0.5)
    per_day = np.diff(returns.cumulative[:, ::24], axis=1)  # grid starts at midnight, 2 days before Monday
    weekend = np.isin(np.arange(per_day.shape[1]) % 7, (0, 1))  # column 0 is a Saturday
    assert np.allclose(per_day[:, weekend], 0.5 * per_day[:, ~weekend].mean())


def test_weekday_lunch_dip_in_model_3_only():
    """Zhang et al. 2013: on weekdays session arrivals drop over lunch after the morning peak and
    rise again; not at weekends. Model 3 has it; model 2's grid is unchanged (frozen configs)."""
    plain, dipped = weekday_profiles(), weekday_profiles(0.3)
    ratio = dipped / plain  # the dip at noon, then each row renormalised to mean 1
    assert np.allclose(ratio[:2, 12] / ratio[:2, 11], 0.7) and np.allclose(dipped[2:], plain[2:])
    before, after = plain.mean(axis=0), dipped.mean(axis=0)  # the population, a quarter each
    assert before[12] > 0.98 * min(before[11], before[13])  # no dip without it
    assert after[12] < 0.95 * min(after[11], after[13]) and after[9] > 1.3 * after[12]
    two, three = make_returns(user_model=2), make_returns(user_model=3)
    assert np.array_equal(two.intensity, make_returns(user_model=2, weekday_lunch_dip=0.0).intensity)
    assert np.array_equal(two.intensity, make_returns(user_model=3, weekday_lunch_dip=0.0).intensity)
    hour = np.arange(two.intensity.shape[1])
    weekend = (hour // 24) % 7 < 2  # the grid starts at midnight two days before a Monday
    assert np.array_equal(two.intensity[:, weekend], three.intensity[:, weekend])
    noon = ~weekend & (hour % 24 == 12)
    assert (three.intensity[:2, noon] < 0.75 * two.intensity[:2, noon]).all()


def test_daily_cycle_facts_read_weekday_session_starts_not_events():
    """Morning sessions that run past noon and weekend sessions that start at noon: events peak
    at noon, but the source's quantity, weekday session arrivals, peaks when they start."""
    monday, rows = SimConfig().start_ts, []  # (day, hour the sessions start, users, minutes long)
    for day in range(7):
        rows += [(day, 9 if day < 5 else 12, 30, 240), (day, 19, 40, 30), (day, 14, 10, 30)]
        rows += [(day, hour, 2, 10) for hour in range(24) if hour != 3]  # a trickle, none at 3 am
    ts, user = [], []
    for i, (day, hour, n, minutes) in enumerate(rows):
        for u in range(n):
            start = monday + day * DAY_MS + hour * HOUR_MS + u * 60_000
            ts += range(start, start + minutes * 60_000, 5 * 60_000)
            user += [100 * i + u] * len(range(0, minutes, 5))  # users of one row start one session
    n = len(ts)
    events = EventBatch.from_columns(event_id=np.arange(n), ts=ts, user_id=user, track_id=np.zeros(n),
                                     scenario=np.zeros(n), behaviour=np.zeros(n))
    assert np.argmax(np.bincount((events.ts // HOUR_MS) % 24)[6:13]) + 6 == 12  # events: noon
    assert hourly_session_starts(events).sum() == sum(row[2] for row in rows)
    metadata = TrackMetadata(*(np.zeros(1, np.int64) for _ in range(4)))
    facts = {f.name: f.value for f in stylised_facts(events, metadata)}
    assert (facts["morning_peak_hour"], facts["daily_peak_hour"], facts["quietest_hour"]) == (9, 19, 3)


def test_churned_users_stop_and_activity_counts_everyone(facts_run):
    platform, events = facts_run
    activity = activity_per_user(events, platform.config.n_users, platform.config.start_ts)
    assert len(activity) == platform.config.n_users
    gone = np.flatnonzero(platform.returns.churned)
    assert len(gone) > 0 and (activity["active_days"] <= 8).all()
    last_ts = np.array([events.ts[events.user_id == user].max() for user in gone[:20]])
    assert (last_ts < platform.config.end_ts).all()


def test_frozen_configs_before_user_model_2_must_pin_model_1(monkeypatch):
    from sandbox.frozen import FrozenConfig, check_frozen

    def config(step: str, date: str = "2026-12-03") -> FrozenConfig:
        return FrozenConfig(id=f"{date}-x", date=date, reports="r", machine="m", commit="c", steps=[step])

    step = "climber simulate --users 10 --out runs --run-id a"
    assert any("user model 1" in p for p in check_frozen(config(step)))
    assert check_frozen(config(f"env CLIMBER_SIM__USER_MODEL=1 {step}")) == []
    assert check_frozen(config(step, "2026-12-07")) == []  # from then on model 3, the default
    assert any("user model 2" in p for p in check_frozen(config(step, "2026-12-06")))
    assert check_frozen(config(f"env CLIMBER_SIM__USER_MODEL=2 {step}", "2026-12-06")) == []
    monkeypatch.setenv("CLIMBER_SIM__USER_MODEL", "1")
    assert SimConfig().user_model == 1 and SimConfig(user_model=2).user_model == 2
    from sandbox.settings import SandboxSettings  # the pin reaches `climber simulate|sandbox` as text

    assert SandboxSettings().sim.user_model == 1
    monkeypatch.setenv("CLIMBER_SIM__USER_MODEL", "3")
    assert SimConfig().user_model == 3
    monkeypatch.setenv("CLIMBER_SIM__USER_MODEL", "4")
    with pytest.raises(ValueError, match="CLIMBER_SIM__USER_MODEL"):
        SimConfig()
