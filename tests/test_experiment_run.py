"""The experiment as a product: the file, the run end to end, the report, and calibration.

Calibration runs one simulated world (popularity in two arms, the oracle in a third) and
re-randomises the two popularity arms' users with 200 salts: an A/A test whose
false-positive rate at alpha 5% must land in 3%-7% for each primary metric, with and
without CUPED; the oracle arm is an injected effect of known sign.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml

from experiments.assignment import assign_arms
from experiments.evaluate import compare, evaluate
from experiments.runner import run_experiment
from experiments.spec import ExperimentSpec, load_spec
from experiments.user_table import user_table

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "experiments" / "examples" / "model_sizes.yaml"


def test_shipped_examples_validate():
    spec = load_spec(EXAMPLE)
    trained = spec.trained_arms()
    assert spec.control == "control" and spec.arms["control"].ranker == "popularity"
    assert len({(a.family, a.size) for a in trained.values()}) >= 3  # at least three ASTRO sizes
    assert all(a.family == "astro" for a in trained.values())
    baseline = load_spec(REPO / "experiments" / "examples" / "baselines.yaml")
    assert not baseline.trained_arms()


def test_the_full_size_example_is_the_shipped_one_with_more_users_and_data_and_the_same_rules():
    """model_sizes_full.yaml differs from the shipped example only in its name, salt and scale:
    the same arms, budget rule and metrics, so its figures answer the shipped example's question."""
    small, full = load_spec(EXAMPLE), load_spec(REPO / "experiments" / "examples" / "model_sizes_full.yaml")
    assert full.sim["n_users"] > small.sim["n_users"] and full.phases.warm_up.days > small.phases.warm_up.days
    assert full.phases.ab.days >= small.phases.ab.days and full.sim["user_model"] == small.sim["user_model"]
    assert full.phases.warm_up.model_copy(update={"days": 1}) == small.phases.warm_up.model_copy(update={"days": 1})
    assert full.arms == small.arms and full.control == small.control and full.metrics == small.metrics
    assert full.phases.train == small.phases.train  # one budget rule for every size, as in the shipped file


def test_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"phases\.ab\.days: Input should be greater than or equal to 1"):
        load_spec(EXAMPLE, ["phases.ab.days=0"])
    with pytest.raises(ValueError, match=r"arms\.big: .*'zz' is not a astro size"):
        load_spec(EXAMPLE, ["arms.big={family: astro, size: zz}"])
    with pytest.raises(ValueError, match=r"arms\.other\.ranker: .*unknown ranker 'nope'"):
        load_spec(EXAMPLE, ["arms.other=nope"])
    with pytest.raises(ValueError, match=r"sim: .*seed is set by the experiment"):
        load_spec(EXAMPLE, ["sim.seed=3"])
    with pytest.raises(ValueError, match=r"control: 'nobody' is not one of the arms"):
        load_spec(EXAMPLE, ["control=nobody"])
    with pytest.raises(ValueError, match=r"--set expects KEY=VALUE"):
        load_spec(EXAMPLE, ["seed"])


def test_set_overrides_edit_nested_fields():
    spec = load_spec(EXAMPLE, ["sim.n_users=77", "phases.ab.days=3", "seed=9", "metrics.primary=[plays]"])
    assert spec.sim_config().n_users == 77 and spec.sim_config().seed == 9
    assert spec.phases.ab.days == 3 and spec.days == spec.phases.warm_up.days + 3
    assert spec.metrics.primary == ["plays"]


def _tiny(name: str) -> ExperimentSpec:
    return load_spec(EXAMPLE, [f"name={name}", "sim.n_users=120", "sim.n_tracks=1500", "phases.warm_up.days=1",
                               "phases.ab.days=1", "phases.train.batch_size=32",
                               "arms={control: popularity, astro_xs: {family: astro, size: xs}}"])


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiments")
    first = run_experiment(_tiny("tiny"), out / "a", progress=False)
    second = run_experiment(_tiny("tiny"), out / "b", progress=False)
    return first, second


