"""Does a better ranker bring users back? Per-user activity and a two-arm test on one platform.

`activity_per_user` turns an event log into what platforms judge rankers on: active days,
sessions (30 minutes of inactivity split them), listening minutes and full plays per user,
over every user of the platform (a user who never came back counts with zeros).
`compare_arms` gives each metric's relative lift of treatment over control with a Welch
t-test, CUPED-adjusted when a pre-test covariate is given. `run_shuffle_ab` is the check of user model 2: the oracle ranker for the control
half of the users, the same candidates in random order for the other half.

    python -m simulator.retention --users 2000 --days 7 --seed 42
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from simulator.config import DAY_MS, SimConfig
from simulator.facts import SESSION_GAP_MS, _session_starts
from simulator.platform import MusicPlatform
from simulator.policies import OracleRecommender, ShuffledRecommender
from streaming.events import BEHAVIOUR_CODE, EventBatch

METRICS = ("active_days", "sessions", "listening_minutes", "full_plays")


def activity_per_user(events: EventBatch, n_users: int, start_ts: int) -> pd.DataFrame:
    """One row per user id in [0, n_users): active days, sessions, listening minutes, full plays."""
    order, starts = _session_starts(events, SESSION_GAP_MS)
    users = events.user_id.astype(np.int64)
    sessions = np.bincount(users[order][starts], minlength=n_users)
    day = (events.ts - start_ts) // DAY_MS
    n_days = int(day.max()) + 1 if len(day) else 1
    active = np.unique(users * n_days + day)
    active_days = np.bincount(active // n_days, minlength=n_users)
    ended = np.isin(events.behaviour, [BEHAVIOUR_CODE["full_play"], BEHAVIOUR_CODE["skip"]])
    minutes = np.bincount(users[ended], weights=events.play_ms[ended], minlength=n_users) / 60_000
    full = np.bincount(users[events.behaviour == BEHAVIOUR_CODE["full_play"]], minlength=n_users)
    return pd.DataFrame({"active_days": active_days, "sessions": sessions, "listening_minutes": minutes,
                         "full_plays": full})


@dataclass(frozen=True)
class Lift:
    metric: str
    control: float
    treatment: float
    relative: float  # treatment / control - 1
    p_value: float  # Welch t-test, two-sided


def compare_arms(activity: pd.DataFrame, treated: np.ndarray, covariate: np.ndarray | None = None) -> list[Lift]:
    """Lift and Welch p per metric; with `covariate` (known before the test) the p-value is on
    CUPED-adjusted values, y - theta (x - mean x), theta = cov(y, x) / var(x) over all users."""
    lifts = []
    for metric in METRICS:
        y = activity[metric].to_numpy(np.float64)
        adjusted = y
        if covariate is not None:
            x = np.asarray(covariate, np.float64)
            theta = np.cov(y, x)[0, 1] / max(np.var(x, ddof=1), 1e-12)
            adjusted = y - theta * (x - x.mean())
        a, b = y[~treated], y[treated]
        p_value = float(stats.ttest_ind(adjusted[treated], adjusted[~treated], equal_var=False).pvalue)
        lifts.append(Lift(metric, float(a.mean()), float(b.mean()), float(b.mean() / a.mean() - 1), p_value))
    return lifts


def run_shuffle_ab(config: SimConfig, n_candidates: int = 100) -> tuple[list[Lift], MusicPlatform]:
    """Oracle ranking (control, even user ids) against its candidates shuffled (odd user ids)."""
    batches: list[EventBatch] = []
    platform = MusicPlatform(config, None, batches.append)
    treated = np.arange(config.n_users) % 2 == 1
    platform.recommender = ShuffledRecommender(OracleRecommender(platform, n_candidates, seed=config.seed),
                                               seed=config.seed + 1, shuffle=treated)
    platform.run()
    activity = activity_per_user(EventBatch.concat(batches), config.n_users, config.start_ts)
    # Each user's base session rate is drawn before the test: a CUPED covariate, as a
    # platform would use the users' activity before the experiment.
    return compare_arms(activity, treated, covariate=platform.users.sessions_per_day), platform


def report(config: SimConfig) -> None:
    """Run the shuffle A/B on `config` and print each metric's lift and the churned users."""
    lifts, platform = run_shuffle_ab(config)
    print(f"{config.n_users} users, {config.n_tracks} tracks, {config.days:g} days, seed {config.seed}: "
          f"control = oracle order, treatment = same candidates shuffled")
    print(f"{'metric':18s} {'control':>9s} {'treatment':>9s} {'lift':>8s} {'p (CUPED)':>9s}")
    for lift in lifts:
        print(f"{lift.metric:18s} {lift.control:9.2f} {lift.treatment:9.2f} {lift.relative:+8.1%} {lift.p_value:9.2g}")
    churned = platform.returns.churned if platform.returns is not None else np.zeros(config.n_users, bool)
    treated = np.arange(config.n_users) % 2 == 1
    print(f"users gone for good: control {churned[~treated].sum()}, treatment {churned[treated].sum()}")


def main(argv: list[str] | None = None) -> None:
    """`python -m simulator.retention [--users --tracks --days --seed]` (the CLI is built here,
    so importing this module for its functions costs no typer app)."""
    import typer

    from sandbox.cli_options import run_command

    defaults = SimConfig()
    app = typer.Typer(add_completion=False)

    @app.command(help="Oracle ranking against the same candidates shuffled: retention")
    def retention(users: int = typer.Option(defaults.n_users), tracks: int = typer.Option(defaults.n_tracks),
                  days: float = typer.Option(defaults.days), seed: int = typer.Option(defaults.seed),
                  weekday_lunch_dip: float = typer.Option(defaults.weekday_lunch_dip,
                                                          help="user model 3's weekday lunch dip (0: before it)"),
                  ) -> None:
        report(SimConfig(n_users=users, n_tracks=tracks, days=days, seed=seed, weekday_lunch_dip=weekday_lunch_dip))

    run_command(app, argv, "python -m simulator.retention")

if __name__ == "__main__":
    main()
