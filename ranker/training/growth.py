"""Alternate growth and pruning during training, after arXiv 2105.01064 (Du et al., 2021).

The paper trains a recommendation model that is sparse most of the time, alternately
pruning and growing structured parts of it, and ends with the full-size model so that
recurring training can start from it. Its body is not available to us, so this is our
interpretation (documented in `docs/growth.md`):

- Units are output rows of the prunable Linear layers: every Linear inside a transformer
  layer (softmax or HSTU-style) and the task heads' hidden layer. A pruned row produces 0,
  so a pruned feed-forward hidden unit is exactly a removed neuron (tested). Embeddings,
  the temperature MLP, the block gate and the task logits stay dense: they are the model's
  contract (one logit per task, tau per block) or lookups with no FLOPs to save.
- Step 0 prunes every prunable layer to `density` by row magnitude. Every `update_every`
  steps a prune-and-grow update replaces a share of each layer's active rows: the ones
  with the smallest weight norm go, the inactive ones with the largest gradient norm on
  this batch come back (small random weights, zero bias, fresh optimizer state), so the
  density stays put
  while the sparse structure moves. The share starts at `swap_fraction` and decays (cosine)
  to 0 at `dense_from`.
- At `dense_from` of the budget every row grows back the same way and training finishes dense:
  the checkpoint is an ordinary full-size model.

Rows grow at `grow_init` times a fresh Linear's init scale, not at zero: in attention a
query channel and its key channel multiply, so both at zero have zero gradient and would
never learn again. The random draw comes from a generator seeded by (seed, step, layer),
so a resumed run grows the same rows to the same values as a straight one.

Masked training on dense hardware does the full matmuls, so wall time is not what this
saves here; the FLOPs a structured implementation would do are counted per Linear call
(`LinearFlopCounter`), for the prunable layers and for all Linear layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ranker.models.hstu import HSTULayer
from ranker.models.layers import SoftmaxLayer, TaskHeads
from ranker.models.config import refuse_unknown_fields

STATE_PREFIX = "growth_mask."


@dataclass(frozen=True)
class GrowthConfig:
    density: float = 0.5  # share of each prunable layer's rows active while sparse
    update_every: int = 20  # steps between prune-and-grow updates
    swap_fraction: float = 0.3  # share of active rows replaced at the first update
    dense_from: float = 0.75  # share of the budget after which the model is full-size
    grow_init: float = 0.1  # a grown row's init scale, relative to nn.Linear's 1/sqrt(fan_in)

    def __post_init__(self) -> None:
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"growth density must be in (0, 1], got {self.density}")
        if self.update_every < 1:
            raise ValueError(f"growth update_every must be >= 1, got {self.update_every}")
        if not 0.0 <= self.swap_fraction <= 1.0:
            raise ValueError(f"growth swap_fraction must be in [0, 1], got {self.swap_fraction}")
        if not 0.0 <= self.dense_from <= 1.0:
            raise ValueError(f"growth dense_from must be in [0, 1], got {self.dense_from}")
        if self.grow_init < 0:
            raise ValueError(f"growth grow_init must be >= 0, got {self.grow_init}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GrowthConfig":
        refuse_unknown_fields(cls, data, "growth settings")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers whose output rows are units, by parameter name prefix."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, (SoftmaxLayer, HSTULayer)):
            for sub, linear in module.named_modules():
                if isinstance(linear, nn.Linear):
                    found[f"{name}.{sub}" if name else sub] = linear
        elif isinstance(module, TaskHeads):
            found[f"{name}.net.1" if name else "net.1"] = module.net[1]  # the hidden layer; net.3 gives the task logits
    return found


def _row_norms(linear: nn.Linear, of_grad: bool) -> torch.Tensor:  # [out]
    weight = linear.weight.grad if of_grad else linear.weight
    if weight is None:
        return torch.zeros(linear.out_features, device=linear.weight.device)
    norms = weight.detach().float().pow(2).sum(1)
    bias = linear.bias.grad if of_grad else linear.bias
    if bias is not None:
        norms = norms + bias.detach().float().pow(2)
    return norms


class GrowPrune:
    """Masks, schedule and bookkeeping of one training run; the trainer calls
    `before_step` after backward (gradients all-reduced) and `after_step` after the
    optimizer step. Under DDP every rank sees the same weights and gradients, so every
    rank picks the same rows."""

    def __init__(self, model: nn.Module, cfg: GrowthConfig, total_steps: int, optimizer: torch.optim.Optimizer,
                 seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.layers = prunable_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no prunable layers")
        self.optimizer = optimizer
        self.dense_step = math.ceil(cfg.dense_from * total_steps)  # from this step on, no row is masked
        self.masks = {name: torch.ones(layer.out_features, dtype=torch.bool, device=layer.weight.device)
                      for name, layer in self.layers.items()}
        self.swapped = 0  # rows replaced by prune-and-grow updates so far

    # -- what the trainer calls

    def start(self, step: int) -> None:
        """Prune to `density` by magnitude when training starts sparse (not on resume)."""
        if step == 0 and self.dense_step > 0 and self.cfg.density < 1.0:
            for name, layer in self.layers.items():
                keep = self._n_active(layer)
                top = _row_norms(layer, of_grad=False).topk(keep).indices
                self.masks[name] = torch.zeros_like(self.masks[name]).index_fill_(0, top, True)
            self._apply_masks()

    def before_step(self, step: int) -> None:
        """At an update step, swap rows by the batch's gradients; then keep masked rows'
        gradients out of the clip norm and the optimizer. With zero gradients and zero
        moments, AdamW leaves a zeroed row at exactly zero, so masked rows need no
        re-zeroing after each step: only rows pruned now are zeroed, here."""
        if step >= self.dense_step:  # every row is on from dense_step: nothing to mask
            return
        if step > 0 and step % self.cfg.update_every == 0:
            self._prune_and_grow(self.swap_share(step), step)
        for name, layer in self.layers.items():
            gone = ~self.masks[name]
            for param in (layer.weight, layer.bias):
                if param is not None and param.grad is not None:
                    param.grad[gone] = 0.0

    def after_step(self, step_done: int) -> None:
        """`step_done` optimizer steps have run; at `dense_step` every row grows back."""
        if step_done == self.dense_step and not self.is_dense:
            for index, (name, layer) in enumerate(self.layers.items()):
                self._grow_rows(index, layer, (~self.masks[name]).nonzero().squeeze(1), step_done)
                self.masks[name] = torch.ones_like(self.masks[name])

    # -- schedule and state

    def swap_share(self, step: int) -> float:
        """Cosine decay from swap_fraction at step 0 to 0 at dense_step."""
        return self.cfg.swap_fraction * 0.5 * (1 + math.cos(math.pi * step / self.dense_step))

    @property
    def is_dense(self) -> bool:
        return all(bool(m.all()) for m in self.masks.values())

    def density(self) -> float:
        """Share of prunable rows active now."""
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {STATE_PREFIX + name: mask.to(torch.uint8) for name, mask in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"growth state names {sorted(set(state) ^ expected)} do not match this model's layers")
        for key, value in state.items():
            name = key.removeprefix(STATE_PREFIX)
            if value.shape != self.masks[name].shape:
                raise ValueError(f"growth mask {name} has shape {tuple(value.shape)}, the layer "
                                 f"{tuple(self.masks[name].shape)}")
            self.masks[name] = value.to(device=self.masks[name].device, dtype=torch.bool)
        self._apply_masks()

    # -- internals

    def _n_active(self, layer: nn.Linear) -> int:
        return max(1, round(self.cfg.density * layer.out_features))

    def _prune_and_grow(self, share: float, step: int) -> None:
        for index, (name, layer) in enumerate(self.layers.items()):
            mask = self.masks[name]
            active, inactive = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
            k = min(round(share * len(active)), len(inactive))
            if k == 0:
                continue
            weakest = active[_row_norms(layer, of_grad=False)[active].topk(k, largest=False).indices]
            strongest = inactive[_row_norms(layer, of_grad=True)[inactive].topk(k).indices]
            mask[weakest] = False
            mask[strongest] = True
            self._reset_rows(layer, weakest)  # zero weights and moments: they stay zero from now on
            self._grow_rows(index, layer, strongest, step)
            self.swapped += k

    def _grow_rows(self, index: int, layer: nn.Linear, rows: torch.Tensor, step: int) -> None:
        self._reset_rows(layer, rows)  # zero weights and moments
        if len(rows) == 0 or self.cfg.grow_init == 0:
            return
        generator = torch.Generator(device=layer.weight.device)
        generator.manual_seed((self.seed * 1_000_003 + step) * 1_009 + index)
        bound = self.cfg.grow_init / math.sqrt(layer.in_features)
        fresh = torch.rand((len(rows), layer.in_features), generator=generator, device=layer.weight.device)
        with torch.no_grad():
            layer.weight[rows] = ((2 * fresh - 1) * bound).to(layer.weight.dtype)

    def _reset_rows(self, layer: nn.Linear, rows: torch.Tensor) -> None:
        with torch.no_grad():
            for param in (layer.weight, layer.bias):
                if param is None:
                    continue
                param[rows] = 0.0
                for value in self.optimizer.state.get(param, {}).values():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        value[rows] = 0.0

    def _apply_masks(self) -> None:
        """Zero every masked row and its optimizer moments (a new or restored mask set);
        from then on the optimizer keeps them at zero (see `before_step`)."""
        for name, layer in self.layers.items():
            gone = (~self.masks[name]).nonzero().squeeze(1)
            if len(gone):
                self._reset_rows(layer, gone)


class LinearFlopCounter(TorchFunctionMode):
    """Counts the multiply-adds of every F.linear call (nn.Linear and the weight slices the
    models take for K/V-only projections) as a dense run would do them and as a structured
    implementation of the masks would (masked rows skipped). Attention matmuls and
    embeddings are not counted. Forward only; backward is about twice the same work.
    Without `growth` every row counts as kept (a dense run, for comparison)."""

    def __init__(self, model: nn.Module, growth: GrowPrune | None = None):
        super().__init__()
        self.growth = growth
        layers = growth.layers if growth is not None else prunable_layers(model)
        self._rows = {id(layer.weight): (name, 0) for name, layer in layers.items()}  # id(weight) -> (name, first row)
        self.dense = self.done = self.prunable_dense = self.prunable_done = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._count(x, weight)
        return func(*args, **kwargs)

    def _count(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        rows, width = weight.shape
        tokens = x.numel() // width
        dense = 2 * rows * width * tokens
        active = rows
        layer = self._rows.get(id(weight))
        if layer is None and weight._base is not None:  # a row slice of a prunable weight
            base = self._rows.get(id(weight._base))
            if base is not None:
                layer = (base[0], weight.storage_offset() // width)
        if layer is not None:
            name, first = layer
            if self.growth is not None:
                active = int(self.growth.masks[name][first:first + rows].sum())
            self.prunable_dense += dense
            self.prunable_done += 2 * active * width * tokens
        self.dense += dense
        self.done += 2 * active * width * tokens

    def summary(self) -> dict[str, float]:
        return {"linear_flops_dense": float(self.dense), "linear_flops_done": float(self.done),
                "prunable_flops_dense": float(self.prunable_dense), "prunable_flops_done": float(self.prunable_done),
                "linear_flops_share_done": self.done / self.dense if self.dense else 1.0}
