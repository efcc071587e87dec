"""A/B statistics: relative lift with a confidence interval, and the sample-ratio-mismatch check.

The unit of randomisation is the user, so every metric is first reduced to one row per
exposed user; treating impressions as independent would understate variance (a user's
impressions are correlated). Two kinds of metric:

- per-user means (e.g. full plays per user): Welch's t with the delta-method variance of
  the relative lift, Var ≈ s_T²/(n_T μ_C²) + μ_T² s_C²/(n_C μ_C⁴), and Welch–Satterthwaite df;
- ratios of sums (e.g. full plays per impression, ΣY/ΣN over users): the delta method for
  a ratio per arm, Var(R) ≈ (1/n)[s_Y²/μ_N² − 2 μ_Y s_YN/μ_N³ + μ_Y² s_N²/μ_N⁴], then the
  same lift formula with a normal approximation.

Each lift also carries its minimum detectable effect (MDE): the relative lift this test,
with these users and this variance, would find significant with probability `POWER`
(80%), (z_{1-α/2} + z_{power})·SE. A lift that is not significant is only evidence of no
effect larger than the MDE; comparing model sizes, that is often the honest reading.

SRM: a chi-square test of users per arm against the configured shares, flagged at
p < 0.001 (a mismatch means the assignment or logging is broken and no lift can be trusted).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

import duckdb
import numpy as np
import pandas as pd
from scipy import stats

from experiments.metrics import connect

SRM_ALPHA = 0.001
POWER = 0.8  # for the minimum detectable effect of each lift
USER_METRICS_SQL = """
WITH served AS (
    SELECT DISTINCT ON (e.event_id) r.arm, r.user_id, e.request_id, e.track_id, e.behaviour
    FROM events e JOIN requests r USING (request_id)),
shown AS (
    SELECT arm, user_id, request_id, track_id,
           bool_or(behaviour = 'impression') AS impression,
           bool_or(behaviour = 'full_play') AS full_played
    FROM served GROUP BY ALL)
SELECT r.arm, r.user_id,
       coalesce(s.impressions, 0) AS impressions, coalesce(s.full_played, 0) AS full_played,
       coalesce(f.full_plays, 0) AS full_plays
FROM (SELECT DISTINCT arm, user_id FROM requests) r
LEFT JOIN (SELECT arm, user_id, count(*) FILTER (WHERE impression) AS impressions,
                  count(*) FILTER (WHERE impression AND full_played) AS full_played
           FROM shown GROUP BY ALL) s USING (arm, user_id)
LEFT JOIN (SELECT arm, user_id, count(*) AS full_plays FROM served WHERE behaviour = 'full_play'
           GROUP BY ALL) f USING (arm, user_id)
