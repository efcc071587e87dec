"""`climber scaling-seeds`: ladders that differ only in the seed, combined and compared."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from studies.scaling_seeds import combine, goal_per_rung, loss_trends, per_rung, versus
from sandbox.cli import app

FLOPS = {("astro", "xs"): 10, ("astro", "s"): 40, ("hstu", "xs"): 5, ("hstu", "s"): 50}


def _ladder(folder, seed: int, gauc: dict, loss: dict, epochs: float = 1.0, overrides: dict | None = None):
    """A finished ladder folder as `climber scaling` leaves it (scaling.csv, ladder.jsonl)."""
    folder.mkdir(parents=True)
    rows, lines = [], []
    for (family, size), flops in FLOPS.items():
        rows.append({"family": family, "size": size, "params": 1000, "flops_per_request": flops,
                     "compute": flops * 3e6, "steps": 10, "train_s": 1.0, "val_loss": loss[family, size],
                     "ndcg@10": 0.5, "auc_full_play": 0.7, "gauc_full_play": gauc[family, size]})
        key = {"family": family, "size": size, "seed": seed, "epochs": epochs, "steps": None, "batch_size": 64,
               "lr": 0.001, "max_len": 64}
        if overrides and family in overrides:  # `climber scaling --set FAMILY:KEY=VALUE`
            key["overrides"] = overrides[family]
        lines.append(json.dumps({"key": json.dumps(key, sort_keys=True), "metrics": {}}))
    pd.DataFrame(rows).to_csv(folder / "scaling.csv", index=False)
    (folder / "ladder.jsonl").write_text("\n".join(lines) + "\n")
    return folder


LOSS = {("astro", "xs"): 0.95, ("astro", "s"): 0.93, ("hstu", "xs"): 0.96, ("hstu", "s"): 0.96}


@pytest.fixture
def ladders(tmp_path):
    # astro is ahead at both rungs on every seed, but costs more than hstu at xs.
    return [_ladder(tmp_path / "seed0", 0, {("astro", "xs"): 0.70, ("astro", "s"): 0.72,
                                            ("hstu", "xs"): 0.69, ("hstu", "s"): 0.70}, LOSS),
            _ladder(tmp_path / "seed1", 1, {("astro", "xs"): 0.68, ("astro", "s"): 0.71,
                                            ("hstu", "xs"): 0.67, ("hstu", "s"): 0.71}, LOSS)]


def test_means_paired_differences_and_the_goal_per_rung(ladders):
    runs = combine(ladders)
    table = per_rung(runs)
    astro_xs = table[(table["family"] == "astro") & (table["size"] == "xs")].iloc[0]
    assert astro_xs["seeds"] == 2 and astro_xs["gauc_full_play"] == pytest.approx(0.69)
    assert astro_xs["gauc_full_play_std"] == pytest.approx(0.01414, abs=1e-4)
    against = versus(runs).set_index("size")
    assert against.loc["xs", "mean_delta_gauc"] == pytest.approx(0.01) and against.loc["xs", "seeds_ahead"] == 2
    assert against.loc["s", "mean_delta_gauc"] == pytest.approx(0.01) and against.loc["s", "seeds_ahead"] == 1
    assert against.loc["xs", "flops_ratio"] == 2 and against.loc["s", "flops_ratio"] == pytest.approx(0.8)
    goal = goal_per_rung(versus(runs)).set_index("size")["goal_met"]
    assert not goal["xs"] and goal["s"]  # ahead at xs, but at twice the FLOPs
    trends, fits = loss_trends(table)
    falls = trends.set_index("family")["falls_at_every_rung"]
    assert falls["astro"] and not falls["hstu"]  # flat is not falling


def test_ladders_that_differ_in_more_than_the_seed_are_refused(tmp_path, ladders):
    other = _ladder(tmp_path / "other", 2, {k: 0.7 for k in FLOPS}, LOSS, epochs=2.0)
    with pytest.raises(ValueError, match="epochs"):
        combine([ladders[0], other])
    with pytest.raises(ValueError, match="given twice"):
        combine([ladders[0], ladders[0]])
    with pytest.raises(FileNotFoundError, match="not a finished ladder"):
        combine([ladders[0], tmp_path / "nothing"])


def test_ladders_with_one_familys_overrides_combine_and_other_overrides_are_refused(tmp_path):
    gauc = {k: 0.7 for k in FLOPS}
    blocks = {"astro": {"partition": "behaviour"}}
    runs = combine([_ladder(tmp_path / "a", 0, gauc, LOSS, overrides=blocks),
                    _ladder(tmp_path / "b", 1, gauc, LOSS, overrides=blocks)])
    assert set(runs["seed"]) == {0, 1}
    with pytest.raises(ValueError, match="overrides"):
        combine([_ladder(tmp_path / "c", 0, gauc, LOSS, overrides=blocks),
                 _ladder(tmp_path / "d", 1, gauc, LOSS, overrides={"astro": {"partition": "scenario"}})])


def test_the_command_writes_its_reports(ladders, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["scaling-seeds", *map(str, ladders), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("seeds.csv", "versus.csv", "seeds.md", "seeds.png", "seeds.html"):
        assert (out / name).stat().st_size > 0
    assert "ahead of every baseline" in (out / "seeds.md").read_text()
