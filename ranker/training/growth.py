"""Alternate growth and pruning during training, after arXiv 2105.01064 (Du et al., 2021).

The paper trains a recommendation model that is sparse most of the time, alternately
pruning and growing structured parts of it, and ends with the full-size model so that
recurring training can start from it. Its body is not available to us, so this is our
interpretation (documented in `docs/growth.md`):

- Units are structured groups (`prunable_groups`): an attention head (its q, k, v rows, or
  HSTU's U, Q, K, V channels, and its input columns of the output projection), a
  feed-forward hidden unit (its row of ffn.0 and column of ffn.3) and a hidden unit of the
  task heads' MLP (row of net.1, column of net.3). A pruned unit's input rows are zero, so
  it outputs exactly zero and is the same as a removed unit (tested). Embeddings, the
  temperature MLP, the block gates, the residual-writing rows and the task logits stay dense.
- Step 0 prunes every group to `density` by magnitude. Every `update_every` steps a
  prune-and-grow update replaces a share of each group's active units: the smallest go,
  the inactive ones with the largest gradient on this batch come back, so the density
  stays put while the sparse structure moves. The share starts at `swap_fraction` and
  decays (cosine) to 0 at `dense_from`, where every unit grows back and training finishes
  dense: the checkpoint is an ordinary full-size model.
- `regrow="init"`: a unit comes back with small random input rows (`grow_init` times a
  fresh Linear's scale, drawn from a generator seeded by (seed, step, group), so a resumed
  run grows the same values) and zero output columns, so growing does not change the
  model's output. `regrow="restore"`: it comes back with the input rows it had when pruned.
- `implementation="sliced"` (the fast path): while sparse, every prunable weight is
  swapped for a physically smaller parameter holding its active units only, with the
  optimizer's state cut alike (ranker.training.growth_slices), so a sparse step runs
  smaller matmuls and fewer attention heads with no gather or scatter. An update step
  needs the gradient of the inactive units, so it runs full-size, masked; so does the
  dense phase. `implementation="masked"` (the reference): full shapes, pruned rows held
  at zero. The two give the same loss, gradients and final weights
  (tests/test_growth_sliced.py).
- Optimizer state: pruning zeroes the unit's AdamW moments (rows and columns); its
  gradients are zero while it is pruned (masked: set to zero; sliced: not in the
  optimizer), so its input rows stay zero and it comes back with no stale momentum
  either way. Its frozen output columns get AdamW's weight decay in both paths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ranker.models.hstu import HSTULayer
from ranker.models.layers import SoftmaxLayer, TaskHeads, head_rows
from ranker.models.config import refuse_unknown_fields
from ranker.training.growth_slices import Narrowing

STATE_PREFIX = "growth_mask."
STASH_PREFIX = "growth_stash."
IMPLEMENTATIONS = ("sliced", "masked")
REGROW = ("init", "restore")


@dataclass(frozen=True)
class GrowthConfig:
    density: float = 0.5  # share of each group's units active while sparse
    update_every: int = 20  # steps between prune-and-grow updates
    swap_fraction: float = 0.3  # share of active units replaced at the first update
    dense_from: float = 0.75  # share of the budget after which the model is full-size
    grow_init: float = 0.1  # a re-initialised unit's scale, relative to nn.Linear's 1/sqrt(fan_in)
    regrow: str = "init"  # "init" (fresh small weights) or "restore" (the weights it had when pruned)
    implementation: str = "sliced"  # "sliced" (smaller matmuls) or "masked" (the reference path)

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
        if self.regrow not in REGROW:
            raise ValueError(f"growth regrow must be one of {REGROW}, got {self.regrow!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"growth implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GrowthConfig":
        refuse_unknown_fields(cls, data, "growth settings")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Group:
    """One layer's structured units of one kind. `rows` are the input side (zeroed while a
    unit is pruned), `cols` the output side (kept, frozen); each entry is (parameter
    name, parameter, dim, index [units, k]): unit u owns index[u] along dim."""

    module: nn.Module
    kind: str  # the keyword of module.slice_to: "heads", "ffn" or "hidden"
    n_units: int
    fan_in: int  # of the input rows, for the re-initialisation scale
    rows: list[tuple[str, nn.Parameter, int, torch.Tensor]] = field(default_factory=list)
    cols: list[tuple[str, nn.Parameter, int, torch.Tensor]] = field(default_factory=list)

    def entries(self, units: torch.Tensor):
        """(name, parameter, dim, flat index) of these units in every member."""
        for name, param, dim, index in self.rows + self.cols:
            yield name, param, dim, index[units].flatten()


def _linear_members(prefix: str, linear: nn.Linear, dim: int, index: torch.Tensor):
    members = [(f"{prefix}.weight", linear.weight, dim, index)]
    if dim == 0 and linear.bias is not None:
        members.append((f"{prefix}.bias", linear.bias, 0, index))
    return members


def _units(n: int, width: int = 1) -> torch.Tensor:  # [n, width]: unit u owns u*width .. u*width+width-1
    return torch.arange(n * width).view(n, width)


def prunable_groups(model: nn.Module) -> dict[str, Group]:
    """Every structured group of `model`, by name ("<layer>.heads", "<layer>.ffn", "<heads>.hidden")."""
    groups: dict[str, Group] = {}
    for name, module in model.named_modules():
        at = f"{name}." if name else ""
        if isinstance(module, SoftmaxLayer):
            d, h = module.out.in_features, module.n_heads
            heads = torch.arange(h)
            qkv = torch.stack([head_rows(heads[i:i + 1], d // h, (0, d, 2 * d)) for i in range(h)])
            groups[f"{at}heads"] = Group(module, "heads", h, d, _linear_members(f"{at}qkv", module.qkv, 0, qkv),
                                         _linear_members(f"{at}out", module.out, 1, _units(h, d // h)))
            hidden = module.ffn[0].out_features
            groups[f"{at}ffn"] = Group(module, "ffn", hidden, d, _linear_members(f"{at}ffn.0", module.ffn[0], 0, _units(hidden)),
                                       _linear_members(f"{at}ffn.3", module.ffn[3], 1, _units(hidden)))
        elif isinstance(module, HSTULayer):
            d, h = module.f1.in_features, module.n_heads
            heads = torch.arange(h)
            f1 = torch.stack([head_rows(heads[i:i + 1], d // h, (0, d, 2 * d, 3 * d)) for i in range(h)])
            cols = [] if module.f2 is None else _linear_members(f"{at}f2", module.f2, 1, _units(h, d // h))
            groups[f"{at}heads"] = Group(module, "heads", h, d, _linear_members(f"{at}f1", module.f1, 0, f1), cols)
        elif isinstance(module, TaskHeads):
            hidden, d = module.net[1].out_features, module.net[1].in_features
            groups[f"{at}hidden"] = Group(module, "hidden", hidden, d,
                                          _linear_members(f"{at}net.1", module.net[1], 0, _units(hidden)),
                                          _linear_members(f"{at}net.3", module.net[3], 1, _units(hidden)))
    for group in groups.values():
        device = next(group.module.parameters()).device
        group.rows = [(n, p, dim, i.to(device)) for n, p, dim, i in group.rows]
        group.cols = [(n, p, dim, i.to(device)) for n, p, dim, i in group.cols]
    return groups


def _unit_norms(group: Group, of_grad: bool) -> torch.Tensor:  # [n_units]
    """Sum of squares of each unit's entries (rows and columns), of the weights or their gradients."""
    norms = torch.zeros(group.n_units, device=group.rows[0][1].device)
    for _, param, dim, index in group.rows + group.cols:
        values = param.grad if of_grad else param
        if values is None:
            continue
        squares = values.detach().float().pow(2)
        squares = squares.sum(1 - dim) if squares.dim() == 2 else squares  # per row (dim 0) or per column (dim 1)
        norms += squares[index].sum(1)
    return norms


