"""What every neural ranker shares: config base, tokens, history cache, heads, registry.

All three families (ASTRO, SASRec-style, HSTU-style) score a request the same way, in two
steps that serving can call separately (TURBO's KV cache):

    cache  = model.encode_history(batch)          # per block, per layer K and V of the history
    logits = model.score_candidates(cache, batch)  # the M candidates against that K/V
    model(batch) == model.score_candidates(model.encode_history(batch), batch)

History attention is causal inside each block, so the K/V of a history prefix never change
when events are appended; a candidate sees its block's history and itself, never another
candidate (target-aware "SUMI" scoring: one pass scores all M). Serving keeps one user's
cache in a `HistoryBuffer` and appends new events to it in place:

    buffer = HistoryBuffer(model.encode_history(batch), row)   # preallocated, with headroom
    model.extend_history(buffer, longer_batch)                   # K/V of the new events only
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import TASKS, RankBatch
from streaming.events import BEHAVIOURS, SCENARIOS

TARGET_BEHAVIOUR = len(BEHAVIOURS)  # the behaviour slot of a candidate token: "to be scored"
SIZE_NAMES: tuple[str, ...] = ("xs", "s", "m", "l", "xl")
# The shared depth/width ladder; families may override it.
DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "xs": dict(d_model=32, n_layers=1, n_heads=2),
    "s": dict(d_model=64, n_layers=2, n_heads=2),
    "m": dict(d_model=128, n_layers=2, n_heads=4),
    "l": dict(d_model=192, n_layers=3, n_heads=4),
    "xl": dict(d_model=256, n_layers=4, n_heads=8),
}


# ----------------------------------------------------------------------------- config

def _tuples(value: Any) -> Any:
    """JSON turns tuples into lists; frozen configs want them back (hashable, immutable)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def refuse_unknown_fields(cls: type, keys, what: str) -> None:
    """A config dataclass built from user input (flags, JSON, frozen files) names a wrong key
    by name, with the ones it knows, instead of a TypeError from the constructor."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; known: {sorted(known)}")


@dataclass(frozen=True)
class ModelConfig:
    n_tracks: int  # catalogue size; embedding rows are n_tracks + 1 (row 0 is padding)
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 256  # longest history; positions 0..max_len (a candidate sits at max_len)
    dropout: float = 0.1
    n_time_buckets: int = 48  # half-octave buckets of seconds: 2^23 s ~ 3 months at the top
    head_hidden: int = 0  # hidden width of the task heads; 0 means d_model
    # Ranking score = sum_t w_t * sigmoid(logit_t), in TASKS order (full_play, like, skip, share).
    task_weights: tuple[float, ...] = (1.0, 0.5, -1.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("n_tracks", "d_model", "n_layers", "n_heads", "max_len", "n_time_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if len(self.task_weights) != len(TASKS):
            raise ValueError(f"task_weights needs {len(TASKS)} weights for {TASKS}, got {self.task_weights}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        refuse_unknown_fields(cls, data, f"{cls.__name__} fields")
        return cls(**{k: _tuples(v) for k, v in data.items()})


@dataclass(frozen=True)
class SoftmaxConfig(ModelConfig):
    ffn_mult: int = 4  # feed-forward width = ffn_mult * d_model


# ----------------------------------------------------------------------------- tokens

def log_bucket(x: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Half-octave buckets of a non-negative quantity (0 -> 0, 1 -> 2, 255 -> 16, ...).

    Fine near zero where "same session" and "a minute later" differ, coarse for months.
    In place on one float copy: HSTU buckets B x L x L pairs, so passes over memory count.
    """
    y = x.to(torch.float32, copy=True).clamp_min_(0).add_(1).log2_().mul_(2).floor_()
    return y.to(torch.long).clamp_max_(n_buckets - 1)


