"""Sliced sparse phases against the masked reference: the same loss, the same gradients
and the same optimizer steps on the same batches, for every family and block attention;
the FLOP counter counts both alike; regrow="restore" brings back the pruned weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from ranker.training.data import DAY_MS, load_request_log, split_by_time
from ranker.training.growth import GrowPrune, GrowthConfig, LinearFlopCounter
from ranker.training.train import masked_bce_sum
from ranker.models import build_model
from tests.support import synthetic_log, write_log

torch.set_num_threads(1)
CASES = {  # family, size, overrides: every stack a slice runs through
    "astro": ("astro", "s", {}),
    "astro-softmax": ("astro", "xs", {"block_attention": "softmax", "n_layers": 2}),
    "sasrec": ("sasrec", "xs", {}),
    "hstu": ("hstu", "s", {}),
    # norm_in after the sliced heads' output. Size xs with two layers: at s, one entry of a
    # time-gap row first reached at step 4 gets a gradient of ~7e-9 (the two paths 2e-9
    # apart), below AdamW's eps, which turns that rounding into steps 3e-4 apart.
    "hstu-post": ("hstu", "xs", {"norm": "post", "n_layers": 2}),
}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = tmp_path_factory.mktemp("sliced") / "sandbox.duckdb"
    write_log(path, synthetic_log(n_requests=120))
    return split_by_time(load_request_log(path), eval_window_ms=DAY_MS)


def _pair(split, family, size, overrides, cfg, weight_decay=0.01):
    torch.manual_seed(0)
    model = build_model(family, size, split.train.n_tracks, max_len=32, dropout=0.0, **overrides)
    runs = []
    for implementation in ("masked", "sliced"):
        copy_ = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(copy_.parameters(), lr=1e-2, weight_decay=weight_decay, fused=True)  # the trainer's
        grow = GrowPrune(copy_, GrowthConfig(**{**cfg, "implementation": implementation}), 20, optimizer, seed=3)
        grow.start(0)
        runs.append((copy_, optimizer, grow))
    return runs


def _step(model, optimizer, grow, batch, step):
    grow.prepare(step)
    loss = masked_bce_sum(model(batch), batch) / int(batch.candidate_mask.sum())  # the trainer's mean
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grow.before_step(step)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads.update(grow.full_gradients())  # sliced: the narrowed weights' gradients in full shape
    optimizer.step()
    grow.after_step(step + 1)
    return loss.detach(), grads


def _meaningful(name: str, param: torch.Tensor) -> torch.Tensor:
    """bool mask of the entries whose value means something. A softmax key bias adds the
    same logit to every key of a query, so its true gradient is zero: Adam turns the
    rounding noise there into steps of their own, differently in the two paths."""
    keep = torch.ones_like(param, dtype=torch.bool)
    if name.endswith("qkv.bias"):
        d = param.shape[0] // 3
        keep[d:2 * d] = False
    return keep


@pytest.mark.parametrize("case", list(CASES))
def test_sliced_and_masked_give_the_same_loss_and_gradients(split, case):
    family, size, overrides = CASES[case]
    cfg = dict(density=0.5, update_every=2, swap_fraction=0.5, dense_from=0.3)  # updates at 2 and 4, dense from 6
    (masked, opt_m, grow_m), (sliced, opt_s, grow_s) = _pair(split, family, size, overrides, cfg)
    assert grow_s.density() == pytest.approx(0.5, abs=0.1)
    for step in range(7):
        batch = split.train.batch(np.arange(8 * step, 8 * step + 8), 32)
        if step in (1, 3):  # a sparse, non-update step: the sliced path really runs smaller
            n_params = sum(p.numel() for p in masked.parameters())
            grow_s.prepare(step)
            assert any(module.slices for module in sliced.modules() if hasattr(module, "slices"))
            assert sum(p.numel() for p in sliced.parameters()) < n_params
            assert sum(p.numel() for group in opt_s.param_groups for p in group["params"]) < n_params
        loss_m, grads_m = _step(masked, opt_m, grow_m, batch, step)
        loss_s, grads_s = _step(sliced, opt_s, grow_s, batch, step)
        torch.testing.assert_close(loss_s, loss_m)
        assert grads_s.keys() == grads_m.keys()
        for name in grads_m:
            torch.testing.assert_close(grads_s[name], grads_m[name], atol=1e-4, rtol=1e-4,
                                           msg=lambda text, name=name, step=step: f"step {step}, {name}: {text}")
        for name in grow_m.masks:  # the same units chosen at the updates
            assert torch.equal(grow_m.masks[name], grow_s.masks[name]), (step, name)
    assert grow_s.is_dense and grow_s.swapped == grow_m.swapped > 0
    assert not any(module.slices for module in sliced.modules() if hasattr(module, "slices"))
    params_m = dict(masked.named_parameters())
    for name, param in sliced.named_parameters():  # full shapes again, the same weights and moments
        keep = _meaningful(name, param)
        torch.testing.assert_close(param[keep], params_m[name][keep], atol=1e-4, rtol=1e-4,
                                   msg=lambda text, name=name: f"{name}: {text}")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            state_s, state_m = opt_s.state[param][key], opt_m.state[params_m[name]][key]
            if key != "step":
                state_s, state_m = state_s[keep], state_m[keep]
            torch.testing.assert_close(state_s, state_m, atol=1e-5, rtol=1e-4, msg=lambda text, name=name: f"{name}: {text}")
    batch = split.eval.batch(np.arange(8), 32)
    with torch.no_grad():
        torch.testing.assert_close(sliced.eval()(batch), masked.eval()(batch), atol=1e-4, rtol=1e-4)


def test_frozen_columns_decay_alike_while_left_out(split):
    """Sliced, a pruned unit's output columns are out of the optimizer; the masked path
    decays them (AdamW's weight decay, zero gradient): widening applies the same decay."""
    cfg = dict(density=0.5, update_every=100, dense_from=1.0)
    (masked, opt_m, grow_m), (sliced, opt_s, grow_s) = _pair(split, "astro", "s", {}, cfg, weight_decay=0.5)
    for step in range(3):
        batch = split.train.batch(np.arange(8 * step, 8 * step + 8), 32)
        for model, optimizer, grow in ((masked, opt_m, grow_m), (sliced, opt_s, grow_s)):
            for group in optimizer.param_groups:
                group["lr"] = 0.01 * (step + 1)  # a schedule: the decay factor changes per step
            _step(model, optimizer, grow, batch, step)
    grow_s.release()
    for name, group in grow_s.groups.items():
        gone = (~grow_s.masks[name]).nonzero().squeeze(1)
        for (_, param_s, dim, index), (_, param_m, _, _) in zip(group.cols, grow_m.groups[name].cols):
            columns = index[gone].flatten()
            decayed = param_m.index_select(dim, columns)
            assert decayed.abs().sum() > 0
            torch.testing.assert_close(param_s.index_select(dim, columns), decayed)


def test_a_pruned_unit_is_a_removed_unit_and_the_counter_counts_both_paths_alike(split):
    (masked, _, grow_m), (sliced, _, grow_s) = _pair(split, "sasrec", "xs", {}, dict(density=0.5))
    batch = split.train.batch(np.arange(8), 32)
    counters = []
    for model, grow in ((masked, grow_m), (sliced, grow_s)):
        grow.prepare(1)
        counter = LinearFlopCounter(model, grow)
        with torch.no_grad(), counter:
            model(batch)
        counters.append(counter.summary())
    assert counters[0] == counters[1]
    # Half the heads and half the hidden units: a bit over half of the prunable work remains
    # (the residual-writing rows are not pruned, only their inputs).
    share = counters[0]["prunable_flops_done"] / counters[0]["prunable_flops_dense"]
    assert 0.45 < share < 0.6
    dense = LinearFlopCounter(masked)
    with torch.no_grad(), dense:
        masked(batch)
    assert dense.summary()["linear_flops_dense"] == counters[0]["linear_flops_dense"] == dense.done


def test_restore_brings_back_the_weights_a_unit_had_when_pruned(split):
    torch.manual_seed(0)
    model = build_model("hstu", "xs", split.train.n_tracks, max_len=32, dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grow = GrowPrune(model, GrowthConfig(density=0.5, dense_from=0.5, regrow="restore"), 4, optimizer)
    grow.start(0)
    name = next(iter(grow.masks))
    gone = (~grow.masks[name]).nonzero().squeeze(1)
    rows = grow.groups[name].rows[0]
    assert rows[1].index_select(0, rows[3][gone].flatten()).abs().max() == 0
    grow.after_step(2)  # dense_step: every unit back, as it was
    torch.testing.assert_close(rows[1].index_select(0, rows[3][gone].flatten()),
                               before[rows[0]].index_select(0, rows[3][gone].flatten()))
    with pytest.raises(ValueError, match="regrow"):
        GrowthConfig(regrow="zeros")


def test_resume_from_continues_a_full_size_model_on_a_newer_log(tmp_path):
    from ranker.training.checkpoint import OPTIMIZER_FILE, read_checkpoint_meta
    from ranker.training.train import main

    old, new = tmp_path / "old.duckdb", tmp_path / "new.duckdb"
    write_log(old, synthetic_log(n_requests=120, seed=0))
    write_log(new, synthetic_log(n_requests=120, seed=1))
    common = ["--db", str(old), "--batch-size", "8", "--device", "cpu", "--checkpoint-every", "0", "--steps", "4"]
    first = main(["--model", "hstu", "--size", "xs", "--max-len", "16", "--out", str(tmp_path / "day0"),
                  "--grow-prune", "--growth", "update_every=2", *common])
    assert first.growth["density_now"] == 1.0  # offline phase: grow-and-prune, ending full size
    # lr 0: the continued model must be exactly the one it continued (weights loaded), and
    # AdamW's step count goes on from the first run's (optimizer state loaded).
    common[1] = str(new)
    again = main(["--resume-from", str(tmp_path / "day0"), "--out", str(tmp_path / "day1"), "--lr", "0", *common])
    assert again.model_version.split("-")[-1] == first.model_version.split("-")[-1]
    state = torch.load(tmp_path / "day1" / OPTIMIZER_FILE, weights_only=True)["optimizer"]["state"]
    assert float(next(iter(state.values()))["step"]) == 8
    meta = read_checkpoint_meta(tmp_path / "day1")
    assert meta["resumed_from"]["model_version"] == first.model_version and meta["family"] == "hstu"
    later = main(["--resume-from", str(tmp_path / "day1"), "--out", str(tmp_path / "day2"), *common])
    assert later.model_version != again.model_version and np.isfinite(later.metrics["loss"])
    with pytest.raises(ValueError, match="grow-and-prune applies to the offline"):
        main(["--resume-from", str(tmp_path / "day1"), "--out", str(tmp_path / "x"), "--grow-prune", *common])
    with pytest.raises(ValueError, match="max_len 16"):
        main(["--resume-from", str(tmp_path / "day1"), "--out", str(tmp_path / "x"), "--max-len", "32", *common])
