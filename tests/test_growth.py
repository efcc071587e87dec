"""Alternate growth and pruning: a masked unit is a removed unit, the schedule keeps its
density and ends full-size, resume continues exactly, and the FLOP counter counts the
rows a structured implementation would compute."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ranker.training.data import DAY_MS, load_request_log, split_by_time
from ranker.training.growth import GrowPrune, GrowthConfig, LinearFlopCounter, prunable_groups
from ranker.models.config import SoftmaxConfig
from ranker.models.layers import SoftmaxLayer
from ranker.models import build_model
from ranker.training.checkpoint import GROWTH_FILE, WEIGHTS_FILE, load_checkpoint
from ranker.training.train import TrainConfig, main, masked_bce_sum, train
from tests.support import synthetic_log, write_log

torch.set_num_threads(1)
KW = dict(batch_size=16, lr=3e-3, max_len=32, model_overrides={"dropout": 0.0}, device="cpu",
          checkpoint_every=0)
SCHEDULE = GrowthConfig(density=0.5, update_every=2, swap_fraction=0.5, dense_from=0.6)


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("growth") / "sandbox.duckdb"
    write_log(path, synthetic_log(n_requests=200))
    return path


@pytest.fixture(scope="module")
def split(db_path):
    return split_by_time(load_request_log(db_path), eval_window_ms=DAY_MS)


def _layer(density: float = 0.5) -> tuple[SoftmaxLayer, GrowPrune]:
    torch.manual_seed(0)
    layer = SoftmaxLayer(SoftmaxConfig(n_tracks=10, d_model=8, n_heads=2, dropout=0.0))
    growth = GrowPrune(layer, GrowthConfig(density=density), total_steps=10,
                       optimizer=torch.optim.AdamW(layer.parameters()))
    growth.start(0)
    return layer, growth


def test_a_masked_feed_forward_unit_is_a_removed_unit():
    layer, growth = _layer()
    hidden = growth.masks["ffn"]
    assert int(hidden.sum()) == 16 and int(growth.masks["heads"].sum()) == 1  # half of 32 units, 1 of 2 heads
    x = torch.randn(3, 5, 8)
    w1, b1, w2, b2 = layer.ffn[0].weight, layer.ffn[0].bias, layer.ffn[3].weight, layer.ffn[3].bias
    assert w2[:, ~hidden].abs().max() > 0  # a pruned unit keeps its output column, frozen
    # The structured reference: a feed-forward built from the kept units only.
    expected = F.linear(F.gelu(F.linear(x, w1[hidden], b1[hidden])), w2[:, hidden], b2)
    with torch.no_grad():
        torch.testing.assert_close(layer.ffn(x), expected)


def test_a_prune_and_grow_update_moves_units_and_keeps_the_density():
    torch.manual_seed(0)
    layer = SoftmaxLayer(SoftmaxConfig(n_tracks=10, d_model=8, n_heads=2, dropout=0.0))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    growth = GrowPrune(layer, GrowthConfig(density=0.5, update_every=1, swap_fraction=0.5, implementation="masked"),
                       10, optimizer)
    growth.start(0)
    x = torch.randn(4, 6, 8)
    for step in range(3):
        before = {name: mask.clone() for name, mask in growth.masks.items()}
        optimizer.zero_grad()
        layer.finish(x, layer.attend(*layer.project(x))).pow(2).sum().backward()
        growth.before_step(step)
        optimizer.step()
        growth.after_step(step + 1)
        for name, group in growth.groups.items():
            mask = growth.masks[name]
            assert int(mask.sum()) == int(before[name].sum())  # density kept
            gone = (~mask).nonzero().squeeze(1)
            for _, param, dim, index in group.entries(gone):
                assert optimizer.state[param]["exp_avg"].index_select(dim, index).abs().max() == 0
            for _, param, dim, index in group.rows:
                assert param.index_select(dim, index[gone].flatten()).abs().max() == 0
        if step > 0:
            assert any(not torch.equal(before[n], growth.masks[n]) for n in before), "no units swapped"
    assert growth.swapped > 0


def test_density_one_trains_exactly_like_plain_training(split, tmp_path):
    plain = train(TrainConfig("sasrec", "xs", None, tmp_path / "plain", steps=5, **KW), data=split, progress=False)
    full = train(TrainConfig("sasrec", "xs", None, tmp_path / "full", steps=5, growth=GrowthConfig(density=1.0),
                             **KW), data=split, progress=False)
    assert full.model_version.removeprefix("sasrec-xs-") == plain.model_version.removeprefix("sasrec-xs-")
    assert full.linear_flops["linear_flops_share_done"] == 1.0 and full.growth["units_swapped"] == 0


@pytest.mark.parametrize("family", ["astro", "hstu"])
def test_the_sparse_phase_keeps_pruned_rows_at_zero_and_the_run_ends_full_size(split, tmp_path, family):
    straight = train(TrainConfig(family, "xs", None, tmp_path / "straight", steps=10, growth=SCHEDULE,
                                 **KW), data=split, progress=False)
    assert straight.growth["density_now"] == 1.0 and straight.growth["units_swapped"] > 0
    assert not (tmp_path / "straight" / GROWTH_FILE).exists()  # a full-size model: a plain checkpoint
    load_checkpoint(tmp_path / "straight")
    # Dense for 4 of 10 steps, half the rows before that, so between 0.5 and 1 of the work.
    counted = straight.linear_flops
    assert 0.55 < counted["prunable_flops_done"] / counted["prunable_flops_dense"] < 0.85

    part = train(TrainConfig(family, "xs", None, tmp_path / "resumed", steps=10, stop_after=5, growth=SCHEDULE,
                             **KW), data=split, progress=False)
    assert part.growth["density_now"] == pytest.approx(0.5, abs=0.05)
    masks = load_file(tmp_path / "resumed" / GROWTH_FILE)
    weights = load_file(tmp_path / "resumed" / WEIGHTS_FILE)
    model = build_model(family, "xs", split.train.n_tracks, max_len=32, dropout=0.0)
    groups = prunable_groups(model)
    assert set(masks) == {f"growth_mask.{name}" for name in groups}
    for key, mask in masks.items():
        gone = (~mask.bool()).nonzero().squeeze(1)
        for param_name, _, dim, index in groups[key.removeprefix("growth_mask.")].rows:
            assert weights[param_name].index_select(dim, index[gone].flatten()).abs().max() == 0
    resumed = train(TrainConfig(family, "xs", None, tmp_path / "resumed", steps=10, resume=True, growth=SCHEDULE,
                                **KW), data=split, progress=False)
    assert resumed.model_version == straight.model_version  # the masks came back with the weights

    with pytest.raises(ValueError, match="grow-and-prune"):
        train(TrainConfig(family, "xs", None, tmp_path / "resumed", steps=12, resume=True,
                          **KW), data=split, progress=False)


def test_the_counter_counts_kept_units_of_whole_weights_and_of_row_slices():
    layer, growth = _layer()
    x = torch.randn(2, 5, 8)
    counter = LinearFlopCounter(layer, growth)
    with torch.no_grad(), counter:
        layer.qkv(x)  # all 24 rows of q, k, v: one head of two is kept
        layer.project_kv(x)  # rows 8..23 only, through a slice of the weight
    tokens, width = 10, 8
    assert counter.dense == 2 * width * tokens * (24 + 16)
    assert counter.done == 2 * width * tokens * (12 + 8)
    assert counter.prunable_done == counter.done and counter.summary()["linear_flops_share_done"] == 0.5
    dense = LinearFlopCounter(layer)  # no growth: every unit counts, as in a dense run
    with torch.no_grad(), dense:
        layer.project_kv(x)
    assert dense.done == dense.dense == dense.prunable_done == 2 * width * tokens * 16


def test_bad_growth_settings_are_named(db_path, tmp_path):
    with pytest.raises(ValueError, match="density"):
        GrowthConfig(density=0.0)
    with pytest.raises(ValueError, match="dense_from"):
        GrowthConfig(dense_from=1.5)
    with pytest.raises(ValueError, match=r"unknown growth settings \['densty'\]"):
        GrowthConfig.from_dict({"densty": 0.5})
    out = tmp_path / "cli"
    result = main(["--model", "astro", "--size", "xs", "--db", str(db_path), "--out", str(out), "--steps", "4",
                   "--batch-size", "8", "--max-len", "16", "--device", "cpu", "--checkpoint-every", "0",
                   "--growth", "density=0.25", "--growth", "dense_from=0.5"])
    assert result.growth["density"] == 0.25 and result.growth["dense_step"] == 2
    assert json.loads((out / "checkpoint.json").read_text())["growth"]["density"] == 0.25


def test_grown_rows_learn_again(split, tmp_path):
    """Units that come back are trained: after the dense phase no unit's rows or columns are all zero."""
    result = train(TrainConfig("astro", "xs", None, tmp_path / "grown", steps=10, growth=SCHEDULE,
                               **KW), data=split, progress=False)
    model, _ = load_checkpoint(result.checkpoint)
    for name, group in prunable_groups(model).items():
        for param_name, param, dim, index in group.rows + group.cols:
            if param.dim() == 2:
                per_unit = param.abs().sum(1 - dim)[index].sum(1)
                assert (per_unit > 0).all(), (name, param_name)
    batch = split.eval.batch(np.arange(4), 32)
    assert torch.isfinite(masked_bce_sum(model(batch), batch))


