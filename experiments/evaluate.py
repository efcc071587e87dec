"""Everything the report says about an experiment run, computed from its DuckDB file alone.

Comparisons: every arm against the control, and every pair of the other arms (two trained
arms: the one with fewer FLOPs per request is the baseline). Per comparison and metric:
the plain lift (Welch / delta method), for per-user metrics the CUPED lift too, the MDE,
and Holm's adjustment over the whole family of (metric, pair) tests. The p-value Holm
adjusts is the CUPED one where CUPED applies (per-user metrics, `metrics.cuped`), else
the plain one. Ratio metrics (per impression) use the delta method without CUPED.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from experiments.analysis import SampleRatio, mean_lift, ratio_lift, sample_ratio_check
from experiments.online_growth import gap_by_day
from experiments.spec import PER_USER_METRICS, RATIO_METRICS, ExperimentSpec
from experiments.stats import cuped_lift, holm, msprt, running, welch_p
from experiments.user_table import user_table
from simulator.config import DAY_MS


@dataclass
class Evaluation:
    spec: ExperimentSpec
    meta: dict
    lifts: pd.DataFrame  # one row per (pair, metric)
    daily: pd.DataFrame  # arm x day x metric (per exposed user that day; ratios per impression)
    sequential: pd.DataFrame  # arm vs control x primary metric x day: running always-valid interval
    srm: SampleRatio
    regret: pd.DataFrame  # per arm
    cache: pd.DataFrame  # per neural arm
    models: pd.DataFrame  # per trained arm: params, FLOPs per request, offline metrics
    users: pd.DataFrame = field(repr=False, default=None)  # the A/B per-user table
    retrains: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per fine-tune; empty without
    daily_gap: pd.DataFrame = field(default_factory=pd.DataFrame)  # per A/B day: largest size over smallest

    @property
    def control(self) -> str:
        return self.spec.control


def pairs(spec: ExperimentSpec, flops: dict[str, float]) -> list[tuple[str, str]]:
    """(baseline, arm) for each arm against the control, then each other pair."""
    control, others = spec.control, [a for a in spec.arms if a != spec.control]
    out = [(control, arm) for arm in others]
    for i, a in enumerate(others):
        for b in others[i + 1:]:
            if flops.get(b, np.inf) < flops.get(a, np.inf):
                a, b = b, a
            out.append((a, b))
    return out


def compare(users: pd.DataFrame, base: str, arm: str, metric: str, covariate: pd.Series | None,
            confidence: float) -> dict:
    c, t = users[users["arm"] == base], users[users["arm"] == arm]
    row = {"baseline": base, "arm": arm, "metric": metric}
    if metric in RATIO_METRICS:
        num, den = RATIO_METRICS[metric]
        plain = ratio_lift(c[num], c[den], t[num], t[den], metric, confidence)
    else:
        plain = mean_lift(c[metric], t[metric], metric, confidence)
    row.update({k: getattr(plain, k) for k in ("control", "treatment", "lift", "ci_low", "ci_high", "p_value",
                                                "mde", "n_control", "n_treatment")})
    if metric not in RATIO_METRICS:
        row["p_value"] = welch_p(c[metric], t[metric])
    row.update(cuped_lift=np.nan, cuped_ci_low=np.nan, cuped_ci_high=np.nan, cuped_p=np.nan, cuped_mde=np.nan,
               variance_reduction=np.nan)
    if covariate is not None and metric in PER_USER_METRICS:
        x = covariate.reindex(users["user_id"]).fillna(0.0).to_numpy()
        x_c, x_t = x[(users["arm"] == base).to_numpy()], x[(users["arm"] == arm).to_numpy()]
        adjusted = cuped_lift(c[metric], x_c, t[metric], x_t, metric, confidence)
        row.update(cuped_lift=adjusted.lift.lift, cuped_ci_low=adjusted.lift.ci_low,
                   cuped_ci_high=adjusted.lift.ci_high, cuped_p=adjusted.p_value, cuped_mde=adjusted.lift.mde,
                   variance_reduction=adjusted.variance_reduction)
    return row


def lift_table(users: pd.DataFrame, warm: pd.DataFrame | None, comparisons: list[tuple[str, str]],
               metrics: list[str], confidence: float) -> pd.DataFrame:
    """Every (pair, metric) test with Holm's adjustment over all of them."""
    rows = []
    for base, arm in comparisons:
        for metric in metrics:
            covariate = None if warm is None else warm.set_index("user_id")[metric] if metric in warm else None
            rows.append(compare(users, base, arm, metric, covariate, confidence))
    frame = pd.DataFrame(rows)
    frame["p_tested"] = frame["cuped_p"].where(frame["cuped_p"].notna(), frame["p_value"])
    frame["p_holm"] = holm(frame["p_tested"].to_numpy())
    return frame