def test_run_writes_the_record_and_is_reproducible(tiny_runs):
    first, second = tiny_runs
    con = duckdb.connect(str(first / "sandbox.duckdb"), read_only=True)
    try:
        meta = con.execute("SELECT * FROM experiment").df().iloc[0]
        requests = con.execute("SELECT arm, model_name, min(ts) AS first, max(ts) AS last FROM requests "
                               "GROUP BY ALL ORDER BY first").df()
        cache = con.execute("SELECT * FROM kv_cache").df()
        lookups = con.execute("SELECT arm, outcome, count(*) AS n, min(bytes) AS b FROM kv_cache_lookups "
                              "GROUP BY ALL").df()
        models = con.execute("SELECT * FROM arm_models").df()
        regret = con.execute("SELECT arm, avg(best - served) AS r, min(best - served) AS lo FROM regret "
                             "GROUP BY arm").df()
    finally:
        con.close()
    assert (first / "checkpoints" / "astro_xs" / "checkpoint.json").exists()
    assert (first / "warm_up.duckdb").exists()
    # warm-up: the logging policy for everyone; A/B: each arm's own ranker from ab_start_ts on
    warm = requests[requests["model_name"] == "popularity+explore"]
    assert set(warm["arm"]) == {"control", "astro_xs"} and (warm["last"] < meta["ab_start_ts"]).all()
    ab = requests[requests["model_name"] != "popularity+explore"]
    assert set(ab["model_name"]) == {"popularity", "astro_xs"} and (ab["first"] >= meta["ab_start_ts"]).all()
    assert list(models["arm"]) == ["astro_xs"] and models["flops_per_request"].iloc[0] > 0
    assert list(cache["arm"]) == ["astro_xs"]
    assert cache["hits"].iloc[0] + cache["incremental"].iloc[0] + cache["rebuilds"].iloc[0] > 0
    # every lookup logged, so `climber bench cache` can replay the cache at other budgets
    logged = {outcome: n for outcome, n in zip(lookups["outcome"], lookups["n"])}
    assert set(lookups["arm"]) == {"astro_xs"} and (lookups["b"] > 0).all()
    assert logged.get("rebuild", 0) == cache["rebuilds"].iloc[0] and logged.get("hit", 0) == cache["hits"].iloc[0]
    assert logged.get("incremental", 0) == cache["incremental"].iloc[0]
    assert (regret["lo"] >= -1e-9).all()  # nobody beats the oracle's own slate of the same candidates
    other = duckdb.connect(str(second / "sandbox.duckdb"), read_only=True)
    try:
        assert other.execute("SELECT event_log_hash FROM experiment").fetchone()[0] == meta["event_log_hash"]
    finally:
        other.close()


