"""The experiment's statistics beyond a single lift: CUPED, Holm, always-valid intervals.

- The plain test of a per-user metric is Welch's t-test of the difference in means
  (scipy.stats.ttest_ind): lift = 0 exactly when the difference is 0, and the t-test needs
  no delta-method approximation. The interval of the relative lift stays the delta method's.
- CUPED (Deng et al. 2013) as regression adjustment: Y_adj = Y - theta (X - mean X), with X
  the user's warm-up value of the same metric and theta the within-arm OLS slope of Y on X
  (the fit of Y ~ 1 + arm + X). The difference of adjusted means is exactly OLS's arm
  coefficient; the relative lift and its interval then follow experiments.analysis
  (Welch, delta method). Variance reduction = 1 - pooled within-arm Var(Y_adj) / Var(Y).
- Holm's step-down adjustment over the whole family of (metric, arm pair) tests, from
  statsmodels.stats.multitest.
- The mSPRT always-valid interval (Johari et al. 2017, normal mixture with scale tau) for
  a lift estimate theta_hat with variance V:
      theta_hat +- sqrt( V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)) ),
  intersected over the looks so far; its always-valid p-value is the running minimum of
  1 / Lambda. Looking after every A/B day and stopping at the first exclusion keeps the
  error rate at alpha, which the fixed-horizon interval does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.multitest import multipletests

from experiments.analysis import Lift, mean_lift


@dataclass(frozen=True)
class CupedLift:
    lift: Lift  # of the adjusted metric
    theta: float
    variance_reduction: float  # 1 - Var(adjusted) / Var(raw), pooled within arms
    difference: float  # mean_t - mean_c of the adjusted metric (= OLS arm coefficient)
    p_value: float  # Welch's t-test of that difference


def _within_variance(groups: list[np.ndarray]) -> float:
    dof = sum(len(g) - 1 for g in groups)
    return float(sum(((g - g.mean()) ** 2).sum() for g in groups) / dof)


def cuped_theta(y_c: np.ndarray, x_c: np.ndarray, y_t: np.ndarray, x_t: np.ndarray) -> float:
    """Within-arm OLS slope of Y on X (the X coefficient of Y ~ 1 + arm + X)."""
    xs = [np.asarray(x_c, float) - np.mean(x_c), np.asarray(x_t, float) - np.mean(x_t)]
    ys = [np.asarray(y_c, float) - np.mean(y_c), np.asarray(y_t, float) - np.mean(y_t)]
    sxx = sum((x * x).sum() for x in xs)
    return float(sum((x * y).sum() for x, y in zip(xs, ys)) / sxx) if sxx > 0 else 0.0


def cuped_lift(y_c, x_c, y_t, x_t, metric: str = "mean", confidence: float = 0.95) -> CupedLift:
    """Relative lift of a per-user mean adjusted by its pre-period covariate."""
    y_c, x_c, y_t, x_t = (np.asarray(a, np.float64) for a in (y_c, x_c, y_t, x_t))
    if len(y_c) != len(x_c) or len(y_t) != len(x_t):
        raise ValueError(f"{metric}: the covariate needs one value per user")
    theta = cuped_theta(y_c, x_c, y_t, x_t)
    x_mean = np.concatenate([x_c, x_t]).mean()
    adj_c, adj_t = y_c - theta * (x_c - x_mean), y_t - theta * (x_t - x_mean)
    raw = _within_variance([y_c, y_t])
    reduction = 1 - _within_variance([adj_c, adj_t]) / raw if raw > 0 else 0.0
    return CupedLift(mean_lift(adj_c, adj_t, metric, confidence), theta, float(reduction),
                     float(adj_t.mean() - adj_c.mean()), welch_p(adj_c, adj_t))


def welch_p(control, treatment) -> float:
    """Two-sided p of Welch's t-test of a difference in means (lift = 0 is difference = 0)."""
    c, t = np.asarray(control, float), np.asarray(treatment, float)
    if c.var() == 0 and t.var() == 0:  # e.g. active days in a one-day test: nothing varies
        return 1.0 if c.mean() == t.mean() else 0.0
    p = stats.ttest_ind(t, c, equal_var=False).pvalue
    return float(p) if np.isfinite(p) else 1.0


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (family-wise error), aligned with the input."""
    p = np.asarray(p_values, np.float64)
    if not len(p):
        return p
    return multipletests(p, method="holm")[1]


@dataclass(frozen=True)
class Sequential:
    low: float
    high: float
    p_value: float  # always-valid


def msprt(estimate: float, se: float, tau: float, alpha: float = 0.05) -> Sequential:
    """The mSPRT interval and p-value at one look (not yet intersected over looks)."""
    if se <= 0 or not np.isfinite(se):
        return Sequential(estimate, estimate, 1.0 if estimate == 0 else 0.0)
    v, t2 = se**2, tau**2
    half = float(np.sqrt(v * (v + t2) / t2 * (2 * np.log(1 / alpha) + np.log((v + t2) / v))))
    log_lambda = 0.5 * np.log(v / (v + t2)) + estimate**2 * t2 / (2 * v * (v + t2))
    return Sequential(estimate - half, estimate + half, float(min(1.0, np.exp(-log_lambda))))


def running(looks: list[Sequential]) -> list[Sequential]:
    """Each look's interval intersected with every earlier one; p-values as running minima."""
    out, low, high, p = [], -np.inf, np.inf, 1.0
    for look in looks:
        low, high, p = max(low, look.low), min(high, look.high), min(p, look.p_value)
        out.append(Sequential(low, high, p))
    return out
