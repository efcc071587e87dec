"""Frozen, dated configs (configs/): every file still parses with today's CLI and resolves
its models to the configs recorded with the figures, drift is named, and reproduce runs."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from sandbox.cli import app
from sandbox.frozen import check_frozen, freeze_models, frozen_paths, load_frozen, write_frozen

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results.md"
HISTORY = ROOT / "docs" / "history"
TINY_SIM = "climber simulate --users 20 --tracks 200 --days 0.2 --seed 3 --out {out} --run-id tiny"


@pytest.mark.parametrize("path", frozen_paths(), ids=lambda p: p.stem)
def test_every_frozen_config_still_reproduces_with_todays_code(path):
    config = load_frozen(path)
    assert check_frozen(config, path) == []
    assert config.commit and config.steps
    assert report_problems(config.reports) == [], path.name


def report_problems(reports: str) -> list[str]:
    """What is wrong with a frozen config's `reports` ('docs/results.md, "Heading"'): the file
    must be docs/results.md (current figures) or a journal under docs/history/ (superseded
    ones), and each quoted section must start a heading of that file, so a reader can go both
    ways."""
    name = reports.split(",")[0].strip()
    path = ROOT / name
    if path != RESULTS and path.parent != HISTORY:
        return [f"{name!r} is neither docs/results.md nor a journal in docs/history/"]
    if not path.is_file():
        return [f"{name} does not exist"]
    headings = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    sections = re.findall(r'"([^"]+)"', reports)
    if not sections:
        return [f"{reports!r} names no section in quotes"]
    return [f"no heading {s!r} in {name}" for s in sections if not any(h.startswith(s) for h in headings)]


def test_a_report_naming_a_section_that_exists_nowhere_or_in_the_wrong_file_is_refused():
    journal = next(HISTORY.glob("*.md")).relative_to(ROOT)
    assert report_problems('docs/results.md, "Issue 4: TURBO serving"') == []
    assert report_problems('docs/results.md, "No such section anywhere"') == [
        "no heading 'No such section anywhere' in docs/results.md"]
    superseded = '"Scaling ladder with two behaviour blocks"'  # moved to the journal
    assert report_problems(f"docs/results.md, {superseded}") != []
    assert report_problems(f"{journal}, {superseded}") == []
    assert report_problems(f'{journal}, "No such section anywhere"') != []
    assert report_problems('docs/astro.md, "Issue 4: TURBO serving"') != []
    assert report_problems("docs/results.md") != []


def test_every_config_results_md_names_exists_and_reports_its_current_figures_there():
    """docs/results.md holds current figures only: a config it names must report to it, not to the journal."""
    for name in sorted(set(re.findall(r"configs/([\w.-]+\.yaml)", RESULTS.read_text()))):
        path = ROOT / "configs" / name
        assert path.is_file(), f"docs/results.md names {name}, which is not in configs/"
        reports = load_frozen(path).reports
        assert reports.split(",")[0].strip() == "docs/results.md", f"{name} reports to {reports}"


def _config(tmp_path, steps, **fields):
    path = tmp_path / "2026-12-06-probe.yaml"
    data = {**dict(id="2026-12-06-probe", date="2026-12-06", reports="a test", machine="here", commit="abc1234",
                   steps=steps, user_model=3), **fields}  # measured on the default (None: the date says)
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_step_that_no_longer_parses_is_named_with_its_problem(tmp_path):
    path = _config(tmp_path, ["climber bench sim --users 10", "climber bench sim --users ten",
                              "climber train --model astro --size s --db x.duckdb --out y --no-such-flag",
                              "climber nonsense", "climber bench", "python -c pass", "climber bench sim --help",
                              "climber train -h"])
    problems = check_frozen(load_frozen(path), path)  # help would print usage and exit mid-check
    assert len(problems) == 7
    assert all(problems[i].startswith(f"step {i + 2}") and "--help" in problems[i] for i in (5, 6))
    assert problems[0].startswith("step 2") and "ten" in problems[0]
    assert problems[1].startswith("step 3") and "--no-such-flag" in problems[1]
    assert problems[2].startswith("step 4") and "nonsense" in problems[2]
    assert problems[3].startswith("step 5") and "subcommand" in problems[3]
    assert problems[4].startswith("step 6") and "not a climber command" in problems[4]


def test_a_changed_default_fails_the_check_and_names_the_field(tmp_path):
    step = "climber train --model hstu --size xs --db x.duckdb --out y --max-len 32 --set dropout=0.2"
    path = _config(tmp_path, [step])
    assert "no recorded config" in check_frozen(load_frozen(path), path)[0]
    frozen = freeze_models(load_frozen(path), n_tracks=500)
    write_frozen(frozen, path)
    assert check_frozen(load_frozen(path), path) == []
    recorded = frozen.models[0]
    assert recorded.overrides == {"max_len": 32, "dropout": 0.2} and recorded.config["n_tracks"] == 500
    # As if the size table had changed since the figures were measured:
    recorded.config["d_model"] += 8
    write_frozen(frozen, path)
    problems = check_frozen(load_frozen(path), path)
    assert len(problems) == 1 and "d_model: recorded" in problems[0] and "hstu xs" in problems[0]


def test_a_sequence_override_matches_its_recorded_model_after_the_yaml_round_trip(tmp_path):
    """`--set` parses a list into a tuple (config fields are tuples); YAML gives the recorded
    override back as a list. Both name the same model, so the file checks clean."""
    groups = '[["full_play","like","share","add_to_playlist"],["play","skip","dislike"]]'
    step = f"climber train --model astro --size xs --db x.duckdb --out y --set partition=behaviour --set 'behaviour_groups={groups}'"
    path = _config(tmp_path, [step])
    write_frozen(freeze_models(load_frozen(path), n_tracks=500), path)
    assert check_frozen(load_frozen(path), path) == []


def test_growth_steps_pin_model_overrides_with_set(tmp_path):
    """growth-study and bench growth take --set, so their frozen steps can pin a default."""
    steps = ["climber growth-study --db x.duckdb --out y --family astro --size s --set partition=scenario",
             "climber bench growth --db x.duckdb --family hstu --size xs --set dropout=0.2"]
    path = _config(tmp_path, steps)
    frozen = freeze_models(load_frozen(path), n_tracks=500)
    assert [m.overrides for m in frozen.models] == [{"max_len": 64, "partition": "scenario"},
                                                   {"max_len": 64, "dropout": 0.2}]
    assert frozen.models[0].config["partition"] == "scenario"


def test_a_recorded_model_no_step_trains_and_a_misnamed_file_are_reported(tmp_path):
    path = _config(tmp_path, ["climber bench sim"], id="2026-12-04-other",
                   models=[dict(family="astro", size="s", config={"n_tracks": 5})])
    problems = check_frozen(load_frozen(path), path)
    assert any("is not the file name" in p for p in problems)
    assert any("does not start with its date" in p for p in problems)
    assert any("trained by no step" in p for p in problems)
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: x\nsteps: []\n")
    with pytest.raises(ValueError, match="date"):
        load_frozen(bad)


def test_reproduce_runs_the_steps_and_stops_at_a_failing_one(tmp_path):
    path = _config(tmp_path, [TINY_SIM.format(out=tmp_path / "runs")])
    result = CliRunner().invoke(app, ["reproduce", str(path)])
    assert result.exit_code == 0, result.output
    assert "[1/1]" in result.output
    con = duckdb.connect(str(tmp_path / "runs" / "tiny" / "sandbox.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] > 0
    con.close()
    failing = _config(tmp_path, [f"climber ab {tmp_path / 'missing.duckdb'} --control a", "climber bench sim"])
    result = CliRunner().invoke(app, ["reproduce", str(failing)])
    assert result.exit_code == 1 and "step 1 exited" in result.output and "[2/2]" not in result.output


def test_freezing_models_writes_and_checks_but_runs_no_step(tmp_path):
    """Recording the configs of a study that has run must not run it again."""
    path = _config(tmp_path, [TINY_SIM.format(out=tmp_path / "runs"),
                              f"climber train --model hstu --size xs --db {tmp_path / 'runs'}/tiny/sandbox.duckdb "
                              f"--out {tmp_path / 'm'} --steps 1"])
    result = CliRunner().invoke(app, ["reproduce", "--freeze-models", "200", str(path)])
    assert result.exit_code == 0, result.output
    assert "2 steps parse, 1 recorded model configs match" in result.output
    assert not (tmp_path / "runs").exists() and len(load_frozen(path).models) == 1


def test_an_experiment_step_runs_on_the_user_model_its_figures_were_measured_on(tmp_path):
    example = yaml.safe_load((Path(__file__).resolve().parent.parent / "experiments" / "examples"
                              / "model_sizes.yaml").read_text())
    assert example["sim"]["user_model"] == 3  # the shipped example names its simulator
    del example["sim"]["user_model"]
    unpinned = tmp_path / "unpinned.yaml"
    unpinned.write_text(yaml.safe_dump(example))
    step = f"climber experiment run {unpinned}"

    def pin_problems(step: str, **fields) -> list[str]:
        return [p for p in check_frozen(load_frozen(_config(tmp_path, [step], **fields))) if "user model" in p]

    # Measured on model 1 (named, though the date is model 2's): the default would run model 2.
    assert pin_problems(step, user_model=1) == [
        f"step 1 ({step}): measured on simulator user model 1; pin it with `sim.user_model: 1` "
        "in its experiment file or `--set sim.user_model=1`"]
    assert pin_problems(f"{step} --set sim.user_model=1", user_model=1) == []
    assert pin_problems(f"env CLIMBER_SIM__USER_MODEL=1 {step}", user_model=1) == []
    assert pin_problems(step) == []  # measured on model 3, the default
    # Dated on model 2's day, nothing named: measured on model 2, which is no longer the default.
    assert [p for p in pin_problems(step, user_model=None) if "user model 2" in p] != []
    assert pin_problems(f"{step} --set sim.user_model=2", user_model=None) == []
    # The file's own pin wins over the environment, both when run and when checked.
    assert pin_problems(f"env CLIMBER_SIM__USER_MODEL=1 {step} --set sim.user_model=2", user_model=1) != []
    with pytest.raises(ValueError, match="user_model"):
        load_frozen(_config(tmp_path, [step], user_model=4))
