"""Growth over the A/B days when the trained arms retrain (`phases.retrain_every`).

The paper's claim is that scaling drives continuous online growth: retrained daily, every
size should improve and the larger one should pull away. Per full A/B day this gives the
primary metric per arm (per exposed user that day, from `Evaluation.daily`) and the lift of
the largest trained size over the smallest on that day's users (CUPED with the warm-up
value where the spec asks for it, else plain), with the retrain pauses, so a reader sees
both whether metrics grow and whether the size gap widens. Runs without retrains get none.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from experiments.spec import ExperimentSpec
from experiments.user_table import user_table
from simulator.config import DAY_MS


def size_ends(models: pd.DataFrame) -> tuple[str, str] | None:
    """(smallest, largest) trained arm by FLOPs per request; None with fewer than two."""
    if len(models) < 2:
        return None
    ordered = models.sort_values("flops_per_request")["arm"].tolist()
    return ordered[0], ordered[-1]


def gap_by_day(con, spec: ExperimentSpec, ab_start: int, warm: pd.DataFrame | None,
               models: pd.DataFrame) -> pd.DataFrame:
    """One row per full A/B day: the largest size's lift over the smallest on the primary
    metric among that day's exposed users (`kind` says CUPED or plain)."""
    from experiments.evaluate import compare  # evaluate imports this module

    ends = size_ends(models)
    if ends is None:
        return pd.DataFrame(columns=["day", "baseline", "arm", "metric", "lift", "ci_low", "ci_high", "kind"])
    small, large = ends
    metric = spec.metrics.primary[0]
    covariate = None if warm is None or metric not in warm else warm.set_index("user_id")[metric]
    rows = []
    for day in range(spec.phases.ab.days):
        users = user_table(con, ab_start + day * DAY_MS, ab_start + (day + 1) * DAY_MS)
        try:
            row = compare(users, small, large, metric, covariate, spec.metrics.confidence)
        except ValueError:  # an arm with no user that day
            continue
        cuped = np.isfinite(row["cuped_lift"])
        pick = ("cuped_lift", "cuped_ci_low", "cuped_ci_high") if cuped else ("lift", "ci_low", "ci_high")
        rows.append({"day": day + 1, "baseline": small, "arm": large, "metric": metric,
                     **dict(zip(("lift", "ci_low", "ci_high"), (float(row[k]) for k in pick))),
                     "kind": "CUPED" if cuped else "plain"})
    return pd.DataFrame(rows)


def retrained_after(retrains: pd.DataFrame, warm_up_days: int) -> list[int]:
    """The A/B days after which the arms were fine-tuned (a pause at absolute day d ends
    A/B day d - warm_up_days)."""
    if retrains.empty:
        return []
    return sorted({int(d) - warm_up_days for d in retrains["day"]})


def growth_frame(daily: pd.DataFrame, gap: pd.DataFrame, spec: ExperimentSpec, after: list[int]) -> pd.DataFrame:
    """Day x (each arm's primary metric, the size gap with its CI, retrained after it?)."""
    metric = spec.metrics.primary[0]
    values = daily[daily["metric"] == metric].pivot(index="day", columns="arm", values="value")
    values = values[[a for a in spec.arms if a in values.columns]]
    out = pd.DataFrame({"day": values.index})
    for arm in values.columns:
        out[arm] = [f"{v:.3f}" for v in values[arm]]
    if not gap.empty:
        g = gap.set_index("day").reindex(values.index)
        out["gap"] = [_pct(v) for v in g["lift"]]
        out["CI"] = [f"[{_pct(lo, 0)}, {_pct(hi, 0)}]" for lo, hi in zip(g["ci_low"], g["ci_high"])]
    out["retrain"] = ["after" if d in after else "" for d in values.index]
    return out


def growth_line(gap: pd.DataFrame, after: list[int]) -> str:
    """One terminal line: the size gap day by day (fits 80 columns for up to 5 days)."""
    if gap.empty:
        return f"Retrained after A/B day(s) {', '.join(map(str, after))}; fewer than two trained sizes: no gap."
    first = gap.iloc[0]
    days = " -> ".join(_pct(v) for v in gap["lift"])
    short = {a: a.split("_")[-1] for a in (first["arm"], first["baseline"])}
    return f"Gap {short[first['arm']]} vs {short[first['baseline']]} by day: {days} (retrain after " \
           f"{','.join(map(str, after))})"


def plot_growth(daily: pd.DataFrame, gap: pd.DataFrame, spec: ExperimentSpec, after: list[int], path) -> None:
    """Top: the primary metric per arm per A/B day; bottom: the size gap with its CI.
    Dashed lines: the retrain pauses (between the days they separate)."""
    import matplotlib.pyplot as plt

    from experiments.figures import save_figure
    from experiments.report import LABELS

    metric = spec.metrics.primary[0]
    data = daily[daily["metric"] == metric]
    days = sorted(data["day"].unique())
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6.5), sharex=True)
    for arm in spec.arms:
        d = data[data["arm"] == arm]
        top.plot(d["day"], d["value"], marker="o", label=arm)
    top.set(ylabel=f"{LABELS[metric]} per exposed user that day",
            title=f"{LABELS[metric]} per arm per full A/B day, retrained daily")
    top.legend(fontsize=8)
    if not gap.empty:
        g = gap
        bottom.errorbar(g["day"], g["lift"] * 100, yerr=[(g["lift"] - g["ci_low"]) * 100,
                                                          (g["ci_high"] - g["lift"]) * 100],
                        fmt="o-", capsize=4, color="tab:purple")
        bottom.axhline(0, color="grey", lw=1)
        bottom.set(ylabel="lift, %", title=f"{g['arm'].iloc[0]} over {g['baseline'].iloc[0]} that day "
                   f"({g['kind'].iloc[0]}, {spec.metrics.confidence:.0%} CI)")
    else:
        bottom.text(0.5, 0.5, "fewer than two trained sizes: no gap", ha="center", transform=bottom.transAxes)
    for ax in (top, bottom):
        for i, d in enumerate(after):
            ax.axvline(d + 0.5, color="tab:red", ls="--", lw=1, label="retrain" if i == 0 and ax is bottom else None)
    if after and not gap.empty:
        bottom.legend(fontsize=8, loc="best")
    bottom.set_xticks(days)
    bottom.set_xlabel("A/B day (full days); dashed: every trained arm fine-tuned on the log so far")
    save_figure(fig, path)


def _pct(v: float, digits: int = 1) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:+.{digits}%}"