class GrowPrune:
    """Masks, schedule and bookkeeping of one training run. The trainer calls `prepare`
    before the forward, `before_step` after backward (gradients all-reduced) and
    `after_step` after the optimizer step. Under DDP every rank sees the same weights and
    gradients, so every rank picks the same units."""

    def __init__(self, model: nn.Module, cfg: GrowthConfig, total_steps: int, optimizer: torch.optim.Optimizer,
                 seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.groups = prunable_groups(model)
        if not self.groups:
            raise ValueError(f"{type(model).__name__} has no prunable layers")
        if cfg.implementation == "sliced" and getattr(getattr(model, "config", None), "candidate_path", "") == "shared":
            raise ValueError("sliced growth does not support ASTRO candidate_path='shared' (a pruned candidate head "
                             "still feeds norm_attn's statistics there); use --growth implementation=masked")
        self.optimizer = optimizer
        self.narrowing = Narrowing(model, optimizer)  # the sliced implementation's smaller weights
        self.dense_step = math.ceil(cfg.dense_from * total_steps)  # from this step on, no unit is masked
        device = next(model.parameters()).device
        self.masks = {name: torch.ones(g.n_units, dtype=torch.bool, device=device) for name, g in self.groups.items()}
        # regrow="restore": each input row's value when its unit was pruned
        self.stash = ({n: torch.zeros_like(p) for g in self.groups.values() for n, p, _, _ in g.rows}
                      if cfg.regrow == "restore" else {})
        self.swapped = 0  # units replaced by prune-and-grow updates so far
        self._sliced = False  # whether the layers run sliced now

    # -- what the trainer calls

    def start(self, step: int) -> None:
        """Prune to `density` by magnitude when training starts sparse (not on resume)."""
        if step == 0 and self.dense_step > 0 and self.cfg.density < 1.0:
            for name, group in self.groups.items():
                top = _unit_norms(group, of_grad=False).topk(self._n_active(group)).indices
                self.masks[name] = torch.zeros_like(self.masks[name]).index_fill_(0, top, True)
                self._prune(name, (~self.masks[name]).nonzero().squeeze(1))

    def prepare(self, step: int) -> None:
        """Before the forward of `step`: the sliced implementation runs on the active units,
        except at an update step (its choice needs the inactive units' gradients) and once dense."""
        # While sliced the masks cannot change (updates run full-size), so is_dense (a
        # reduction per group) is asked only when the layers are full-size.
        sliced = (self.cfg.implementation == "sliced" and step < self.dense_step and not self._is_update(step)
                  and (self._sliced or not self.is_dense))
        self._slice(sliced)

    def before_step(self, step: int) -> None:
        """At an update step, swap units by the batch's gradients; then keep masked units'
        gradients out of the clip norm and the optimizer (zero: AdamW with zero gradient
        and zero moments leaves them where they are). Sliced, the pruned units have no
        gradient at all: only the weight decay of their frozen columns is counted."""
        if self._sliced:
            self.narrowing.decay_step()
            return
        if step >= self.dense_step:  # every unit is on from dense_step: nothing to mask
            return
        if self._is_update(step):
            self._prune_and_grow(self.swap_share(step), step)
        for name, group in self.groups.items():
            gone = (~self.masks[name]).nonzero().squeeze(1)
            if len(gone):
                for _, param, dim, index in group.entries(gone):
                    if param.grad is not None:
                        param.grad.index_fill_(dim, index, 0.0)

    def after_step(self, step_done: int) -> None:
        """`step_done` optimizer steps have run; at `dense_step` every unit grows back."""
        if step_done == self.dense_step and not self.is_dense:
            self._slice(False)
            for index, name in enumerate(self.groups):
                self._grow(index, name, (~self.masks[name]).nonzero().squeeze(1), step_done)
                self.masks[name] = torch.ones_like(self.masks[name])

    def release(self) -> None:
        """Full shapes again (before a checkpoint, at the end of training, whatever the
        phase); the next `prepare` narrows again where the schedule says so."""
        self._slice(False)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Sliced: each narrowed weight's gradient in its full shape (what the masked path holds)."""
        return self.narrowing.full_gradients()

    # -- schedule and state

    def swap_share(self, step: int) -> float:
        """Cosine decay from swap_fraction at step 0 to 0 at dense_step."""
        return self.cfg.swap_fraction * 0.5 * (1 + math.cos(math.pi * step / self.dense_step))

    @property
    def is_dense(self) -> bool:
        return all(bool(m.all()) for m in self.masks.values())

    def density(self) -> float:
        """Share of prunable units active now."""
        return sum(int(m.sum()) for m in self.masks.values()) / sum(m.numel() for m in self.masks.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {STATE_PREFIX + name: mask.to(torch.uint8) for name, mask in self.masks.items()}
        state.update({STASH_PREFIX + name: value for name, value in self.stash.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._slice(False)
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"growth state names {sorted(set(state) ^ expected)} do not match this model's "
                             f"groups and regrow setting")
        for key, value in state.items():
            table, name = (self.masks, key.removeprefix(STATE_PREFIX)) if key.startswith(STATE_PREFIX) \
                else (self.stash, key.removeprefix(STASH_PREFIX))
            if value.shape != table[name].shape:
                raise ValueError(f"growth state {key} has shape {tuple(value.shape)}, the model "
                                 f"{tuple(table[name].shape)}")
            table[name] = value.to(device=table[name].device, dtype=table[name].dtype)
        for name in self.groups:  # zero what the masks say is pruned, and its moments
            self._prune(name, (~self.masks[name]).nonzero().squeeze(1), stash=False)

    # -- internals

    def _is_update(self, step: int) -> bool:
        return 0 < step < self.dense_step and step % self.cfg.update_every == 0

    def _n_active(self, group: Group) -> int:
        return max(1, round(self.cfg.density * group.n_units))

    def _slice(self, on: bool) -> None:
        """Narrow every prunable weight to its active units (rows or columns in ascending
        order, so q/k/v and U/Q/K/V stay in their blocks), or widen them all back."""
        if on == self._sliced:
            return
        by_module: dict[int, tuple[nn.Module, dict[str, torch.Tensor | None]]] = {}
        for name, group in self.groups.items():
            active = self.masks[name].nonzero().squeeze(1)
            if on:
                for param_name, param, dim, index in group.rows + group.cols:
                    self.narrowing.narrow(param_name, param, dim, index[active].flatten().sort().values)
            module, kinds = by_module.setdefault(id(group.module), (group.module, {}))
            kinds[group.kind] = active if on else None
        if not on:
            self.narrowing.widen()
        for module, kinds in by_module.values():
            module.slice_to(**kinds)
        self._sliced = on

    def _prune_and_grow(self, share: float, step: int) -> None:
        for index, (name, group) in enumerate(self.groups.items()):
            mask = self.masks[name]
            active, inactive = mask.nonzero().squeeze(1), (~mask).nonzero().squeeze(1)
            k = min(round(share * len(active)), len(inactive))
            if k == 0:
                continue
            weakest = active[_unit_norms(group, of_grad=False)[active].topk(k, largest=False).indices]
            strongest = inactive[_unit_norms(group, of_grad=True)[inactive].topk(k).indices]
            mask[weakest] = False
            mask[strongest] = True
            self._prune(name, weakest)
            self._grow(index, name, strongest, step)
            self.swapped += k

    def _prune(self, name: str, units: torch.Tensor, stash: bool = True) -> None:
        """Zero the units' input rows (stashed first under regrow="restore") and every moment they own."""
        if len(units) == 0:
            return
        group = self.groups[name]
        with torch.no_grad():
            for param_name, param, dim, index in group.entries(units):
                if any(param is p for _, p, _, _ in group.rows):
                    if stash and param_name in self.stash:
                        self.stash[param_name].index_copy_(dim, index, param.index_select(dim, index))
                    param.index_fill_(dim, index, 0.0)
                self._zero_moments(param, dim, index)

    def _grow(self, group_index: int, name: str, units: torch.Tensor, step: int) -> None:
        """Bring units back: restored rows, or small random rows with zero output columns."""
        if len(units) == 0:
            return
        group = self.groups[name]
        with torch.no_grad():
            if self.cfg.regrow == "restore":
                for param_name, param, dim, index in group.entries(units):
                    if param_name in self.stash:
                        param.index_copy_(dim, index, self.stash[param_name].index_select(dim, index))
                return
            generator = torch.Generator(device=group.rows[0][1].device)
            generator.manual_seed((self.seed * 1_000_003 + step) * 1_009 + group_index)
            bound = self.cfg.grow_init / math.sqrt(group.fan_in)
            for _, param, dim, index in group.entries(units):
                if any(param is p for _, p, _, _ in group.rows) and param.dim() == 2:
                    fresh = torch.rand((len(index), param.shape[1]), generator=generator, device=param.device)
                    param.index_copy_(0, index, ((2 * fresh - 1) * bound).to(param.dtype))
                elif param.dim() == 2:  # an output column: the new unit writes nothing yet
                    param.index_fill_(dim, index, 0.0)
                self._zero_moments(param, dim, index)

    def _zero_moments(self, param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.index_fill_(dim, index, 0.0)


class LinearFlopCounter(TorchFunctionMode):
    """Counts the multiply-adds of every F.linear call as a dense run would do them and as
    they are done with the growth masks: a sliced call (a narrowed weight, or a row slice
    of one) is counted at its own shape, a masked call at its active rows and columns
    (whole weights, and the row slices the models take for K/V-only projections), so both
    implementations count the same. Attention matmuls and embeddings are not counted.
    Forward only; backward is about twice the same work. Without `growth` every unit
    counts as active (a dense run, for comparison)."""

    def __init__(self, model: nn.Module, growth: GrowPrune | None = None):
        super().__init__()
        self.growth = growth
        groups = growth.groups if growth is not None else prunable_groups(model)
        self._weights: dict[int, tuple[str, nn.Parameter]] = {}
        for group in groups.values():
            for name, param, _, _ in group.rows + group.cols:
                if param.dim() == 2:
                    self._weights[id(param)] = (name, param)
        self.dense = self.done = self.prunable_dense = self.prunable_done = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.linear:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._count(x, weight)
        return out

    def _keep(self, weight: nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
        """bool [out], [in]: the rows and columns of a prunable weight the masks leave active."""
        rows = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        cols = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        if self.growth is None:
            return rows, cols
        for name, group in self.growth.groups.items():
            gone = (~self.growth.masks[name]).nonzero().squeeze(1)
            for _, param, dim, index in group.entries(gone):
                if param is weight:
                    (rows if dim == 0 else cols)[index] = False
        return rows, cols

    def _count(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        rows, width = weight.shape
        tokens = x.numel() // width
        dense = done = 2 * rows * width * tokens
        narrowed = self.growth.narrowing.full_shape(weight) if self.growth is not None else None
        full: nn.Parameter | None = None
        first = 0
        if narrowed is not None:  # sliced: this call's shape is the work done
            (full_rows, full_width), (narrow_rows, _) = narrowed
            dense = 2 * (rows * full_rows // narrow_rows) * full_width * tokens
        elif id(weight) in self._weights:
            full = weight
        elif weight._base is not None and id(weight._base) in self._weights:  # a row slice of a prunable weight
            full, first = weight._base, weight.storage_offset() // width
        if full is not None:
            keep_rows, keep_cols = self._keep(full)
            done = 2 * int(keep_rows[first:first + rows].sum()) * int(keep_cols.sum()) * tokens
        if full is not None or narrowed is not None:
            self.prunable_dense += dense
            self.prunable_done += done
        self.dense += dense
        self.done += done

    def summary(self) -> dict[str, float]:
        return {"linear_flops_dense": float(self.dense), "linear_flops_done": float(self.done),
                "prunable_flops_dense": float(self.prunable_dense), "prunable_flops_done": float(self.prunable_done),
                "linear_flops_share_done": self.done / self.dense if self.dense else 1.0}