def test_report_is_rebuilt_from_duckdb_alone(tiny_runs):
    run = tiny_runs[0]
    for name in ("report.html", "lift.png", "daily.png", "lift_vs_flops.png", "sequential.png", "regret.png"):
        (run / name).unlink(missing_ok=True)  # the run command writes them; the report command must too
    result = subprocess.run([sys.executable, "-m", "sandbox.cli", "experiment", "report", str(run)],
                            capture_output=True, text=True, cwd=REPO, env={"COLUMNS": "80", "PATH": "/usr/bin:/bin",
                                                                           "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    for name in ("report.html", "lift.png", "daily.png", "lift_vs_flops.png", "sequential.png", "regret.png"):
        assert (run / name).exists(), name
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert "astro_xs against control" in result.stdout and "KV cache" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert {r["metric"] for r in summary["lifts"]} >= {"full_plays", "listening_minutes", "full_play_rate"}
    ev = evaluate(run / "sandbox.duckdb")
    assert set(ev.daily["day"]) == {1}  # one A/B day, and only full days
    # library plays are no ranker's: the per-user table only counts events of ranked requests
    con = duckdb.connect(str(run / "sandbox.duckdb"), read_only=True)
    ranked = con.execute("SELECT count(*) FROM events e JOIN requests r USING (request_id) "
                         "WHERE e.behaviour = 'full_play' AND r.ts >= $s",
                         {"s": int(ev.meta["ab_start_ts"])}).fetchone()[0]
    con.close()
    assert ev.users["full_plays"].sum() == ranked


def test_the_sequential_plot_draws_a_lift_outside_its_running_always_valid_interval(tmp_path):
    """The always-valid interval is intersected over the looks, so a later day's lift can fall
    outside it (a 16,000-user run's report once failed on exactly this)."""
    import types

    import pandas as pd

    from experiments.report import plot_sequential

    sequential = pd.DataFrame({"day": [1, 2], "arm": "astro_m", "metric": "full_plays", "lift": [0.20, 0.05],
                               "ci_low": [0.10, 0.01], "ci_high": [0.30, 0.09],
                               "seq_low": [0.08, 0.08], "seq_high": [0.32, 0.12], "seq_p": [0.01, 0.01]})
    ev = types.SimpleNamespace(sequential=sequential, control="control",
                               spec=types.SimpleNamespace(metrics=types.SimpleNamespace(primary=["full_plays"])))
    path = plot_sequential(ev, tmp_path / "sequential.png")
    assert path is not None and path.stat().st_size > 0


def test_a_run_folder_that_is_not_an_experiment_is_not_replaced(tmp_path):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an experiment run folder"):
        run_experiment(_tiny("tiny"), tmp_path, progress=False)
    assert (tmp_path / "tiny" / "precious.txt").exists()


# -- calibration ----------------------------------------------------------------------------------

# User model 2: its oracle arm ranks per item, the regret's own yardstick, so its regret is 0;
# model 3's (the default) orders for within-slate fatigue, which the per-item regret leaves out.
CALIBRATION = {"name": "calibration", "salt": "calibration-salt", "seed": 5,
               "sim": {"n_users": 2500, "n_tracks": 3000, "user_model": 2},
               "phases": {"warm_up": {"days": 1, "exploration": 0.2}, "ab": {"days": 1}},
               "control": "control", "arms": {"control": "popularity", "twin": "popularity", "oracle": "oracle"}}


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    spec = ExperimentSpec.model_validate(CALIBRATION)
    run = run_experiment(spec, tmp_path_factory.mktemp("calibration"), progress=False)
    con = duckdb.connect(str(run / "sandbox.duckdb"), read_only=True)
    try:
        meta = con.execute("SELECT * FROM experiment").df().iloc[0]
        ab = user_table(con, meta["ab_start_ts"], meta["end_ts"])
        warm = user_table(con, meta["start_ts"], meta["ab_start_ts"])
    finally:
        con.close()
    return spec, run, ab, warm


@pytest.mark.parametrize("cuped", [False, True])
def test_aa_false_positive_rate_is_nominal(calibration, cuped):
    spec, _, ab, warm = calibration
    pool = ab[ab["arm"].isin(["control", "twin"])].reset_index(drop=True)  # one policy: popularity
    assert len(pool) > 800
    for metric in spec.metrics.primary:
        covariate = warm.set_index("user_id")[metric] if cuped else None
        rejections = 0
        for salt in range(200):
            users = pool.assign(arm=assign_arms(pool["user_id"].to_numpy(), "aa", f"aa-{salt}", {"a": 1, "b": 1}))
            row = compare(users, "a", "b", metric, covariate, 0.95)
            rejections += (row["cuped_p"] if cuped else row["p_value"]) < 0.05
        assert 0.03 <= rejections / 200 <= 0.07, (metric, cuped, rejections)


def test_injected_effect_is_detected_with_the_right_sign(calibration):
    spec, run, ab, warm = calibration
    ev = evaluate(run / "sandbox.duckdb")
    oracle = ev.lifts[(ev.lifts["baseline"] == "control") & (ev.lifts["arm"] == "oracle")].set_index("metric")
    for metric in spec.metrics.primary:
        assert oracle.loc[metric, "cuped_lift"] > 0 and oracle.loc[metric, "p_holm"] < 0.01
    twin = ev.lifts[(ev.lifts["baseline"] == "control") & (ev.lifts["arm"] == "twin")]
    assert (twin["p_holm"] > 0.05).all()  # the A/A arm inside the run shows nothing
    regret = ev.regret.set_index("arm")["regret"]
    assert regret["oracle"] == pytest.approx(0, abs=1e-9) and regret["control"] > 0
    assert not ev.srm.mismatch


def test_every_ab_report_shows_the_oracle_arm_as_the_ceiling(calibration, tmp_path):
    """`climber ab`, the experiment report's tables, report.html and a plot: the oracle arm's
    full-play rate and each arm's share of the popularity -> oracle gap (issue 23)."""
    from typer.testing import CliRunner

    from experiments.report import CEILING_TITLE, ceiling, write_report
    from sandbox.cli import app

    _, run, _, _ = calibration
    ev = evaluate(run / "sandbox.duckdb")
    top = ceiling(ev).set_index("arm")
    assert top.loc["oracle", "ranker"] == "oracle (ceiling)" and top.loc["oracle", "gap_closed"] == pytest.approx(1)
    assert top.loc["control", "full_play_rate"] < top.loc["oracle", "full_play_rate"]
    assert top.loc["control", "gap_closed"] == pytest.approx(0)  # control is the popularity arm the gap starts at
    out = CliRunner().invoke(app, ["ab", str(run / "sandbox.duckdb")], env={"COLUMNS": "80"})
    assert out.exit_code == 0, out.output
    assert "oracle arm as the ceiling" in out.output and "100.0%" in out.output
    assert "gap closed: (arm - control) / (oracle - control)" in out.output
    assert max(len(line) for line in out.output.splitlines()) <= 80
    page = write_report(ev, tmp_path).read_text()
    assert CEILING_TITLE in page and "ceiling.png" in page and (tmp_path / "ceiling.png").stat().st_size > 0
    assert ev.retrains.empty and "Growth with daily retraining" not in page  # no retrains: no growth plot
    assert not (tmp_path / "growth.png").exists()


def test_retrain_every_fine_tunes_each_trained_arm_and_hot_reloads_it(tmp_path):
    spec = load_spec(EXAMPLE, ["name=retrain", "sim.n_users=60", "sim.n_tracks=800", "phases.warm_up.days=1",
                               "phases.ab.days=2", "phases.train.batch_size=16", "phases.train.steps=6",
                               "phases.retrain_every=1d", "phases.retrain.steps=3",
                               "arms={control: popularity, astro_xs: {family: astro, size: xs}, "
                               "astro_s: {family: astro, size: s}}"])
    assert spec.phases.retrain_every == 1
    run = run_experiment(spec, tmp_path, progress=False)
    con = duckdb.connect(str(run / "sandbox.duckdb"), read_only=True)
    try:
        retrains = con.execute("SELECT * FROM retrains").df()
        trained = con.execute("SELECT model_version FROM arm_models WHERE arm = 'astro_xs'").fetchone()[0]
        served = con.execute("SELECT model_version, min(ts) AS first, max(ts) AS last, count(*) AS n FROM requests "
                             "WHERE arm = 'astro_xs' AND model_name = 'astro_xs' GROUP BY ALL ORDER BY first").df()
    finally:
        con.close()
    assert list(retrains["arm"]) == ["astro_xs", "astro_s"] and list(retrains["day"]) == [2, 2]  # after A/B day 1
    row = retrains.set_index("arm").loc["astro_xs"]
    assert row["resumed_from"] == trained and row["model_version"] != trained and row["steps"] == 3
    assert (run / "checkpoints" / "astro_xs-day2" / "checkpoint.json").exists()
    # Every A/B request names the version that scored it: the first model, then the fine-tuned one.
    assert list(served["model_version"]) == [trained, row["model_version"]]
    assert served["last"].iloc[0] < row["ts"] <= served["first"].iloc[1]
    with pytest.raises(ValueError, match="retrain_every"):
        load_spec(EXAMPLE, ["phases.retrain_every=0"])
    check_growth_report(run)


def check_growth_report(run: Path) -> None:
    """The report of a retraining run: the primary metric per arm per A/B day, the gap of
    the largest size over the smallest with its CI, the retrain marked; in 80 columns."""
    from rich.console import Console

    from experiments.report import report

    ev = evaluate(run / "sandbox.duckdb")
    gap = ev.daily_gap
    assert list(gap["day"]) == [1, 2] and set(gap["arm"]) == {"astro_s"} and set(gap["baseline"]) == {"astro_xs"}
    assert (gap["ci_low"] <= gap["lift"]).all() and (gap["lift"] <= gap["ci_high"]).all()
    con = duckdb.connect(str(run / "sandbox.duckdb"), read_only=True)
    try:  # day 2's users alone, warm-up full plays as the covariate: the same figure
        ab = int(ev.meta["ab_start_ts"])
        day2 = user_table(con, ab + 86_400_000, ab + 2 * 86_400_000)
        warm = user_table(con, int(ev.meta["start_ts"]), ab).set_index("user_id")["full_plays"]
    finally:
        con.close()
    direct = compare(day2, "astro_xs", "astro_s", "full_plays", warm, 0.95)
    assert gap.iloc[1]["kind"] == "CUPED" and gap.iloc[1]["lift"] == pytest.approx(direct["cuped_lift"])
    console = Console(width=80, record=True, file=io.StringIO())
    page = report(run, console).read_text()
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "Growth with daily retraining" in text and "Gap s vs xs by day: " in text and "(retrain after 1)" in text
    assert "growth.png" in page and (run / "growth.png").stat().st_size > 0
