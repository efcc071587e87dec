"""Choosing an ASTRO variant for long histories (issue 24): `climber train --test-window-h`
keeps the test window unseen; `climber paired-gauc` scores checkpoints on the same window and
pairs each with its seed's baseline (studies.paired_gauc); `climber bench serve-long --set`
times the variant against HSTU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ranker.training.data import load_request_log, split_by_time
from tests.support import HOUR_MS, synthetic_log, write_log

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("paired") / "sandbox.duckdb"
    write_log(path, synthetic_log(n_requests=160))
    return path


def _train(db_path, out, seed: int, *window: str) -> None:
    from ranker.training.train import main

    main(["--model", "astro", "--size", "xs", "--db", str(db_path), "--out", str(out), "--steps", "2",
          "--batch-size", "8", "--max-len", "16", "--device", "cpu", "--checkpoint-every", "0",
          "--seed", str(seed), "--set", "d_model=16", *window])


def test_the_test_window_is_left_out_of_train_and_eval(db_path, tmp_path):
    from ranker.training.checkpoint import read_checkpoint_meta
    from studies.paired_gauc import window_log

    _train(db_path, tmp_path / "val", 0, "--eval-window-h", "12", "--test-window-h", "24")
    meta = read_checkpoint_meta(tmp_path / "val")
    full = load_request_log(db_path)
    test_cutoff = split_by_time(full, 24 * HOUR_MS).cutoff_ts
    validation = window_log(db_path, 12, 24)
    assert len(validation) and validation.request_ts.max() < test_cutoff  # nothing from the test window
    assert meta["cutoff_ts"] <= validation.request_ts.min()  # the eval split scored is the one trained against
    assert validation.request_ts.max() - meta["cutoff_ts"] < 12 * HOUR_MS
    assert meta["test_window_ms"] == 24 * HOUR_MS
    # without the flag, the eval window is the last 12 h of the whole log, as before
    assert window_log(db_path, 12).request_ts.max() == full.request_ts.max()


def test_each_checkpoint_is_paired_with_its_seeds_baseline(db_path, tmp_path):
    from studies.paired_gauc import compare, markdown

    for name, seed in (("base0", 0), ("base1", 1), ("other1", 1)):
        _train(db_path, tmp_path / name, seed, "--eval-window-h", "24")
    bases = [tmp_path / "base0", tmp_path / "base1"]
    out = compare(db_path, bases, [tmp_path / "other1", tmp_path / "base0"], eval_window_h=24, resamples=200)
    pair_other, pair_self = out["pairs"]
    assert pair_other["base"] == str(tmp_path / "base1")  # seed 1 against seed 1
    assert pair_self["difference"] == 0.0 and pair_self["difference_ci95"] == [0.0, 0.0]
    (pooled,) = out["pooled"].values()  # both others are the same model: one average over the two seed pairs
    assert pooled["seeds"] == 2 and np.isclose(pooled["difference"], pair_other["difference"] / 2)
    gaucs = out["checkpoints"]
    assert np.isclose(pair_other["gauc_other"] - pair_other["gauc_base"], pair_other["difference"])
    assert np.isclose(pair_other["gauc_other"], gaucs[str(tmp_path / "other1")]["gauc"])
    assert "vs base1" in markdown(out) and out["requests"] == len(split_by_time(load_request_log(db_path),
                                                                                  24 * HOUR_MS).eval)
    # the command: several checkpoints after one --base / --other, as the frozen configs write them
    from typer.testing import CliRunner

    from sandbox.cli import app

    written = tmp_path / "paired.json"
    result = CliRunner().invoke(app, ["paired-gauc", "--db", str(db_path), "--base", *map(str, bases),
                                      "--other", str(tmp_path / "other1"), "--eval-window-h", "24", "--json", str(written)])
    assert result.exit_code == 0, result.output
    assert json.loads(written.read_text())["pairs"][0]["difference"] == pair_other["difference"]


def test_serve_long_times_a_variant_beside_the_baselines():
    from bench.serve_long import bench_lengths

    rows = bench_lengths(("xs",), (8, 16), 4, torch.device("cpu"), ("astro", "hstu"), min_seconds=0.0, min_reps=1,
                         overrides={"astro": {"partition": "behaviour", "candidate_path": "shared"}})
    assert [(r["family"], r["n"]) for r in rows] == [("astro", 8), ("hstu", 8), ("astro", 16), ("hstu", 16)]
    astro, hstu = rows[2], rows[3]
    assert astro["cold_ms"] > 0 and hstu["cold_ms"] > 0
    # two behaviour blocks with the shared candidate stack cost what that model counts, not xs's one block
    assert astro["cold_mflops"] != hstu["cold_mflops"]
