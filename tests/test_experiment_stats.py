"""The experiment's statistics against known values: scipy's t-test, an OLS fit, statsmodels' Holm,
and the mSPRT interval's defining equation and error rate under peeking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.multitest import multipletests

from experiments.evaluate import compare, lift_table
from experiments.stats import cuped_lift, holm, msprt, running, welch_p


def _users(rng, n=400, lift=0.0):
    """Two arms of per-user counts with a pre-period covariate that predicts them."""
    x = rng.gamma(2.0, 5.0, size=2 * n)
    arm = np.array(["control"] * n + ["treatment"] * n)
    y = 0.8 * x + rng.normal(0, 3, size=2 * n) + 5
    y[n:] *= 1 + lift
    return pd.DataFrame({"user_id": np.arange(2 * n), "arm": arm, "full_plays": y, "impressions": x + 20,
                         "full_played_impressions": np.minimum(y, x + 20)}), pd.Series(x, index=np.arange(2 * n))


def test_plain_test_is_scipy_welch_t_test():
    users, _ = _users(np.random.default_rng(0), lift=0.05)
    row = compare(users, "control", "treatment", "full_plays", None, 0.95)
    c, t = users[users.arm == "control"].full_plays, users[users.arm == "treatment"].full_plays
    assert row["p_value"] == pytest.approx(stats.ttest_ind(t, c, equal_var=False).pvalue, rel=1e-12)
    assert row["lift"] == pytest.approx(t.mean() / c.mean() - 1)
    assert welch_p(c, t) == pytest.approx(stats.ttest_ind(c, t, equal_var=False).pvalue)


def test_cuped_difference_is_the_ols_arm_coefficient():
    users, x = _users(np.random.default_rng(1), lift=0.03)
    c, t = users.arm == "control", users.arm == "treatment"
    adjusted = cuped_lift(users.full_plays[c], x[c], users.full_plays[t], x[t])
    design = sm.add_constant(np.column_stack([t.astype(float), x - x.mean()]))
    fit = sm.OLS(users.full_plays.to_numpy(), design).fit()
    assert adjusted.difference == pytest.approx(fit.params[1], rel=1e-10)
    assert adjusted.theta == pytest.approx(fit.params[2], rel=1e-10)
    # Welch on adjusted values vs OLS's classical t-test: same question, near-identical answer.
    assert adjusted.p_value == pytest.approx(fit.pvalues[1], rel=0.05)
    # x explains most of y's variance here: CUPED removes it (1 - Var(adj)/Var(y) ~ R^2).
    assert adjusted.variance_reduction > 0.6
    assert adjusted.lift.ci_high - adjusted.lift.ci_low < (
        compare(users, "control", "treatment", "full_plays", None, 0.95)["ci_high"]
        - compare(users, "control", "treatment", "full_plays", None, 0.95)["ci_low"])


def test_cuped_with_a_useless_covariate_changes_almost_nothing():
    rng = np.random.default_rng(2)
    y_c, y_t = rng.normal(10, 2, 500), rng.normal(10, 2, 500)
    adjusted = cuped_lift(y_c, rng.normal(size=500), y_t, rng.normal(size=500))
    assert abs(adjusted.variance_reduction) < 0.02
    assert adjusted.difference == pytest.approx(y_t.mean() - y_c.mean(), abs=0.05)


def test_holm_matches_statsmodels_and_a_hand_computed_case():
    p = np.array([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, 0.02])
    rng = np.random.default_rng(3)
    many = rng.uniform(size=50) ** 3
    np.testing.assert_allclose(holm(many), multipletests(many, method="holm")[1])


def test_lift_table_adjusts_over_every_metric_and_pair():
    users, x = _users(np.random.default_rng(4), lift=0.1)
    warm = pd.DataFrame({"user_id": users.user_id, "full_plays": x.to_numpy()})
    frame = lift_table(users, warm, [("control", "treatment")], ["full_plays", "full_play_rate"], 0.95)
    assert np.isnan(frame.loc[frame.metric == "full_play_rate", "cuped_p"]).all()  # ratios: no CUPED
    tested = frame["cuped_p"].where(frame["cuped_p"].notna(), frame["p_value"])
    np.testing.assert_allclose(frame["p_holm"], multipletests(tested, method="holm")[1])


def test_msprt_interval_solves_its_defining_equation():
    est, se, tau, alpha = 0.04, 0.02, 0.1, 0.05
    look = msprt(est, se, tau, alpha)
    v, t2 = se**2, tau**2
    for edge in (look.low, look.high):  # the likelihood ratio of the edge is exactly 1 / alpha
        log_lambda = 0.5 * np.log(v / (v + t2)) + (est - edge) ** 2 * t2 / (2 * v * (v + t2))
        assert np.exp(log_lambda) == pytest.approx(1 / alpha)
    fixed = stats.norm.ppf(0.975) * se
    assert look.high - est > fixed  # wider than the fixed-horizon interval: the price of peeking


def test_msprt_keeps_the_error_rate_under_daily_peeking():
    """Under H0 with 10 looks, stopping at the first exclusion of 0: the always-valid
    interval errs at most alpha; the fixed-horizon one errs far more often."""
    rng = np.random.default_rng(5)
    sims, looks, per_look = 2000, 10, 50
    z = rng.normal(size=(sims, looks * per_look))
    always = fixed = 0
    for row in z:
        sums = np.cumsum(row)[per_look - 1::per_look]
        n = np.arange(1, looks + 1) * per_look
        estimates, ses = sums / n, 1 / np.sqrt(n)
        seq = running([msprt(e, s, tau=0.2) for e, s in zip(estimates, ses)])
        always += any(s.low > 0 or s.high < 0 for s in seq)
        fixed += any(abs(e / s) > 1.96 for e, s in zip(estimates, ses))
    assert always / sims <= 0.05
    assert fixed / sims > 0.1
