"""Physically smaller weights for the sparse phases of growth and pruning (the "sliced"
implementation of ranker.training.growth).

While the model is sparse, every prunable weight is swapped for a new, smaller
nn.Parameter holding only its active units' rows (or columns), and the optimizer is
pointed at it with its state cut the same way. A sparse step then runs plain, smaller
matmuls: no gather of weights before the forward, no scatter of gradients after the
backward, and AdamW updates only the active entries. Widening writes everything back
into the full-size parameters and their state; the trainer widens at an update step
(choosing which units grow needs the inactive units' gradients), at the return to dense,
before a checkpoint and at the end of training.

Invariants, so that the sliced path does what the masked reference does (tested):
- The left-out entries of a weight are pruned input rows (zero, and AdamW keeps them
  zero) or frozen output columns. The masked path holds those columns in the optimizer
  with zero gradient and zero moments, so AdamW's decoupled weight decay still shrinks
  them by (1 - lr * weight_decay) each step; `Narrowing` keeps the product of those
  factors and applies it to the full weight when it widens.
- The state that is not per entry (AdamW's step count) is carried across both ways.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Narrowed:
    """One prunable weight while it runs narrow."""

    owner: nn.Module  # the module holding it (e.g. an nn.Linear)
    attr: str  # "weight" or "bias"
    full: nn.Parameter  # the full-size parameter, out of the model and the optimizer meanwhile
    narrow: nn.Parameter  # the active rows (dim 0) or columns (dim 1)
    dim: int
    index: torch.Tensor  # int64: the entries of `full` along `dim` that `narrow` holds, in its order
    group: dict  # the optimizer's param group
    full_state: dict  # the optimizer's state of `full`, kept aside (widening writes back into it)
    decay: float = 1.0  # product of AdamW's weight-decay factors over the narrow steps


class Narrowing:
    """The swap of full-size parameters for narrow ones, and back, in a model and its optimizer."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.live: dict[int, Narrowed] = {}  # id(narrow parameter) -> its record

    @property
    def active(self) -> bool:
        return bool(self.live)

    def narrow(self, name: str, full: nn.Parameter, dim: int, index: torch.Tensor) -> None:
        """Swap `full` (the parameter called `name` in the model) for its entries at `index`."""
        module_name, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_name)
        if getattr(owner, attr) is not full:
            raise RuntimeError(f"{name} is not the full-size parameter: narrowed twice?")
        narrow = nn.Parameter(full.detach().index_select(dim, index))
        group = self._swap(full, narrow)
        state = self.optimizer.state.pop(full, None) or {}
        if state:
            self.optimizer.state[narrow] = {key: value.index_select(dim, index) if _per_entry(value, full)
                                            else _copy(value) for key, value in state.items()}
        full.grad = None
        setattr(owner, attr, narrow)
        self.live[id(narrow)] = Narrowed(owner, attr, full, narrow, dim, index, group, state)

    def decay_step(self) -> None:
        """Before an optimizer step while narrow: the decay AdamW gives the left-out entries in the masked path."""
        for record in self.live.values():
            record.decay *= 1.0 - record.group["lr"] * record.group["weight_decay"]

    def widen(self) -> None:
        """Every narrowed parameter back to full size, its values and optimizer state written back."""
        for record in self.live.values():
            full, narrow, dim, index = record.full, record.narrow, record.dim, record.index
            with torch.no_grad():
                if record.decay != 1.0:
                    full.mul_(record.decay)
                full.index_copy_(dim, index, narrow.detach())
            self._swap(narrow, full)
            kept = record.full_state
            for key, value in (self.optimizer.state.pop(narrow, None) or {}).items():
                if _per_entry(value, narrow):
                    target = kept.get(key)
                    if target is None or target.shape != full.shape:  # first steps taken narrow
                        target = torch.zeros_like(full, dtype=value.dtype)
                    kept[key] = target.index_copy_(dim, index, value)
                else:
                    kept[key] = _copy(value)
            if kept:
                self.optimizer.state[full] = kept
            setattr(record.owner, record.attr, full)
        self.live.clear()

    def full_shape(self, weight: torch.Tensor) -> tuple[torch.Size, torch.Size] | None:
        """(full shape, narrow shape) when `weight` is a narrowed parameter or a view of one, else None."""
        record = self.live.get(id(weight))
        if record is None and weight._base is not None:
            record = self.live.get(id(weight._base))
        return None if record is None else (record.full.shape, record.narrow.shape)

    def full_gradients(self) -> dict[str, torch.Tensor]:
        """Each narrowed parameter's gradient scattered into its full shape (zero elsewhere),
        by name: what the masked path holds after the same backward."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        grads = {}
        for record in self.live.values():
            if record.narrow.grad is not None:
                grad = torch.zeros_like(record.full).index_copy_(record.dim, record.index, record.narrow.grad)
                grads[names[id(record.narrow)]] = grad
        return grads

    def _swap(self, old: nn.Parameter, new: nn.Parameter) -> dict:
        for group in self.optimizer.param_groups:
            for i, param in enumerate(group["params"]):
                if param is old:
                    group["params"][i] = new
                    return group
        raise RuntimeError("a prunable parameter is not in the optimizer")


def _per_entry(value, param: torch.Tensor) -> bool:
    return torch.is_tensor(value) and value.shape == param.shape


def _copy(value):
    return value.clone() if torch.is_tensor(value) else value
