"""Why one-event incremental stays far under its FLOP ratio on a CPU (`climber bench incremental`).

The FLOP ratio (full encode / one event) counts arithmetic only. Two floors bound what any
implementation of the one-event step can reach, and this module measures both beside it:

- dispatch: ATen calls per event (counted with a dispatch mode) times the CPU cost of one
  trivial call: what eager PyTorch pays before any arithmetic;
- memory: one event reads every cached key and value of each attending layer of the
  block(s) it joins, and every weight of those layers, once, to do about one multiply-add
  per number read (a matrix-vector product), where the full encode reuses each weight
  over n tokens. The floor here is reading those bytes once (a sum per tensor) from
  fresh buffers, as a cache entry is read when its user comes back.
"""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ranker.serving.cache import HistoryBuffer
from ranker.serving.incremental import extend_history


class _CountCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def calls_per_event(model, encoded_before, full_batch, n: int) -> int:
    """ATen calls of one `extend_history` of the n-th event (after a warm-up call)."""
    extend_history(model, HistoryBuffer(encoded_before, 0, max_len=n), full_batch)
    buffer = HistoryBuffer(encoded_before, 0, max_len=n)
    with _CountCalls() as counter:
        extend_history(model, buffer, full_batch)
    return counter.calls


def per_call_us(calls: int = 20_000) -> float:
    """CPU microseconds of one trivial ATen call (an in-place add on a [1, 192] tensor)."""
    x = torch.zeros(1, 192)
    for _ in range(100):
        x.add_(1.0)
    start = time.process_time()
    for _ in range(calls):
        x.add_(1.0)
    return 1e6 * (time.process_time() - start) / calls


def read_floor_seconds(model, encoded_before, full_batch, n: int, reps: int = 30) -> dict:
    """CPU seconds to read once what one event must read (see the module docstring), on
    fresh buffers, and those bytes; the block(s) joined found by extending a probe buffer."""
    probe = HistoryBuffer(encoded_before, 0, max_len=n)
    before = [block.length for block in probe.blocks]
    extend_history(model, probe, full_batch)
    joined = [b for b, block in enumerate(probe.blocks) if block.length != before[b]]
    stacks = [model.stacks[b] for b in joined] if hasattr(model, "stacks") else [model.stack]
    weights = [p for stack in stacks for p in stack.parameters() if p.dim() == 2]
    buffers = [HistoryBuffer(encoded_before, 0, max_len=n) for _ in range(reps)]

    def tensors(buffer: HistoryBuffer) -> list[torch.Tensor]:
        out = []
        for b in joined:
            block = buffer.blocks[b]
            out += [block.kv[i][:, :, : block.length + 1] for i in range(len(block.kv) - 1)]  # attending layers
        return out + weights

    nbytes = sum(t.numel() * t.element_size() for t in tensors(buffers[0]))
    start = time.process_time()
    for buffer in buffers:
        for t in tensors(buffer):
            t.sum()
    return {"read_floor_s": (time.process_time() - start) / reps, "bytes_per_event": nbytes, "blocks_joined": joined}


def compile_check(model, encoded_before, full_batch, n: int, calls: int = 300) -> dict:
    """The one-event step's attending layer (`hstu_layer_one`, the serving code) eager and
    compiled by torch.compile (inductor, static and dynamic shapes), on one buffer, CPU
    microseconds per call in turns, with the compile time and the largest difference."""
    from ranker.models.hstu import HSTUStack, relative_buckets
    from ranker.serving.incremental import hstu_layer_one

    buffer = HistoryBuffer(encoded_before, 0, max_len=n)
    stacks = list(model.stacks) if hasattr(model, "stacks") else [model.stack]
    b, stack = next((b, s) for b, s in enumerate(stacks) if isinstance(s, HSTUStack) and len(s.layers) > 1)
    block = buffer.blocks[b]
    at = block.length
    block.reserve(at + 1)
    layer, kv = stack.layers[0], block.kv[0]
    positions, timestamps = block.positions[:, : at + 1].clone(), block.timestamps[:, : at + 1].clone()
    positions[0, at], timestamps[0, at] = at, timestamps[0, at - 1] + 60_000
    buckets = relative_buckets(positions[:, at:], timestamps[:, at:], positions, timestamps, stack.n_buckets).view(-1)
    x = torch.randn(1, kv.shape[1] * kv.shape[3], generator=torch.Generator().manual_seed(0))
    scale = 1.0 / kv.shape[3] ** 0.5
    step = lambda fn: fn(layer, x, kv, at, buckets, scale)  # noqa: E731
    out = {"layer": f"block {b}, layer 0 of {len(stack.layers)}, {at} cached keys"}
    eager = step(hstu_layer_one)
    variants = {"eager": hstu_layer_one}
    for name, dynamic in (("compiled_static", False), ("compiled_dynamic", True)):
        compiled = torch.compile(hstu_layer_one, dynamic=dynamic)
        start = time.perf_counter()
        result = step(compiled)
        out[f"{name}_compile_s"] = time.perf_counter() - start
        out[f"{name}_max_abs_diff"] = float((result - eager).abs().max())
        variants[name] = compiled
    for turn in range(2):
        for name, fn in variants.items():
            start = time.process_time()
            for _ in range(calls):
                step(fn)
            out.setdefault(f"{name}_us", []).append(1e6 * (time.process_time() - start) / calls)
    return out
