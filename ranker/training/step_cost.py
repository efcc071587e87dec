"""Two parts of a training step made cheaper without changing what it computes.

- `TrackGradient`: the track table ([n_tracks + 1, d], the model's largest tensor) gets its
  gradient as rows added into one dense buffer kept across steps. A dense embedding
  backward allocates and zero-fills a fresh table-sized tensor for each lookup (history and
  candidates: two), and autograd then adds the two. `implementation="rows"` (an option)
  adds each lookup's output gradient straight into the buffer's looked-up rows
  (index_add_) and, before the next backward, zeroes only the rows the last step wrote:
  no table-sized pass at all. `"sparse"` (the reference and the default) lets
  F.embedding(sparse=True) yield sparse rows that autograd adds into the buffer, which is
  zeroed whole each step. The clip and AdamW see a dense gradient with the same values
  either way (up to the order in which a row's contributions are summed), so the update is
  the same one; AdamW stays dense (its moments decay on every row).
- `clip_gradients`: `clip_grad_norm_` multiplies every gradient by min(1, max_norm / norm)
  at every step, a pass over the whole track gradient even when the factor is exactly 1;
  this one multiplies only when it clips, with the same factor.

One process only: DistributedDataParallel reduces each parameter's gradient as autograd
produces it, and keeps the dense path (the trainer does not attach the buffer there).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

TRACK_GRADIENTS = ("rows", "sparse")


class TrackGradient:
    """Lookups of `model.embed.track` whose gradient rows accumulate into a reused dense .grad.

    `attach()` after `optimizer.zero_grad(set_to_none=True)` and before `backward()`;
    `close()` when training ends (the model's lookups go back to plain F.embedding).

    Invariant of "rows": between steps the buffer is zero except at the rows in `written`
    (the clip scales every gradient by one factor and AdamW only reads them, so nothing
    else makes a row non-zero), hence zeroing those rows zeroes the buffer."""

    def __init__(self, model: nn.Module, enabled: bool = True, implementation: str = "sparse"):
        if implementation not in TRACK_GRADIENTS:
            raise ValueError(f"track gradient implementation must be one of {TRACK_GRADIENTS}, got {implementation!r}")
        self.table: nn.Embedding | None = model.embed.track if enabled else None
        self.implementation = implementation
        self.buffer: torch.Tensor | None = None
        self.written: list[torch.Tensor] = []  # "rows": the flat ids each backward since attach() wrote
        if self.table is not None:
            self.buffer = torch.zeros_like(self.table.weight)
            if implementation == "sparse":
                self.table.sparse = True  # F.embedding(..., sparse=True): the backward yields the looked-up rows
            else:
                self.table.forward = self._lookup  # the instance's forward: nn.Module.__call__ runs it

    def attach(self) -> None:
        """Give the table a zero dense .grad: the backward adds the step's rows into it in place."""
        if self.table is None:
            return
        if self.implementation == "sparse":
            self.buffer.zero_()
        else:
            for ids in self.written:
                self.buffer.index_fill_(0, ids, 0.0)
            self.written.clear()
        self.table.weight.grad = self.buffer

    def close(self) -> None:
        if self.table is not None:
            self.table.sparse = False
            self.table.__dict__.pop("forward", None)
            self.table = self.buffer = None
            self.written.clear()

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.table
        if not (torch.is_grad_enabled() and table.weight.requires_grad):
            return F.embedding(ids, table.weight, table.padding_idx)
        return _RowsInto.apply(ids, table.weight, self.buffer, table.padding_idx, self.written)


class _RowsInto(torch.autograd.Function):
    """F.embedding whose backward adds the output gradient into `buffer`'s looked-up rows
    (the padding row stays zero, as F.embedding's backward leaves it), notes those rows in
    `written`, and returns no gradient for the weight: the trainer has set weight.grad to
    that buffer."""

    @staticmethod
    def forward(ctx, ids, weight, buffer, padding_idx, written):  # type: ignore[override]
        ctx.save_for_backward(ids)
        ctx.buffer, ctx.padding_idx, ctx.written = buffer, padding_idx, written
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (ids,) = ctx.saved_tensors
        buffer, flat = ctx.buffer, ids.reshape(-1)
        buffer.index_add_(0, flat, grad.reshape(-1, buffer.shape[1]))
        if ctx.padding_idx is not None:
            buffer[ctx.padding_idx] = 0.0
        ctx.written.append(flat)
        return None, None, None, None, None


def clip_gradients(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (same norm, same factor max_norm / (norm + 1e-6)),
    except that gradients are multiplied only when the factor is below 1 (or not finite,
    where clip_grad_norm_ multiplies too); a factor of exactly 1 would change nothing."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    factor = max_norm / (norm + 1e-6)
    if not bool(factor >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
