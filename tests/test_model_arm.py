"""A trained model as an A/B arm: train on one run's log, serve it in the next run's loop."""

from __future__ import annotations

import duckdb
import pytest
from pydantic import ValidationError

from ranker.training.train import TrainConfig, train
from sandbox.loop import run_sandbox
from sandbox.settings import ExperimentSettings, SandboxSettings
from simulator.config import SimConfig

CATALOG = dict(n_users=60, n_tracks=600, days=1.0, seed=3)  # same catalog for both runs


@pytest.mark.slow
def test_checkpoint_arm_ranks_in_the_closed_loop(tmp_path):
    first = run_sandbox(SandboxSettings(sim=SimConfig(**CATALOG), out=tmp_path, run_id="history"))
    trained = train(TrainConfig("astro", "xs", first.db_path, tmp_path / "astro-xs", steps=4, batch_size=16,
                                max_len=64, eval_window_ms=6 * 3600 * 1000), progress=False)

    experiment = ExperimentSettings(rankers={"control": "popularity",
                                             "treatment": f"checkpoint:{trained.checkpoint}"})
    second = run_sandbox(SandboxSettings(sim=SimConfig(**CATALOG), out=tmp_path, run_id="ab", experiment=experiment))
    con = duckdb.connect(str(second.db_path), read_only=True)
    models = dict(con.execute("SELECT arm, any_value(model_name) FROM impressions GROUP BY arm").fetchall())
    versions = {v for (v,) in con.execute("SELECT DISTINCT model_version FROM requests WHERE arm = 'treatment'").fetchall()}
    con.close()
    assert models == {"control": "popularity", "treatment": "astro-xs"}
    assert versions == {trained.model_version}
    assert set(second.arm_metrics.index) == {"control", "treatment"}


def test_unknown_ranker_or_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(ValidationError, match="unknown ranker 'magic'"):
        ExperimentSettings(rankers={"control": "popularity", "treatment": "magic"})
    with pytest.raises(ValidationError, match="not a checkpoint folder"):
        ExperimentSettings(rankers={"control": "popularity", "treatment": f"checkpoint:{tmp_path}"})
