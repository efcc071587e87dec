"""The cheaper parts of a training step compute what the plain ones do: the flat token
gather, the dropout mask, the track table's sparse-rows gradient and the clip."""

from __future__ import annotations

import copy

import pytest
import torch

from ranker.models import build_model
from ranker.models.layers import Dropout, gather_tokens, gather_tokens_reference
from ranker.training.step_cost import TrackGradient, clip_gradients
from ranker.training.train import adamw, masked_bce_sum
from tests.support import TINY_ASTRO, TINY_TRACKS, batch_with_edge_cases


@pytest.mark.parametrize("trailing", [(), (3,), (4, 5)])
def test_gather_tokens_matches_take_along_dim(trailing):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 9, *trailing, generator=gen, dtype=torch.float64).requires_grad_()
    index = torch.randint(0, 9, (3, 6), generator=gen)
    weights = torch.randn(3, 6, *trailing, generator=gen, dtype=torch.float64)
    fast, slow = gather_tokens(x, index), gather_tokens_reference(x, index)
    assert torch.equal(fast, slow)
    grad_fast, = torch.autograd.grad((fast * weights).sum(), x)
    grad_slow, = torch.autograd.grad((slow * weights).sum(), x)
    torch.testing.assert_close(grad_fast, grad_slow)  # repeated indices: summed in another order
    sliced = torch.randn(3, 9, 2, 4, generator=gen)[:, :, 1]  # a non-contiguous view, as tau[:, :, b]
    assert torch.equal(gather_tokens(sliced, index), gather_tokens_reference(sliced, index))
    empty = torch.zeros(3, 0, dtype=torch.long)
    assert gather_tokens(x, empty).shape == (3, 0, *trailing)


def test_dropout_zeroes_a_share_p_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.rand(400_000) + 1.0
    drop = Dropout(0.25)
    y = drop(x.requires_grad_())
    zero = y == 0
    assert abs(zero.float().mean().item() - 0.25) < 0.005  # 400k draws: sd 0.0007
    torch.testing.assert_close(y[~zero], x[~zero] / 0.75)
    grad, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (~zero).float() / 0.75)  # the same mask, backward
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.0)


def test_clip_gradients_is_clip_grad_norm():
    gen = torch.Generator().manual_seed(1)
    for max_norm in (0.5, 100.0):  # clips, and does not
        params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, q in zip(params, twins):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        expected = torch.nn.utils.clip_grad_norm_(twins, max_norm)
        assert torch.equal(clip_gradients(params, max_norm), expected)
        for p, q in zip(params, twins):
            assert torch.equal(p.grad, q.grad)
    params[0].grad[0, 0] = float("inf")  # not finite: multiplied as clip_grad_norm_ does
    twins[0].grad[0, 0] = float("inf")
    clip_gradients(params, 1.0)
    torch.nn.utils.clip_grad_norm_(twins, 1.0)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)


@pytest.mark.parametrize("implementation", ["rows", "sparse"])
def test_track_gradient_is_the_dense_lookups_gradient(implementation):
    """Three AdamW steps with the clip: the rows written into one reused buffer give the
    dense lookups' gradients and weights (a row's history and candidate terms are summed in
    another order, hence assert_close), and the buffer is the same tensor every step.
    "rows" zeroes only the rows the last step wrote: a stale row would show here."""
    torch.manual_seed(0)
    dense = build_model("astro", "s", TINY_TRACKS, **TINY_ASTRO)
    fast = copy.deepcopy(dense)
    runs = [(dense, TrackGradient(dense, enabled=False)), (fast, TrackGradient(fast, implementation=implementation))]
    optimizers = [adamw(model.parameters(), 1e-2, 0.1, torch.device("cpu")) for model, _ in runs]
    pointers = set()
    for step in range(3):
        batch = batch_with_edge_cases(seed=step)
        labels = torch.Generator().manual_seed(step)
        batch.labels = (torch.rand(*batch.candidate_tracks.shape, 4, generator=labels) < 0.3).float()
        for (model, track), optimizer in zip(runs, optimizers):
            loss = masked_bce_sum(model(batch), batch) / int(batch.candidate_mask.sum())
            optimizer.zero_grad(set_to_none=True)
            track.attach()
            loss.backward()
            clip_gradients(model.parameters(), 0.05)
            optimizer.step()
        pointers.add(fast.embed.track.weight.grad.data_ptr())
        assert fast.embed.track.weight.grad.layout == torch.strided
        for (name, p), q in zip(dense.named_parameters(), fast.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert len(pointers) == 1
    assert fast.embed.track.sparse == (implementation == "sparse")
    with torch.no_grad():  # no gradient wanted: a plain lookup, nothing written
        written = len(runs[1][1].written)
        torch.testing.assert_close(fast.embed.track(batch.candidate_tracks), dense.embed.track(batch.candidate_tracks))
        assert len(runs[1][1].written) == written
    runs[1][1].close()
    assert not fast.embed.track.sparse and "forward" not in fast.embed.track.__dict__
    with pytest.raises(ValueError, match="track gradient implementation"):
        TrackGradient(fast, implementation="lazy")