def daily_table(con, spec: ExperimentSpec, ab_start: int, metrics: list[str]) -> pd.DataFrame:
    """Each metric per arm per full A/B day. Per user that day, `active_days` would be 1 by
    construction; its daily value is the share of the arm's assigned users active that day."""
    rows = []
    assigned = dict(con.execute("SELECT arm, count(*) FROM assignments GROUP BY arm").fetchall())
    for day in range(spec.phases.ab.days):
        users = user_table(con, ab_start + day * DAY_MS, ab_start + (day + 1) * DAY_MS)
        for arm, group in users.groupby("arm"):
            for metric in metrics:
                if metric in RATIO_METRICS:
                    num, den = RATIO_METRICS[metric]
                    value = group[num].sum() / max(group[den].sum(), 1)
                elif metric == "active_days":
                    value = len(group) / max(assigned.get(arm, 0), 1)
                else:
                    value = group[metric].mean()
                rows.append({"day": day + 1, "arm": arm, "metric": metric, "value": float(value),
                             "users": len(group)})
    return pd.DataFrame(rows)


def sequential_table(con, spec: ExperimentSpec, ab_start: int) -> pd.DataFrame:
    """After each A/B day, every arm against the control on the primary metrics: the
    fixed-horizon interval and the running always-valid (mSPRT) one."""
    confidence, tau = spec.metrics.confidence, spec.metrics.sequential_tau
    looks: dict[tuple[str, str], list] = {}
    rows = []
    for day in range(spec.phases.ab.days):
        users = user_table(con, ab_start, ab_start + (day + 1) * DAY_MS)
        for arm in spec.arms:
            if arm == spec.control:
                continue
            for metric in spec.metrics.primary:
                try:
                    row = compare(users, spec.control, arm, metric, None, confidence)
                except ValueError:
                    continue
                se = (row["ci_high"] - row["ci_low"]) / 2 / _z(confidence)
                looks.setdefault((arm, metric), []).append(msprt(row["lift"], se, tau, 1 - confidence))
                now = running(looks[(arm, metric)])[-1]
                rows.append({"day": day + 1, "arm": arm, "metric": metric, "lift": row["lift"],
                             "ci_low": row["ci_low"], "ci_high": row["ci_high"], "seq_low": now.low,
                             "seq_high": now.high, "seq_p": now.p_value})
    return pd.DataFrame(rows)


def _z(confidence: float) -> float:
    from scipy import stats

    return float(stats.norm.ppf(0.5 + confidence / 2))


def regret_table(con) -> pd.DataFrame:
    """Per arm: the oracle's expected full plays of the served slate (position-weighted by
    examination) against its own best slate of the same candidates, per request."""
    frame = con.execute("""
        SELECT arm, count(*) AS requests, avg(served) AS served, avg(best) AS best,
               avg(best - served) AS regret, stddev_samp(best - served) / sqrt(count(*)) AS regret_se,
               1 - sum(served) / sum(best) AS relative_regret
        FROM regret GROUP BY arm ORDER BY arm""").df()
    return frame


def evaluate(db_path: str | Path) -> Evaluation:
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"no experiment record at {db_path}")
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "experiment" not in tables:
            raise ValueError(f"{db_path} is not an experiment run (no `experiment` table); "
                             "run `climber experiment run FILE` first")
        meta = con.execute("SELECT * FROM experiment").df().iloc[0].to_dict()
        spec = ExperimentSpec.model_validate_json(meta["spec"])
        models = con.execute("SELECT * FROM arm_models").df()
        flops = dict(zip(models["arm"], models["flops_per_request"].astype(float)))
        ab_start, start, end = int(meta["ab_start_ts"]), int(meta["start_ts"]), int(meta["end_ts"])
        users = user_table(con, ab_start, end)
        if users.empty:
            raise ValueError("no user was served in the A/B phase")
        warm = user_table(con, start, ab_start) if spec.metrics.cuped else None
        metrics = list(PER_USER_METRICS) + list(RATIO_METRICS)
        lifts = lift_table(users, warm, pairs(spec, flops), metrics, spec.metrics.confidence)
        srm = sample_ratio_check(users.groupby("arm").size().to_dict(), spec.shares())
        retrains = con.execute("SELECT * FROM retrains ORDER BY day, arm").df() if "retrains" in tables \
            else pd.DataFrame()
        daily_gap = gap_by_day(con, spec, ab_start, warm, models) if not retrains.empty else pd.DataFrame()
        return Evaluation(spec=spec, meta=meta, lifts=lifts, daily=daily_table(con, spec, ab_start, metrics),
                          sequential=sequential_table(con, spec, ab_start), srm=srm, regret=regret_table(con),
                          cache=con.execute("SELECT * FROM kv_cache ORDER BY arm").df(), models=models, users=users,
                          retrains=retrains, daily_gap=daily_gap)
    finally:
        con.close()


def summary_json(ev: Evaluation) -> dict:
    """What a script wants from a run: the lifts, SRM, regret, cache counts, models."""
    return {"name": ev.spec.name, "event_log_hash": ev.meta["event_log_hash"],
            "wall_seconds": float(ev.meta["wall_seconds"]), "phase_seconds": json.loads(ev.meta["phase_seconds"]),
            "srm": asdict(ev.srm), "lifts": ev.lifts.to_dict("records"), "regret": ev.regret.to_dict("records"),
            "kv_cache": ev.cache.to_dict("records"), "models": ev.models.to_dict("records")}