ORDER BY r.arm, r.user_id
"""


@dataclass(frozen=True)
class Lift:
    metric: str
    control: float  # the metric in the control arm
    treatment: float
    lift: float  # treatment / control - 1
    ci_low: float
    ci_high: float
    p_value: float
    n_control: int
    n_treatment: int
    mde: float  # smallest |lift| detected with probability POWER at this SE (two-sided, same confidence)


@dataclass(frozen=True)
class SampleRatio:
    observed: dict[str, int]
    expected_share: dict[str, float]
    chi2: float
    p_value: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < SRM_ALPHA


def _check(values: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"{name}: need a 1-d array of at least 2 users, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return values


def _lift(metric: str, mean_c: float, var_mean_c: float, mean_t: float, var_mean_t: float,
          n_c: int, n_t: int, df: float, confidence: float) -> Lift:
    """Relative lift of two estimates given the variances of the estimates themselves."""
    if mean_c == 0:
        raise ValueError(f"{metric}: the control mean is 0, a relative lift is undefined")
    lift = mean_t / mean_c - 1
    se = float(np.sqrt(var_mean_t / mean_c**2 + mean_t**2 * var_mean_c / mean_c**4))
    dist = stats.t(df) if np.isfinite(df) else stats.norm()
    half = dist.ppf(0.5 + confidence / 2) * se
    if se > 0:
        p_value = float(2 * dist.sf(abs(lift) / se))
    else:  # no variance at all: the difference is either exactly nothing or certain
        p_value = 1.0 if lift == 0 else 0.0
    mde = float((dist.ppf(0.5 + confidence / 2) + dist.ppf(POWER)) * se)
    return Lift(metric, mean_c, mean_t, lift, lift - half, lift + half, p_value, n_c, n_t, mde)


def mean_lift(control: np.ndarray, treatment: np.ndarray, metric: str = "mean",
              confidence: float = 0.95) -> Lift:
    """Relative lift of a per-user mean (Welch, delta-method variance)."""
    c, t = _check(control, f"{metric} control"), _check(treatment, f"{metric} treatment")
    v_c, v_t = c.var(ddof=1) / len(c), t.var(ddof=1) / len(t)
    mean_c, mean_t = c.mean(), t.mean()
    if mean_c == 0:
        raise ValueError(f"{metric}: the control mean is 0, a relative lift is undefined")
    # Welch-Satterthwaite df on the two terms of the lift's variance.
    a, b = v_t / mean_c**2, mean_t**2 * v_c / mean_c**4
    df = (a + b) ** 2 / (a**2 / (len(t) - 1) + b**2 / (len(c) - 1)) if a + b > 0 else np.inf
    return _lift(metric, mean_c, v_c, mean_t, v_t, len(c), len(t), df, confidence)


def ratio_variance(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float]:
    """ΣY/ΣN over users and the delta-method variance of that ratio."""
    y, n = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    mu_y, mu_n = y.mean(), n.mean()
    if mu_n == 0:
        raise ValueError("ratio metric: the denominator is 0 for every user")
    cov = np.cov(y, n, ddof=1)
    var = (cov[0, 0] / mu_n**2 - 2 * mu_y * cov[0, 1] / mu_n**3 + mu_y**2 * cov[1, 1] / mu_n**4) / len(y)
    return mu_y / mu_n, float(var)


def ratio_lift(num_control: np.ndarray, den_control: np.ndarray, num_treatment: np.ndarray,
               den_treatment: np.ndarray, metric: str = "ratio", confidence: float = 0.95) -> Lift:
    """Relative lift of a ratio of per-user sums (delta method, normal approximation)."""
    for values, name in ((num_control, "numerator control"), (den_control, "denominator control"),
                         (num_treatment, "numerator treatment"), (den_treatment, "denominator treatment")):
        _check(values, f"{metric} {name}")
    r_c, v_c = ratio_variance(num_control, den_control)
    r_t, v_t = ratio_variance(num_treatment, den_treatment)
    return _lift(metric, r_c, v_c, r_t, v_t, len(num_control), len(num_treatment), np.inf, confidence)


def sample_ratio_check(observed: Mapping[str, int], expected_share: Mapping[str, float]) -> SampleRatio:
    """Chi-square test of users per arm against the configured traffic shares."""
    arms = list(expected_share)
    unknown = set(observed) - set(arms)
    if unknown:
        raise ValueError(f"users observed in arm(s) {sorted(unknown)} that have no expected share")
    counts = np.array([observed.get(a, 0) for a in arms], np.float64)
    shares = np.array([expected_share[a] for a in arms], np.float64)
    if counts.sum() == 0 or (shares <= 0).any():
        raise ValueError("SRM check needs some users and positive shares")
    chi2, p_value = stats.chisquare(counts, shares / shares.sum() * counts.sum())
    return SampleRatio({a: int(c) for a, c in zip(arms, counts)}, dict(expected_share), float(chi2), float(p_value))


def user_metrics(source: duckdb.DuckDBPyConnection | str | Path) -> pd.DataFrame:
    """One row per exposed (arm, user): impressions, impressions fully played, full plays."""
    con, owned = connect(source)
    try:
        return con.execute(USER_METRICS_SQL).df()
    finally:
        if owned:
            con.close()


def ab_report(source: duckdb.DuckDBPyConnection | str | Path, expected_share: Mapping[str, float],
              control: str = "control", confidence: float = 0.95) -> tuple[pd.DataFrame, SampleRatio]:
    """Lifts of every other arm against `control` (full plays per user, full-play rate per
    impression), and the SRM check on exposed users."""
    users = user_metrics(source)
    if users.empty:
        raise ValueError("the run has no ranked requests, so no user was exposed to any arm")
    srm = sample_ratio_check(users.groupby("arm").size().to_dict(), expected_share)
    if control not in set(users["arm"]):
        raise ValueError(f"no exposed users in the control arm {control!r}")
    base = users[users["arm"] == control]
    rows = []
    for arm in sorted(set(users["arm"]) - {control}):
        other = users[users["arm"] == arm]
        for lift in (mean_lift(base["full_plays"], other["full_plays"], "full_plays_per_user", confidence),
                     ratio_lift(base["full_played"], base["impressions"], other["full_played"],
                                other["impressions"], "full_play_rate", confidence)):
            rows.append({"arm": arm, **asdict(lift)})
    return pd.DataFrame(rows), srm


def configured_shares(source: duckdb.DuckDBPyConnection | str | Path) -> dict[str, float]:
    """The traffic share of every arm as the run configured it (its `runs` row), normalised:
    the SRM check must test against what was asked for, not what was observed."""
    con, owned = connect(source)
    try:
        row = con.execute("SELECT settings FROM runs ORDER BY started_at LIMIT 1").fetchone()
    finally:
        if owned:
            con.close()
    if row is None:
        raise ValueError("the run record has no runs row, so its arms' shares are unknown")
    arms = json.loads(row[0]).get("experiment", {}).get("arms")
    if not arms:
        raise ValueError("the run's settings name no experiment arms (a simulator-only log has none)")
    total = sum(arms.values())
    return {arm: share / total for arm, share in arms.items()}



def arm_rankers(source: duckdb.DuckDBPyConnection | str | Path) -> dict[str, str]:
    """Each arm's ranker as the run recorded it: an experiment run's `experiment.rankers`
    (where an arm may be the oracle), else the sandbox settings' `experiment.rankers`."""
    con, owned = connect(source)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "experiment" in tables:
            return json.loads(con.execute("SELECT rankers FROM experiment LIMIT 1").fetchone()[0])
        row = con.execute("SELECT settings FROM runs ORDER BY started_at LIMIT 1").fetchone()
    finally:
        if owned:
            con.close()
    return dict(json.loads(row[0]).get("experiment", {}).get("rankers", {})) if row else {}