def test_the_study_pairs_three_variants_per_seed_and_reuses_finished_runs(db_path, tmp_path):
    from studies.growth_study import STUDY_FILE, run_study
    from studies.scaling import Budget

    budget = Budget(steps=6, batch_size=16, max_len=32)
    table = run_study(db_path, tmp_path, family="hstu", size="xs", seeds=[0, 1], budget=budget, growth=SCHEDULE,
                      device="cpu", progress=False)
    assert sorted(table.variant.value_counts().items()) == [("dense", 2), ("dense-short", 2), ("grow-prune", 2)]
    for seed in (0, 1):
        runs = table[table.seed == seed].set_index("variant")
        share = runs.loc["grow-prune", "flops_vs_dense"]
        assert 0.5 < share < 1 and runs.loc["dense", "flops_vs_dense"] == 1.0
        assert runs.loc["dense-short", "steps"] == round(share * 6)
    for name in ("growth.md", "growth.csv", "growth.png", "growth.html"):
        assert (tmp_path / name).stat().st_size > 0
    assert "paired by seed" in (tmp_path / "growth.md").read_text()
    lines = (tmp_path / STUDY_FILE).read_text().splitlines()
    again = run_study(db_path, tmp_path, family="hstu", size="xs", seeds=[0, 1], budget=budget, growth=SCHEDULE,
                      device="cpu", progress=False)
    assert (tmp_path / STUDY_FILE).read_text().splitlines() == lines  # nothing retrained
    assert again[["variant", "seed", "val_loss"]].equals(table[["variant", "seed", "val_loss"]])
    # A sweep's screen: another schedule, no dense-short, the dense runs reused.
    sweep = run_study(db_path, tmp_path, family="hstu", size="xs", seeds=[0, 1], budget=budget,
                      growth=replace(SCHEDULE, density=0.25), device="cpu", progress=False, short=False)
    assert sorted(sweep.variant.value_counts().items()) == [("dense", 2), ("grow-prune", 2)]
    assert len((tmp_path / STUDY_FILE).read_text().splitlines()) == len(lines) + 2
    assert "dense-short" not in (tmp_path / "growth.md").read_text()
    lines = (tmp_path / STUDY_FILE).read_text().splitlines()
    # A run recorded under another config (a default changed since) is refused, not reused.
    rows = [json.loads(line) for line in lines]
    rows[0]["config"]["n_rab_buckets"] = 32
    (tmp_path / STUDY_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"hstu-xs in .* another config \(n_rab_buckets: recorded 32, now 48\)"):
        run_study(db_path, tmp_path, family="hstu", size="xs", seeds=[0, 1], budget=budget, growth=SCHEDULE,
                  device="cpu", progress=False)