def seconds_bucket(ms: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """log_bucket of a duration given in milliseconds, measured in seconds."""
    return log_bucket(ms.to(torch.float32) * 1e-3, n_buckets)


def history_time_gaps(history_ts: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """Bucket of the gap to the previous event (bucket 0 = no previous event).

    The gap to the previous event, not the age at request time, so a token's embedding
    never changes once written: that is what makes a cached history prefix reusable.
    """
    buckets = 1 + seconds_bucket(torch.diff(history_ts, dim=1), n_buckets - 1)
    return F.pad(buckets, (1, 0), value=0)


def gap_bucket(gap_ms: int, n_buckets: int) -> int:
    """`history_time_gaps` of one event whose previous event is `gap_ms` earlier, on the host.

    The same float32 steps as `seconds_bucket` (ms -> f32, * 1e-3, +1, log2, * 2, floor), in
    numpy float32 scalars: ~1 us where the tensor version is ~10 ops. Tests check it equals
    the tensor path around every bucket boundary.
    """
    seconds = max(np.float32(gap_ms) * np.float32(1e-3), np.float32(0))
    return 1 + min(int(np.floor(np.log2(seconds + np.float32(1)) * np.float32(2))), n_buckets - 2)


class TokenEmbedding(nn.Module):
    """Token = track + behaviour + scenario + position + time gap (summed).

    A candidate token has behaviour TARGET, the request's scenario, position = history length
    and the gap from the last event to the request.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_time_buckets = cfg.n_time_buckets
        self.track = nn.Embedding(cfg.n_tracks + 1, d, padding_idx=0)
        self.behaviour = nn.Embedding(len(BEHAVIOURS) + 1, d)
        self.scenario = nn.Embedding(len(SCENARIOS), d)
        self.position = nn.Embedding(cfg.max_len + 1, d)
        self.time_gap = nn.Embedding(cfg.n_time_buckets, d)
        self.dropout = nn.Dropout(cfg.dropout)
        for table in (self.track, self.behaviour, self.scenario, self.position, self.time_gap):
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.track.weight[0].zero_()

    def history(self, batch: RankBatch, start: int = 0) -> torch.Tensor:  # [B, n - start, d]
        """Tokens [start, n) of the history; start > 0 embeds only events appended to a cached prefix."""
        n = batch.history_tracks.shape[1]
        positions = torch.arange(start, n, device=batch.history_tracks.device)
        gaps = history_time_gaps(batch.history_ts[:, max(start - 1, 0):], self.n_time_buckets)
        x = (
            self.track(batch.history_tracks[:, start:])
            + self.behaviour(batch.history_behaviours[:, start:])
            + self.scenario(batch.history_scenarios[:, start:])
            + self.position(positions)[None]
            + self.time_gap(gaps[:, 1:] if start else gaps)
        )
        return self.dropout(x)

    def one_token(self, event: "OneEvent", position: int) -> torch.Tensor:  # [1, d]
        """`history(batch, start)` for a single new event in eval mode: five table rows summed
        (row views and adds, no index tensors or lookup ops)."""
        x = (self.track.weight[event.track] + self.behaviour.weight[event.behaviour]
             + self.scenario.weight[event.scenario] + self.position.weight[position] + self.time_gap.weight[event.gap])
        return x[None]

    def candidates(self, batch: RankBatch, history_lengths: torch.Tensor, last_ts: torch.Tensor) -> torch.Tensor:
        """[B, M, d]; needs only the history's length and last timestamp (kept in the cache)."""
        gap = torch.where(history_lengths > 0, 1 + seconds_bucket(batch.request_ts - last_ts, self.n_time_buckets - 1), 0)
        target = torch.full_like(batch.scenario, TARGET_BEHAVIOUR)
        per_row = self.behaviour(target) + self.scenario(batch.scenario) + self.position(history_lengths) + self.time_gap(gap)
        return self.dropout(self.track(batch.candidate_tracks) + per_row[:, None, :])


def last_timestamps(batch: RankBatch) -> torch.Tensor:  # int64 [B], 0 for an empty history
    last = (batch.history_lengths - 1).clamp_min(0)
    ts = batch.history_ts.gather(1, last[:, None])[:, 0] if batch.history_ts.shape[1] else torch.zeros_like(last)
    return torch.where(batch.history_lengths > 0, ts, 0)


# ----------------------------------------------------------------------------- blocks and cache

@dataclass
class BlockLayout:
    """Where one block's tokens sit in the history: gathered left-aligned, oldest first."""

    index: torch.Tensor  # int64 [B, L]: position in the history of each block token
    valid: torch.Tensor  # bool [B, L]: a prefix of True per row


def layout_blocks(membership: torch.Tensor) -> list[BlockLayout]:
    """Gather each block's tokens into its own tensor, width = the block's longest row.

    membership: bool [B, n, Nb]. A stable sort puts members first in history order, so
    attention inside a block costs L_b^2, not n^2 with a mask: the partition saving is real.
    """
    B, n, n_blocks = membership.shape
    counts = membership.sum(1)  # [B, Nb]
    widths = counts.amax(0).tolist() if B else [0] * n_blocks  # one host sync for all blocks
    order = torch.argsort((~membership).to(torch.int8), dim=1, stable=True)
    layouts = []
    for b, width in enumerate(widths):
        valid = torch.arange(width, device=membership.device)[None, :] < counts[:, b : b + 1]
        layouts.append(BlockLayout(order[:, :width, b], valid))
    return layouts


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, n, ...] -> [B, L, ...] at index [B, L]."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


@dataclass
class BlockCache:
    """One block's encoded history: what a candidate needs to attend to it, at every layer."""

    keys: list[torch.Tensor]  # per layer [B, heads, L, d_head]
    values: list[torch.Tensor]  # per layer [B, heads, L, d_head]
    valid: torch.Tensor  # bool [B, L], a prefix of True per row
    positions: torch.Tensor  # int64 [B, L], index of each token in the full history
    timestamps: torch.Tensor  # int64 [B, L], epoch ms

    @property
    def lengths(self) -> torch.Tensor:  # int64 [B]
        return self.valid.sum(1)


@dataclass
class HistoryCache:
    """Everything `score_candidates` needs from a history; the unit TURBO's cache stores."""

    blocks: list[BlockCache]
    history_lengths: torch.Tensor  # int64 [B]
    last_ts: torch.Tensor  # int64 [B], timestamp of the newest event (0 if none)

    def select(self, rows: torch.Tensor) -> "HistoryCache":
        """The cache of a subset (or repetition) of rows, e.g. one user's cache for many requests."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, rows)

        blocks = [
            BlockCache(
                [pick(k) for k in blk.keys], [pick(v) for v in blk.values],
                pick(blk.valid), pick(blk.positions), pick(blk.timestamps),
            )
            for blk in self.blocks
        ]
        return HistoryCache(blocks, pick(self.history_lengths), pick(self.last_ts))


class BlockBuffer:
    """One user's block K/V in preallocated storage, so appending k tokens copies k tokens.

    Each layer's K and V share one tensor `kv[i]` [2, heads, capacity, d_head] (keys at 0,
    values at 1), so a one-token append writes both with one copy; `keys[i]` and
    `values[i]` are views of it [1, heads, capacity, d_head]. Capacity >= length along the
    token axis; `view()` is the BlockCache of the filled part (no copy). Capacity grows by
    `growth` when an append needs more, so a user whose history grows one event at a time
    reallocates O(log n) times, not n times.
    """

    def __init__(self, block: BlockCache, row: int, capacity: int, growth: float = 1.5):
        length = int(block.valid[row].sum())
        self.length = length
        self.growth = growth
        self.kv = [self._alloc(torch.stack([k[row, :, :length], v[row, :, :length]]), capacity)
                   for k, v in zip(block.keys, block.values)]
        self.positions = self._alloc(block.positions[row : row + 1, :length], capacity)
        self.timestamps = self._alloc(block.timestamps[row : row + 1, :length], capacity)
        self._refresh_views()

    @staticmethod
    def _alloc(filled: torch.Tensor, capacity: int) -> torch.Tensor:
        """A buffer of `capacity` tokens along the token axis (dim 2 of K/V [2, h, L, dh],
        dim 1 of positions [1, L]), its prefix = filled."""
        axis = 2 if filled.dim() == 4 else 1
        shape = list(filled.shape)
        shape[axis] = max(capacity, filled.shape[axis])
        buffer = filled.new_zeros(shape)
        buffer.narrow(axis, 0, filled.shape[axis]).copy_(filled)
        return buffer

    def _refresh_views(self) -> None:
        """Per-layer K and V views of the fused storage; rebuilt only when storage is reallocated."""
        self.keys = [kv[0:1] for kv in self.kv]  # [1, h, capacity, dh] each
        self.values = [kv[1:2] for kv in self.kv]
        self._view: tuple[int, BlockCache] | None = None

    @property
    def capacity(self) -> int:
        return self.positions.shape[1]

    def reserve(self, length: int) -> None:
        """Room for `length` tokens (reallocate with headroom if needed)."""
        if length <= self.capacity:
            return
        capacity = max(length, int(self.capacity * self.growth) + 1)
        self.kv = [self._alloc(kv.narrow(2, 0, self.length), capacity) for kv in self.kv]
        self.positions = self._alloc(self.positions.narrow(1, 0, self.length), capacity)
        self.timestamps = self._alloc(self.timestamps.narrow(1, 0, self.length), capacity)
        self._refresh_views()

    def view(self) -> BlockCache:
        """The filled part as a BlockCache of views, memoised per length: a cache hit scores
        straight from it, and rebuilding ~10 views per block per hit costs more than scoring
        a few candidates."""
        n = self.length
        if self._view is None or self._view[0] != n:
            valid = torch.ones(1, n, dtype=torch.bool, device=self.positions.device)
            self._view = (n, BlockCache([k[:, :, :n] for k in self.keys], [v[:, :, :n] for v in self.values],
                                        valid, self.positions[:, :n], self.timestamps[:, :n]))
        return self._view[1]

    @property
    def nbytes(self) -> int:
        tensors = [*self.kv, self.positions, self.timestamps]
        return sum(t.numel() * t.element_size() for t in tensors)


class HistoryBuffer:
    """One user's HistoryCache in BlockBuffers: what `extend_history` appends to in place."""

    def __init__(self, cache: HistoryCache, row: int, headroom: float = 0.25, max_len: int | None = None):
        """Copy row `row` of an encoded batch, each block with `headroom` spare capacity (capped at max_len)."""
        def capacity(block: BlockCache) -> int:
            length = int(block.valid[row].sum())
            room = max(length + 8, int(length * (1 + headroom)))
            return min(room, max(max_len, length)) if max_len else room

        self.blocks = [BlockBuffer(block, row, capacity(block)) for block in cache.blocks]
        self.length = int(cache.history_lengths[row])
        self.last_ts = int(cache.last_ts[row])
        self._view: tuple[tuple, HistoryCache] | None = None

    def view(self) -> HistoryCache:
        """The whole cache as views, memoised until the history or a block's storage changes."""
        blocks = [b.view() for b in self.blocks]
        key = (self.length, self.last_ts, *map(id, blocks))
        if self._view is None or self._view[0] != key:
            device = self.blocks[0].positions.device
            self._view = (key, HistoryCache(blocks, torch.tensor([self.length], device=device),
                                            torch.tensor([self.last_ts], device=device)))
        return self._view[1]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)


