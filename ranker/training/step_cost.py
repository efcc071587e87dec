"""Two parts of a training step made cheaper without changing what it computes.

- `TrackGradient`: the track table ([n_tracks + 1, d], the model's largest tensor) gets its
  gradient as sparse rows added into one dense buffer kept across steps. A dense embedding
  backward allocates and zero-fills a fresh table-sized tensor for each lookup (history and
  candidates: two), and autograd then adds the two; here only the looked-up rows are
  touched and the buffer is zeroed in place. The clip and AdamW still see a dense gradient
  with the same values (up to the order in which a row's contributions are summed), so
  the update is the same one; AdamW stays dense (its moments decay on every row).
- `clip_gradients`: `clip_grad_norm_` multiplies every gradient by min(1, max_norm / norm)
  at every step, a pass over the whole track gradient even when the factor is exactly 1;
  this one multiplies only when it clips, with the same factor.

One process only: DistributedDataParallel reduces each parameter's gradient as autograd
produces it, and keeps the dense path (the trainer does not attach the buffer there).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class TrackGradient:
    """Sparse lookups of `model.embed.track` whose rows accumulate into a reused dense .grad.

    `attach()` after `optimizer.zero_grad(set_to_none=True)` and before `backward()`;
    `close()` when training ends (the model's lookups go back to dense)."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.table: nn.Embedding | None = model.embed.track if enabled else None
        self.buffer: torch.Tensor | None = None
        if self.table is not None:
            self.table.sparse = True  # F.embedding(..., sparse=True): the backward yields the looked-up rows
            self.buffer = torch.zeros_like(self.table.weight)

    def attach(self) -> None:
        """Give the table a zero dense .grad: autograd adds the sparse rows into it in place."""
        if self.table is not None:
            self.table.weight.grad = self.buffer.zero_()

    def close(self) -> None:
        if self.table is not None:
            self.table.sparse = False
            self.table = self.buffer = None


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