def test_a_run_stopped_in_its_dense_phase_resumes_exactly(split, tmp_path):
    straight = train(TrainConfig("astro", "xs", None, tmp_path / "straight", steps=10, growth=SCHEDULE,
                                 **KW), data=split, progress=False)
    train(TrainConfig("astro", "xs", None, tmp_path / "late", steps=10, stop_after=8, growth=SCHEDULE,
                      **KW), data=split, progress=False)
    assert not (tmp_path / "late" / GROWTH_FILE).exists()  # dense from step 6: no masks saved
    resumed = train(TrainConfig("astro", "xs", None, tmp_path / "late", steps=10, resume=True, growth=SCHEDULE,
                                **KW), data=split, progress=False)
    assert resumed.model_version == straight.model_version and resumed.growth["density_now"] == 1.0


def test_the_bench_times_the_track_gradients_reference_path_in_the_same_rounds(db_path, tmp_path, monkeypatch):
    """`bench growth --track-gradient both`: dense and sliced with the table's reference
    gradient path join the rounds, share their variant's FLOPs, and get their own ratio."""
    import bench.common
    from bench.growth import run_bench_growth

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)  # keep the repository's figures
    figures = run_bench_growth(db_path, "astro", "xs", steps=4, repeats=1, batch_size=16, max_len=16,
                               floor=False, masked=False, result_name="growth-test", track_gradient="both")
    assert list(figures["run_cpu_seconds"]) == ["dense", "sliced", "dense-sparse", "sliced-sparse"]
    assert figures["linear_flops"]["sliced-sparse"] == figures["linear_flops"]["sliced"]
    assert figures["reference_track_cpu_sliced_vs_dense"] > 0
    assert json.loads((tmp_path / "growth-test.json").read_text())["config"]["track_gradient"] == "both"
    with pytest.raises(ValueError, match="track_gradient"):
        run_bench_growth(db_path, "astro", "xs", steps=4, repeats=1, batch_size=16, max_len=16, track_gradient="lazy")


def test_the_step_profile_times_steady_steps_by_phase_and_forward_part(db_path, tmp_path, monkeypatch):
    """`bench growth-profile`: only steady sparse steps are counted, every phase and the
    forward's parts are there, and the model's methods are restored afterwards."""
    import bench.common
    from bench.growth_profile import PARTS, REST, run_bench_growth_profile
    from ranker.models.hstu import HSTULayer

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    project = HSTULayer.project
    figures = run_bench_growth_profile(db_path, "astro", "s", steps=10, batch_size=8, max_len=16, rounds=1,
                                       growth=GrowthConfig(update_every=3), result_name="profile-test")
    assert HSTULayer.project is project
    sliced = figures["runs"]["sliced"][0]
    assert sliced["steps_counted"] == 2  # steps 5 and 7: 6 is an update, 8 on dense
    assert figures["runs"]["dense"][0]["steps_counted"] == 5
    assert set(sliced["phase_ms"]) == {"batch", "narrow/widen", "forward", "backward", "clip", "AdamW", "grow back"}
    assert {label for _, _, label, _ in PARTS} | {REST} >= set(sliced["forward_part_ms"]) > {REST}
    assert (tmp_path / "profile-test.json").exists()