def single_block_layout(batch: RankBatch) -> BlockLayout:
    """The whole history as one block, trailing batch padding trimmed."""
    width = int(batch.history_lengths.max()) if len(batch.history_lengths) else 0
    index = torch.arange(width, device=batch.history_tracks.device).expand(len(batch.history_lengths), width)
    return BlockLayout(index, batch.history_mask[:, :width])


def candidate_key_mask(history_valid: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """bool [B, 1, M, L + M]: candidate m sees the valid history and itself, no other candidate."""
    own = torch.eye(n_candidates, dtype=torch.bool, device=history_valid.device)
    history = history_valid[:, None, :].expand(-1, n_candidates, -1)
    return torch.cat([history, own.expand(len(history_valid), -1, -1)], dim=2)[:, None]


# ----------------------------------------------------------------------------- softmax transformer

def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:  # [B, L, d] -> [B, h, L, d_head]
    B, L, d = x.shape
    return x.view(B, L, n_heads, d // n_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:  # [B, h, L, d_head] -> [B, L, d]
    B, h, L, dh = x.shape
    return x.transpose(1, 2).reshape(B, L, h * dh)


def scale_queries(q: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """Attention logits / (tau * sqrt(d_head)) == (q / tau) . k / sqrt(d_head); tau: [B, L, h]."""
    return q if tau is None else q / tau.transpose(1, 2).unsqueeze(-1)


def layer_keys_values(layers: nn.ModuleList, x: torch.Tensor, step) -> tuple[list, list]:
    """Per-layer K and V of a history, through `step(layer, x) -> (x_next, k, v)`.

    The last layer stops at its K/V projection: candidates attend to its keys and values,
    and nothing ever reads the history's output from it.
    """
    keys, values = [], []
    for layer in layers[:-1]:
        x, k, v = step(layer, x)
        keys.append(k)
        values.append(v)
    k, v = layers[-1].project_kv(x)
    return keys + [k], values + [v]


class SoftmaxLayer(nn.Module):
    """Pre-norm transformer layer, the same math as nn.TransformerEncoderLayer(norm_first=True)."""

    def __init__(self, cfg: SoftmaxConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        hidden = cfg.ffn_mult * d
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        return split_heads(q, self.n_heads), split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V only: the last layer's history needs nothing else (no query, no output)."""
        d = x.shape[-1]
        k, v = F.linear(self.norm1(x), self.qkv.weight[d:], self.qkv.bias[d:]).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def attend(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.out(merge_heads(attended)))
        return x + self.resid_dropout(self.ffn(self.norm2(x)))


def split_candidate_attention(q, k_hist, v_hist, k_own, v_own, history_bias: torch.Tensor | None) -> torch.Tensor:
    """SUMI attention without the M x M block: softmax over [history logits, own logit].

    Equal to SDPA over [history, candidates] with `candidate_key_mask`, but computes M x L
    history logits plus M self-logits instead of M x (L + M), of which M x (M - 1) are masked.
    q, k_own, v_own [B, h, M, dh]; k_hist, v_hist [B, h, L, dh]; history_bias [B, 1, 1, L + 1]
    (-inf at invalid history keys, from `history_key_bias`) or None when every key is valid.
    """
    q = q * q.shape[-1] ** -0.5
    logits = torch.cat([q @ k_hist.transpose(-1, -2), (q * k_own).sum(-1, keepdim=True)], dim=-1)
    if history_bias is not None:
        logits += history_bias
    weights = logits.softmax(dim=-1)
    return weights[..., :-1] @ v_hist + weights[..., -1:] * v_own


def history_key_bias(history_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask [B, 1, 1, L + 1] for split_candidate_attention (the last slot is the
    candidate itself), or None when no history key is masked (one user, no padding)."""
    if bool(history_valid.all()):
        return None
    bias = torch.zeros(*history_valid.shape[:1], 1, 1, history_valid.shape[1] + 1, dtype=dtype,
                       device=history_valid.device)
    bias[:, 0, 0, :-1].masked_fill_(~history_valid, float("-inf"))
    return bias


CANDIDATE_ATTENTION = ("sdpa", "split")


class OneTokenPlanStack(nn.Module):
    """A block stack whose `extend_one` keeps a `_one_token_plan` of its parameters in a plain
    attribute; it is dropped whenever Parameters may be replaced (`.to()`, `load_state_dict`)."""

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_one_token_plan", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self.__dict__.pop("_one_token_plan", None)
        super()._load_from_state_dict(*args, **kwargs)


class SoftmaxStack(OneTokenPlanStack):
    """A stack of SoftmaxLayers run in the two serving steps: encode history, attend candidates.

    `candidate_attention` is a serving choice, not a hyperparameter (the math is the same):
    "sdpa" runs one fused kernel with the SUMI mask (the CUDA path), "split" skips the
    masked M x M candidate block: 1.3-2x faster stage two on CPU at n in {256, 512},
    M in {128, 200, 512}, equal at M = 16 (bench/serve.py measures both).
    """

    def __init__(self, cfg: SoftmaxConfig):
        super().__init__()
        self.layers = nn.ModuleList(SoftmaxLayer(cfg) for _ in range(cfg.n_layers))
        self.candidate_attention = "sdpa"

    def encode(self, x: torch.Tensor, layout: BlockLayout, timestamps: torch.Tensor, tau: torch.Tensor | None = None):
        """Causal self-attention over one block's history; returns per-layer K and V.

        Padding sits after the valid prefix, so a causal mask alone keeps real tokens off it.
        """
        def step(layer: SoftmaxLayer, x: torch.Tensor):
            q, k, v = layer.project(x)
            return layer.finish(x, layer.attend(scale_queries(q, tau), k, v)), k, v

        return layer_keys_values(self.layers, x, step)

    def attend_candidates(
        self, c: torch.Tensor, block: BlockCache, positions: torch.Tensor, request_ts: torch.Tensor,
        tau: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Candidates [B, M, d] through every layer against the block's cached K/V.

        positions and request_ts (the candidates' place in time) are unused by softmax
        attention; HSTU's relative bias needs them, and both stacks share one signature.
        """
        split = self.candidate_attention == "split" and not self.training
        if split:
            bias = history_key_bias(block.valid, c.dtype)
        else:
            mask = candidate_key_mask(block.valid, c.shape[1])
        for layer, k_hist, v_hist in zip(self.layers, block.keys, block.values):
            q, k, v = layer.project(c)
            q = scale_queries(q, tau)
            if split:
                attended = split_candidate_attention(q, k_hist, v_hist, k, v, bias)
            else:
                attended = layer.attend(q, torch.cat([k_hist, k], 2), torch.cat([v_hist, v], 2), mask)
            c = layer.finish(c, attended)
        return c

    def extend(self, x: torch.Tensor, block: BlockBuffer, start: int, tau: torch.Tensor | None = None) -> None:
        """Append k new tokens x [1, k, d] at [start, start + k) of the block's buffers, in place.

        Each new token attends the cached prefix and the new tokens before it (the same
        causal rule as `encode`), so the buffers end up as a full re-encode would fill them.
        Capacity must already be reserved.
        """
        end = start + x.shape[1]
        causal = None  # one new token sees every key
        if x.shape[1] > 1:
            causal = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            q, k, v = (None, *layer.project_kv(x)) if last else layer.project(x)
            block.keys[i][:, :, start:end] = k
            block.values[i][:, :, start:end] = v
            if not last:
                attended = F.scaled_dot_product_attention(
                    scale_queries(q, tau), block.keys[i][:, :, :end], block.values[i][:, :, :end], attn_mask=causal)
                x = layer.finish(x, attended)

    def extend_one(self, x: torch.Tensor, block: BlockBuffer, at: int, query_scale: torch.Tensor | float) -> None:
        """`extend` for one new token x [1, d] at index `at` of the block: the serving hot path.

        The same math as `extend` (tests compare them) in 15 ATen calls for two layers:
        functional layer norms and linears on the cached weights (`_one_token_plan`), K and
        V written with one copy into the fused storage, and the single query's attention as
        bmm-softmax-bmm over views of the cache (no mask, no SDPA dispatch, no module calls).
        query_scale is 1 / (tau sqrt(d_head)), [h, 1, 1] (`query_scales`) or a float.
        Capacity must already be reserved.
        """
        end = at + 1
        plan = self.__dict__.get("_one_token_plan") or self._one_token_plan()
        last = len(plan) - 1
        d = x.shape[-1]
        for i, (norm1, qkv_w, qkv_b, out_w, out_b, norm2, up_w, up_b, down_w, down_b) in enumerate(plan):
            kv = block.kv[i]  # [2, h, capacity, dh]
            h, dh = kv.shape[1], kv.shape[3]
            qkv = F.linear(F.layer_norm(x, (d,), *norm1), qkv_w, qkv_b).view(3, h, dh)
            kv.select(2, at).copy_(qkv[1:])  # K and V of the new token
            if i == last:  # nothing reads the last layer's history output
                return
            weights = torch.bmm(qkv[0].unsqueeze(1) * query_scale, kv[0, :, :end].transpose(1, 2)).softmax(-1)  # [h, 1, end]
            x = x + F.linear(torch.bmm(weights, kv[1, :, :end]).view(1, d), out_w, out_b)  # heads merged
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), *norm2), up_w, up_b)), down_w, down_b)

    def _one_token_plan(self) -> list[tuple]:
        """Each layer's parameters in `extend_one`'s order, gathered once: ~30 module
        attribute lookups cost about as much as the step's arithmetic. It holds the Parameter
        objects themselves, so in-place loads, optimiser steps and .to() (which swaps
        param.data) keep it current; `_apply` and `_load_from_state_dict` drop it for the
        cases that replace Parameters."""
        plan = [((layer.norm1.weight, layer.norm1.bias, layer.norm1.eps), layer.qkv.weight, layer.qkv.bias,
                 layer.out.weight, layer.out.bias, (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
                 layer.ffn[0].weight, layer.ffn[0].bias, layer.ffn[3].weight, layer.ffn[3].bias)
                for layer in self.layers]
        self.__dict__["_one_token_plan"] = plan  # a plain attribute: not a submodule, not in state_dict
        return plan

    @staticmethod
    def query_scales(tau: torch.Tensor | None, d_head: int) -> torch.Tensor | float:
        """What `extend_one` multiplies queries by: 1 / (tau sqrt(d_head)), tau [..., h] -> [..., h, 1, 1]."""
        return d_head**-0.5 if tau is None else (tau * d_head**0.5).reciprocal()[..., None, None]

    @staticmethod
    def flops(cfg: SoftmaxConfig, history_len: int, n_candidates: int) -> dict[str, int]:
        """Forward matmul FLOPs (2 per multiply-add) of one block for one request.

        history: (n_layers-1) full layers + the last layer's K/V projection, attention over
        the full L x L rectangle (as a dense kernel computes it). Candidates: every layer,
        each candidate attending L history keys + M keys of which it keeps one (the mask).
        """
        d, L, M, layers = cfg.d_model, history_len, n_candidates, cfg.n_layers
        per_token_linear = 2 * d * (3 * d) + 2 * d * d + 2 * 2 * d * cfg.ffn_mult * d
        return {
            "linear": (layers - 1) * L * per_token_linear + L * 2 * d * 2 * d + layers * M * per_token_linear,
            "history_attention": (layers - 1) * 4 * L * L * d,
            "candidate_attention": layers * 4 * M * (L + M) * d,
        }


# ----------------------------------------------------------------------------- heads and model base

class TaskHeads(nn.Module):
    """Final norm, a shared hidden layer, then one logit per task."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.head_hidden or cfg.d_model
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, len(TASKS))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def flops(cfg: ModelConfig, n_candidates: int) -> int:
        hidden = cfg.head_hidden or cfg.d_model
        return n_candidates * (2 * cfg.d_model * hidden + 2 * hidden * len(TASKS))


def check_batch(batch: RankBatch, cfg: ModelConfig) -> None:
    """Fail with a message naming the field, not an index error deep inside an embedding."""
    B, n = batch.history_tracks.shape
    for name in ("history_behaviours", "history_scenarios", "history_ts"):
        if getattr(batch, name).shape != (B, n):
            raise ValueError(f"RankBatch.{name} has shape {tuple(getattr(batch, name).shape)}, expected {(B, n)}")
    M = batch.candidate_tracks.shape[1] if batch.candidate_tracks.dim() == 2 else -1
    if batch.candidate_tracks.shape != (B, M) or batch.candidate_mask.shape != (B, M):
        raise ValueError(
            f"candidate_tracks {tuple(batch.candidate_tracks.shape)} and candidate_mask "
            f"{tuple(batch.candidate_mask.shape)} must both be [B={B}, M]"
        )
    for name in ("history_lengths", "scenario", "request_ts"):
        if getattr(batch, name).shape != (B,):
            raise ValueError(f"RankBatch.{name} has shape {tuple(getattr(batch, name).shape)}, expected {(B,)}")
    if n > cfg.max_len:
        raise ValueError(f"history length {n} exceeds the model's max_len={cfg.max_len}")
    limits = {
        "history_tracks": cfg.n_tracks, "candidate_tracks": cfg.n_tracks, "history_lengths": n,
        "history_behaviours": len(BEHAVIOURS) - 1, "history_scenarios": len(SCENARIOS) - 1, "scenario": len(SCENARIOS) - 1,
    }
    for name, high in limits.items():
        t = getattr(batch, name)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > high):
            raise ValueError(f"RankBatch.{name} must be in [0, {high}], got [{int(t.min())}, {int(t.max())}]")


class OneEvent(NamedTuple):
    """One appended event as host integers: what the one-token serving path needs to embed it."""

    track: int
    behaviour: int
    scenario: int
    timestamp: int  # epoch ms
    gap: int  # time-gap bucket (history_time_gaps), 0 for the first event


class WeightDerivedTables:
    """Tables computed from weights (AstroModel's per-code rows for one-event updates), with
    the (data pointer, in-place version) of every tensor they read: stale once either moves."""

    def __init__(self, params: list[torch.Tensor], rows: Any):
        self.params = params
        self.rows = rows
        self.key = self.version()

    def version(self) -> tuple:
        return tuple((t.data_ptr(), t._version) for t in self.params)


class SequenceRanker(nn.Module):
    """Base of every family: forward is `score_candidates(encode_history(batch), batch)`."""

    family: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    SIZES: ClassVar[dict[str, dict[str, Any]]]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.config = cfg
        self.embed = TokenEmbedding(cfg)
        self.heads = TaskHeads(cfg)
        self.register_buffer("task_weights", torch.tensor(cfg.task_weights, dtype=torch.float32), persistent=False)

    def encode_history(self, batch: RankBatch) -> HistoryCache:
        raise NotImplementedError

    def score_candidates(self, cache: HistoryCache, batch: RankBatch) -> torch.Tensor:
        raise NotImplementedError

    def flops_breakdown(self, n: int, M: int) -> dict[str, int]:
        raise NotImplementedError

    # -- incremental history (TURBO's per-user cache)

    def can_extend(self, cached_length: int, new_length: int) -> bool:
        """Whether appending events [cached_length, new_length) leaves every cached K/V valid.

        True when blocks only grow at their end; a partition whose blocks slide (recency
        windows) says False and the cache re-encodes. A sliding max_len window is the
        caller's to detect (the cached tokens are no longer a prefix).
        """
        return new_length > cached_length

    def extend_history(self, history: HistoryBuffer, batch: RankBatch) -> None:
        """Append the events past `history.length` of `batch` (one row: the cached history
        plus k new events, in order) to `history` in place, computing K/V for those k only.

        The caller guarantees the cached tokens are the batch's prefix; afterwards
        `history.view()` equals `encode_history(batch)` up to float rounding.
        """
        raise NotImplementedError

    def _extension_range(self, history: HistoryBuffer, batch: RankBatch) -> tuple[int, int]:
        """[start, end) of the new events, the batch's shape checked; their values are checked
        by `_check_new_values` (k events) or `_one_event` (one). Only the new tokens are
        checked: the prefix was checked when it was encoded, and checking it again would
        cost more than the update itself."""
        if self.training:
            raise RuntimeError("extend_history is for inference; call model.eval() first")
        if len(batch.history_lengths) != 1:
            raise ValueError(f"extend_history takes one user's batch, got {len(batch.history_lengths)} rows")
        start, end = history.length, int(batch.history_lengths[0])
        if not self.can_extend(start, end):
            raise ValueError(f"cannot extend a cached history of {start} events to {end} events; re-encode it")
        if end > self.config.max_len or end > batch.history_tracks.shape[1]:
            raise ValueError(f"history length {end} exceeds the model's max_len={self.config.max_len} "
                             f"or the batch width {batch.history_tracks.shape[1]}")
        return start, end

    def _value_limits(self) -> dict[str, int]:
        return {"history_tracks": self.config.n_tracks, "history_behaviours": len(BEHAVIOURS) - 1,
                "history_scenarios": len(SCENARIOS) - 1}

    def _check_new_values(self, batch: RankBatch, start: int, end: int) -> None:
        """The ids of events [start, end) are inside their tables (one stacked check, one sync)."""
        limits = self._value_limits()
        new = torch.stack([getattr(batch, name)[0, start:end] for name in limits])
        high = torch.tensor(list(limits.values()), device=new.device)[:, None]
        if bool(((new < 0) | (new > high)).any()):
            for (name, top), row in zip(limits.items(), new):
                if int(row.min()) < 0 or int(row.max()) > top:
                    raise ValueError(f"RankBatch.{name} must be in [0, {top}], got [{int(row.min())}, {int(row.max())}]")

    def _one_event(self, batch: RankBatch, at: int) -> OneEvent:
        """Event `at` of the batch's single row as host integers, checked like `_check_new_values`."""
        columns = (batch.history_tracks, batch.history_behaviours, batch.history_scenarios, batch.history_ts)
        if batch.history_ts.device.type == "cpu":  # numpy views read a scalar in ~0.1 us, .item() in ~3 us
            columns = tuple(column.numpy() for column in columns)
        codes = [int(column[0, at]) for column in columns[:3]]
        for (name, top), value in zip(self._value_limits().items(), codes):
            if not 0 <= value <= top:
                raise ValueError(f"RankBatch.{name} must be in [0, {top}], got [{value}, {value}]")
        stamps = [int(t) for t in columns[3][0, max(at - 1, 0) : at + 1]]
        gap = gap_bucket(stamps[-1] - stamps[0], self.config.n_time_buckets) if at else 0
        return OneEvent(*codes, stamps[-1], gap)

    def drop_derived_tables(self) -> None:
        """Forget what was computed from weights (AstroModel's per-code tables and tau table,
        SoftmaxStack's parameter plan); rebuilt on next use. In-place weight changes are
        detected anyway; this covers reloads that replace Parameter objects."""
        for module in self.modules():
            for name in ("_one_event_cache", "_one_token_plan", "_tau_cache"):
                module.__dict__.pop(name, None)

    def set_candidate_attention(self, kind: str) -> None:
        """Pick the candidate attention kernel of every softmax stack (see SoftmaxStack)."""
        if kind not in CANDIDATE_ATTENTION:
            raise ValueError(f"candidate attention must be one of {CANDIDATE_ATTENTION}, got {kind!r}")
        for module in self.modules():
            if isinstance(module, SoftmaxStack):
                module.candidate_attention = kind

    def forward(self, batch: RankBatch) -> torch.Tensor:
        """Logits [B, M, len(TASKS)]."""
        return self.score_candidates(self.encode_history(batch), batch)

    def score(self, logits: torch.Tensor, candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Ranking score [B, M] = sum_t task_weights[t] * sigmoid(logit_t); -inf at padding."""
        s = torch.sigmoid(logits) @ self.task_weights.to(logits.dtype)
        return s if candidate_mask is None else s.masked_fill(~candidate_mask, float("-inf"))

    def flops_per_request(self, n: int, M: int) -> int:
        """Analytic forward FLOPs for one request, history n and M candidates (see flops_breakdown)."""
        return sum(self.flops_breakdown(n, M).values())

    def n_params(self, include_embeddings: bool = True) -> int:
        params = {id(p): p for p in self.parameters()}  # shared block stacks count once
        if not include_embeddings:
            params.pop(id(self.embed.track.weight))
        return sum(p.numel() for p in params.values())


class SingleStackRanker(SequenceRanker):
    """One block (the whole history) through one stack: the SASRec- and HSTU-style baselines."""

    def __init__(self, cfg: ModelConfig, stack: nn.Module):
        super().__init__(cfg)
        self.stack = stack

    def encode_history(self, batch: RankBatch) -> HistoryCache:
        check_batch(batch, self.config)
        layout = single_block_layout(batch)
        width = layout.index.shape[1]
        x = self.embed.history(batch)[:, :width]
        timestamps = batch.history_ts[:, :width]
        keys, values = self.stack.encode(x, layout, timestamps)
        block = BlockCache(keys, values, layout.valid, layout.index, timestamps)
        return HistoryCache([block], batch.history_lengths, last_timestamps(batch))

    def score_candidates(self, cache: HistoryCache, batch: RankBatch) -> torch.Tensor:
        c = self.embed.candidates(batch, cache.history_lengths, cache.last_ts)
        c = self.stack.attend_candidates(c, cache.blocks[0], cache.history_lengths, batch.request_ts)
        return self.heads(c)

    def extend_history(self, history: HistoryBuffer, batch: RankBatch) -> None:
        start, end = self._extension_range(history, batch)
        if end - start == 1:  # every stack has extend_one, the one-token fast path
            self._extend_one(history, batch, start)
            return
        self._check_new_values(batch, start, end)
        x = self.embed.history(batch, start)[:, : end - start]
        block = history.blocks[0]
        block.reserve(end)
        block.positions[:, start:end] = torch.arange(start, end, device=x.device)
        block.timestamps[:, start:end] = batch.history_ts[:, start:end]
        self.stack.extend(x, block, start)
        block.length = history.length = end
        history.last_ts = int(batch.history_ts[0, end - 1])

    def _extend_one(self, history: HistoryBuffer, batch: RankBatch, at: int) -> None:
        """One new event through the stack's `extend_one` (the serving hot path)."""
        event = self._one_event(batch, at)
        block = history.blocks[0]
        block.reserve(at + 1)
        block.positions.select(1, at).fill_(at)  # fill_ on a view: ~4x cheaper than setitem
        block.timestamps.select(1, at).fill_(event.timestamp)
        self.stack.extend_one(self.embed.one_token(event, at), block, at, self.config.d_head**-0.5)
        block.length = history.length = at + 1
        history.last_ts = event.timestamp

    def flops_breakdown(self, n: int, M: int) -> dict[str, int]:
        flops = type(self.stack).flops(self.config, n, M)
        flops["heads"] = TaskHeads.flops(self.config, M)
        return flops


# ----------------------------------------------------------------------------- registry

_FAMILY_CLASSES = {"astro": "ranker.astro:AstroModel", "sasrec": "ranker.sasrec:SASRecModel", "hstu": "ranker.hstu:HSTUModel"}


def __getattr__(name: str) -> Any:
    """`MODEL_FAMILIES` is resolved on first use: the family modules import this one."""
    if name == "MODEL_FAMILIES":
        families = {}
        for family, target in _FAMILY_CLASSES.items():
            module, cls = target.split(":")
            families[family] = getattr(importlib.import_module(module), cls)
        return families
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def model_class(family: str) -> type[SequenceRanker]:
    families = __getattr__("MODEL_FAMILIES")
    if family not in families:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(families)}")
    return families[family]


def resolve_config(family: str, size: str, n_tracks: int, **overrides: Any) -> ModelConfig:
    """The config of `family` at ladder rung `size`, any field overridable: what a frozen
    config records, and what `build_model` builds."""
    cls = model_class(family)
    if size not in cls.SIZES:
        raise ValueError(f"unknown size {size!r} for {family}; known: {list(cls.SIZES)}")
    refuse_unknown_fields(cls.config_class, overrides, f"{cls.config_class.__name__} overrides")
    return cls.config_class(n_tracks=n_tracks, **{**cls.SIZES[size], **overrides})


def config_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """'key: recorded X, now Y' for each field that differs, compared as JSON and YAML hold
    values (tuples, nested too, are lists), so a config read back from a file can match."""
    def norm(value: Any) -> Any:
        return json.loads(json.dumps(value))

    keys = sorted(set(recorded) | set(now))
    return [f"{k}: recorded {recorded.get(k, '(absent)')!r}, now {norm(now.get(k, '(absent)'))!r}"
            for k in keys if norm(recorded.get(k)) != norm(now.get(k))]


def build_model(family: str, size: str, n_tracks: int, **overrides: Any) -> SequenceRanker:
    """A model of `family` at ladder rung `size`, any config field overridable."""
    return model_class(family)(resolve_config(family, size, n_tracks, **overrides))


def model_from_config(family: str, config: dict[str, Any]) -> SequenceRanker:
    """Rebuild a model (untrained) from a saved `config.to_dict()`; load weights after."""
    cls = model_class(family)
    return cls(cls.config_class.from_dict(config))


def softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# ----------------------------------------------------------------------------- synthetic input

def random_batch(B: int, n: int, M: int, n_tracks: int, seed: int = 0, min_length: int = 0) -> RankBatch:
    """A valid random RankBatch (ragged histories, time-ordered) for tests and FLOP/latency benchmarks."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, n + 1, (B,), generator=g)
    real = torch.arange(n)[None, :] < lengths[:, None]
    ts = 1_700_000_000_000 + torch.cumsum(torch.randint(0, 3_600_000, (B, n), generator=g), dim=1)
    return RankBatch(
        history_tracks=torch.randint(1, n_tracks + 1, (B, n), generator=g) * real,
        history_behaviours=torch.randint(1, len(BEHAVIOURS), (B, n), generator=g) * real,  # no impressions
        history_scenarios=torch.randint(0, len(SCENARIOS), (B, n), generator=g) * real,
        history_ts=ts * real,
        history_lengths=lengths,
        candidate_tracks=torch.randint(1, n_tracks + 1, (B, M), generator=g),
        candidate_mask=torch.ones(B, M, dtype=torch.bool),
        scenario=torch.randint(0, len(SCENARIOS), (B,), generator=g),
        request_ts=ts[:, -1] + 60_000,
    )


if __name__ == "__main__":  # python -m ranker.model_common: the size ladder's cost table
    n, M, catalogue = 256, 32, 50_000
    print(f"n={n} M={M} n_tracks={catalogue}")
    print(f"{'family':8} {'size':4} {'params':>12} {'non-emb':>12} {'MFLOPs/request':>15}")
    for family in _FAMILY_CLASSES:
        for size in SIZE_NAMES:
            model = build_model(family, size, catalogue)
            mflops = model.flops_per_request(n, M) / 1e6
            print(f"{family:8} {size:4} {model.n_params():>12,} {model.n_params(False):>12,} {mflops:>15.1f}")
