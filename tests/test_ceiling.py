"""The oracle's ceiling and popularity's floor on a model's own evaluation impressions."""

from __future__ import annotations

import math

import duckdb
import numpy as np

from ranker.training.ceiling import ORACLE_KEY, POPULARITY_KEY, ceiling_metrics, gap_closed
from ranker.training.data import load_request_log, split_by_time
from sandbox.policy_log import simulate_policy_log
from sandbox.settings import SandboxSettings
from simulator.config import SimConfig


def test_policy_logs_keep_the_oracle_and_it_beats_popularity(tmp_path):
    settings = SandboxSettings(sim=SimConfig(n_users=150, n_tracks=1500, days=2.0, seed=4), out=tmp_path, run_id="c")
    db = simulate_policy_log(settings, "random")
    with duckdb.connect(str(db), read_only=True) as con:
        (n_oracle,) = con.execute("SELECT count(*) FROM oracle_engagement").fetchone()
        (n_impressions,) = con.execute("SELECT count(*) FROM events WHERE behaviour = 'impression'").fetchone()
        (bad,) = con.execute("SELECT count(*) FROM oracle_engagement WHERE engagement < 0 OR engagement > 1").fetchone()
    assert n_oracle == n_impressions > 0 and bad == 0
    data = split_by_time(load_request_log(db))
    ceiling = ceiling_metrics(db, data.train, data.eval)
    assert 0.5 < ceiling[POPULARITY_KEY] < ceiling[ORACLE_KEY] < 1.0, ceiling
    assert 0.6 < ceiling[ORACLE_KEY]  # the oracle knows each user's taste: far above chance


def test_a_log_without_the_oracle_reports_nan(tmp_path):
    settings = SandboxSettings(sim=SimConfig(n_users=80, n_tracks=800, days=2.0, seed=4), out=tmp_path, run_id="c")
    db = simulate_policy_log(settings, "random")
    with duckdb.connect(str(db)) as con:
        con.execute("DELETE FROM oracle_engagement WHERE request_id % 2 = 0")
    data = split_by_time(load_request_log(db))
    ceiling = ceiling_metrics(db, data.train, data.eval)
    assert math.isnan(ceiling[ORACLE_KEY]) and not math.isnan(ceiling[POPULARITY_KEY])


def test_gap_closed():
    assert np.isclose(gap_closed(0.6, 0.5, 0.7), 0.5)
    assert np.isclose(gap_closed(0.5, 0.5, 0.7), 0.0) and np.isclose(gap_closed(0.7, 0.5, 0.7), 1.0)
    assert math.isnan(gap_closed(0.6, 0.5, float("nan"))) and math.isnan(gap_closed(0.6, 0.7, 0.7))