def ceiling_frame(full_played: Mapping[str, float], impressions: Mapping[str, float],
                  rankers: Mapping[str, str], control: str = "control") -> pd.DataFrame | None:
    """Full-play rate per impression of every arm beside the oracle arm's (the ceiling: the
    simulator's true engagement orders the same candidates), and each arm's share of the gap
    from the popularity arm to the oracle arm closed. None when no arm is the oracle."""
    oracle = [arm for arm, ranker in rankers.items() if ranker == "oracle" and impressions.get(arm)]
    if not oracle:
        return None
    rate = {arm: full_played[arm] / impressions[arm] for arm in impressions if impressions[arm]}
    popular = sorted((arm for arm, ranker in rankers.items() if ranker == "popularity" and arm in rate),
                     key=lambda arm: arm != control)  # the control when it is a popularity arm
    floor, ceiling = (rate[popular[0]] if popular else np.nan), rate[oracle[0]]
    rows = []
    for arm in sorted(rate, key=lambda a: (a in oracle, rate[a])):
        gap = (rate[arm] - floor) / (ceiling - floor) if popular and ceiling != floor else np.nan
        rows.append({"arm": arm, "ranker": rankers.get(arm, "?") + (" (ceiling)" if arm in oracle else ""),
                     "impressions": int(impressions[arm]), "full_play_rate": rate[arm], "gap_closed": gap})
    frame = pd.DataFrame(rows)
    frame.attrs["caption"] = (f"gap closed: (arm - {popular[0]}) / ({oracle[0]} - {popular[0]}), "
                              f"{popular[0]} being a popularity arm" if popular else "no popularity arm: no gap")
    return frame


def ceiling_from_record(source: duckdb.DuckDBPyConnection | str | Path, control: str = "control") -> pd.DataFrame | None:
    """`ceiling_frame` of a run's exposed users, for `climber ab`: over the A/B days of an
    experiment run (before them every arm but the baselines serves a popularity
    placeholder), as its report counts them; over the whole run otherwise (`user_metrics`)."""
    from experiments.user_table import user_table

    con, owned = connect(source)
    try:
        rankers = arm_rankers(con)
        if "oracle" not in rankers.values():
            return None
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "experiment" in tables:
            ab_start, end = con.execute("SELECT ab_start_ts, end_ts FROM experiment LIMIT 1").fetchone()
            totals = user_table(con, int(ab_start), int(end)).groupby("arm")[["full_played_impressions",
                                                                                "impressions"]].sum()
            full = totals["full_played_impressions"]
        else:
            totals = user_metrics(con).groupby("arm")[["full_played", "impressions"]].sum()
            full = totals["full_played"]
    finally:
        if owned:
            con.close()
    return ceiling_frame(full.to_dict(), totals["impressions"].to_dict(), rankers, control)
