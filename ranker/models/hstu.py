"""HSTU-style baseline (Meta, arXiv 2402.17152): pointwise SiLU attention, no softmax.

Per layer:  U, Q, K, V = SiLU(f1(Norm(x)))
            A = SiLU(alpha * Q K^T + rab) / N, masked      (rab: relative position + time bias)
            x = x + f2(Norm(A V) * U)
Without softmax the weights do not sum to 1, so the output keeps "how much" related history
there is, not just a weighted average; N is a constant (max_len), which also keeps a
token's output independent of padding and of later events (a cacheable prefix).
Candidates attend the cached history and themselves, as in every family here.

The stack takes an optional temperature tau [B, L, heads] per query token (ASTRO's
`block_attention="pointwise"` passes its dynamic temperature): the query is divided by
tau, so the logit becomes SiLU(alpha * (Q / tau) K^T + rab). rab is not divided: it is a
learned bias per bucket and needs no rescaling, and dividing it per query would cost a
pass over B x h x L x L. The HSTU baseline passes no tau (tau = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ranker.models.config import DEFAULT_SIZES, ModelConfig
from ranker.models.layers import (
    BlockCache,
    BlockLayout,
    OneTokenPlanStack,
    layer_keys_values,
    merge_heads,
    scale_queries,
    split_heads,
)
from ranker.models.base import SingleStackRanker
from ranker.models.embedding import log_bucket, seconds_bucket

if TYPE_CHECKING:
    from ranker.serving.cache import BlockBuffer

SIZES = DEFAULT_SIZES


@dataclass(frozen=True)
class HSTUConfig(ModelConfig):
    n_rab_buckets: int = 48  # half-octave buckets of position distance and of seconds apart
    attention_norm: int = 0  # N in A = SiLU(.) / N; 0 means max_len

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_rab_buckets < 1 or self.attention_norm < 0:
            raise ValueError(
                f"n_rab_buckets must be >= 1 and attention_norm >= 0, got {self.n_rab_buckets}, {self.attention_norm}"
            )


class HSTULayer(nn.Module):
    def __init__(self, cfg: HSTUConfig):
        """cfg: an HSTUConfig, or any config with its fields (ASTRO's pointwise blocks pass an
        AstroConfig, which carries n_rab_buckets and attention_norm too)."""
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.alpha = cfg.d_head**-0.5
        self.norm = float(cfg.attention_norm or cfg.max_len)
        self.n_buckets = cfg.n_rab_buckets
        self.norm_in = nn.LayerNorm(d)
        self.f1 = nn.Linear(d, 4 * d)  # U, Q, K, V (K and V last, so project_kv is one slice)
        self.norm_attn = nn.LayerNorm(d)
        self.f2 = nn.Linear(d, d)
        self.rab_position = nn.Embedding(cfg.n_rab_buckets, cfg.n_heads)
        self.rab_time = nn.Embedding(cfg.n_rab_buckets, cfg.n_heads)
        nn.init.zeros_(self.rab_position.weight)
        nn.init.zeros_(self.rab_time.weight)
        self.dropout = nn.Dropout(cfg.dropout)

    def project(self, x: torch.Tensor):
        u, q, k, v = F.silu(self.f1(self.norm_in(x))).chunk(4, dim=-1)
        return u, split_heads(q, self.n_heads), split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def project_kv(self, x: torch.Tensor):
        d = x.shape[-1]
        k, v = F.silu(F.linear(self.norm_in(x), self.f1.weight[2 * d :], self.f1.bias[2 * d :])).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def bias_table(self) -> torch.Tensor:
        """[heads, n_buckets^2]: rab for every (position bucket, time bucket) pair, one lookup."""
        table = self.rab_position.weight[:, None, :] + self.rab_time.weight[None, :, :]
        return table.view(-1, self.n_heads).t()

    def attention(self, q, k, v, buckets: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """SiLU(alpha q.k + rab) / N, masked, times V. q [B, h, Lq, dh]; k, v [B, h, Lk, dh].

        buckets [B, Lq or 1, Lk] from relative_buckets; keep bool [B, Lk] masks keys,
        [B, Lq, Lk] masks per query, and None means causal (Lq == Lk). Heads go first
        internally so the bias gather lands in place and one baddbmm adds it: HSTU's cost
        is in these B x h x Lq x Lk passes.
        """
        B, h, Lq, dh = q.shape
        Lk = k.shape[2]
        bias = self.bias_table()[:, buckets].reshape(h * B, buckets.shape[1], Lk)  # explicit: Lk may be 0
        heads_first = lambda t: t.transpose(0, 1).reshape(h * B, -1, dh)  # noqa: E731
        w = F.silu(torch.baddbmm(bias, heads_first(q * self.alpha), heads_first(k).transpose(1, 2)))
        if keep is None:
            w.tril_()
        else:  # keep [B, Lk] (per key) or [B, Lq, Lk] (per query and key)
            keep = keep[:, None] if keep.dim() == 2 else keep
            w.masked_fill_(~keep[None].expand(h, *keep.shape).reshape(h * B, keep.shape[1], Lk), 0.0)
        return (torch.bmm(w, heads_first(v)) / self.norm).view(h, B, Lq, dh).transpose(0, 1)

    def self_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A candidate's weight on itself: same formula, distance 0 (bucket 0)."""
        rab = self.bias_table()[:, 0].view(1, -1, 1, 1)
        return F.silu(self.alpha * (q * k).sum(-1, keepdim=True) + rab) / self.norm * v

    def finish(self, x: torch.Tensor, attended: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.f2(self.norm_attn(merge_heads(attended)) * u))


def relative_buckets(query_pos, query_ts, key_pos, key_ts, n_buckets: int):
    """Buckets of how many events and how many seconds a key lies before a query."""
    position = log_bucket(query_pos[:, :, None] - key_pos[:, None, :], n_buckets)
    time = seconds_bucket(query_ts[:, :, None] - key_ts[:, None, :], n_buckets)
    return position.mul_(n_buckets).add_(time)  # one index into HSTULayer.bias_table


class HSTUStack(OneTokenPlanStack):
    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
        self.n_buckets = cfg.n_rab_buckets

    def encode(self, x: torch.Tensor, layout: BlockLayout, timestamps: torch.Tensor, tau: torch.Tensor | None = None):
        # Only layers before the last attend the history (`layer_keys_values`): a one-layer
        # stack, the default, needs no [B, L, L] bias buckets at all.
        if len(self.layers) > 1:
            buckets = relative_buckets(layout.index, timestamps, layout.index, timestamps, self.n_buckets)

        def step(layer: HSTULayer, x: torch.Tensor):
            u, q, k, v = layer.project(x)
            return layer.finish(x, layer.attention(scale_queries(q, tau), k, v, buckets), u), k, v

        return layer_keys_values(self.layers, x, step)

    def attend_candidates(
        self, c: torch.Tensor, block: BlockCache, positions: torch.Tensor, request_ts: torch.Tensor,
        tau: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """History keys with one bias row per request (broadcast over candidates), plus self."""
        buckets = relative_buckets(positions[:, None], request_ts[:, None], block.positions, block.timestamps, self.n_buckets)
        for layer, k_hist, v_hist in zip(self.layers, block.keys, block.values):
            u, q, k, v = layer.project(c)
            q = scale_queries(q, tau)
            c = layer.finish(c, layer.attention(q, k_hist, v_hist, buckets, block.valid) + layer.self_attention(q, k, v), u)
        return c

    def extend(self, x: torch.Tensor, block: BlockBuffer, start: int, tau: torch.Tensor | None = None) -> None:
        """Append k new tokens x [1, k, d] at [start, start + k) of the block's buffers (see
        SoftmaxStack.extend); their positions and timestamps must already be written."""
        end = start + x.shape[1]
        positions, timestamps = block.positions[:, :end], block.timestamps[:, :end]
        buckets = relative_buckets(positions[:, start:], timestamps[:, start:], positions, timestamps, self.n_buckets)
        causal = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            u, q, k, v = (None, None, *layer.project_kv(x)) if last else layer.project(x)
            block.keys[i][:, :, start:end] = k
            block.values[i][:, :, start:end] = v
            if not last:
                keys, values = block.keys[i][:, :, :end], block.values[i][:, :, :end]
                attended = layer.attention(scale_queries(q, tau), keys, values, buckets, causal[None])
                x = layer.finish(x, attended, u)

    def extend_one(self, x: torch.Tensor, block: BlockBuffer, at: int, query_scale: torch.Tensor | float) -> None:
        """`extend` for one new token x [1, d] at index `at` of the block: the serving hot path.

        The same math as `extend` (tests compare them) without its per-call set-up: the last
        layer, the only one a one-layer stack has, is a layer norm, one linear on the K/V rows
        of f1 and a SiLU, written with one copy into the fused K/V storage. Earlier layers
        attend the whole cached prefix (one query sees every earlier key, so no mask) with
        the new token's bias row. query_scale is alpha / tau, [h, 1, 1] or a float
        (`SoftmaxStack.query_scales`: the same 1 / (tau sqrt(d_head))). Capacity must
        already be reserved, and the token's position and timestamp written.
        """
        end = at + 1
        d = x.shape[-1]
        last = len(self.layers) - 1
        last_norm, last_kv_weight, last_kv_bias = self.__dict__.get("_one_token_plan") or self._one_token_plan()
        for i, layer in enumerate(self.layers):
            kv = block.kv[i]  # [2, h, capacity, dh]
            h, dh = kv.shape[1], kv.shape[3]
            if i == last:  # nothing reads the last layer's history output: K and V only
                normed = F.layer_norm(x, (d,), *last_norm)
                kv.select(2, at).copy_(F.silu(F.linear(normed, last_kv_weight, last_kv_bias)).view(2, h, dh))
                return
            normed = F.layer_norm(x, (d,), layer.norm_in.weight, layer.norm_in.bias, layer.norm_in.eps)
            u, q, k, v = F.silu(F.linear(normed, layer.f1.weight, layer.f1.bias)).view(4, h, dh).unbind(0)
            kv[0, :, at].copy_(k)
            kv[1, :, at].copy_(v)
            buckets = relative_buckets(block.positions[:, at:end], block.timestamps[:, at:end],
                                       block.positions[:, :end], block.timestamps[:, :end], self.n_buckets)  # [1, 1, end]
            bias = layer.bias_table()[:, buckets[0]]  # [h, 1, end]
            weights = F.silu(torch.baddbmm(bias, q.unsqueeze(1) * query_scale, kv[0, :, :end].transpose(1, 2)))  # [h, 1, end]
            attended = (torch.bmm(weights, kv[1, :, :end]) / layer.norm).view(1, d)  # heads merged
            x = x + F.linear(F.layer_norm(attended, (d,), layer.norm_attn.weight, layer.norm_attn.bias,
                                          layer.norm_attn.eps) * u.reshape(1, d), layer.f2.weight, layer.f2.bias)

    def _one_token_plan(self) -> tuple:
        """The last layer's norm and the K/V rows of its f1, gathered once: module attribute
        lookups and the two slices cost as much as the one-layer step's arithmetic. Views of
        the Parameters, so in-place updates show through (see OneTokenPlanStack)."""
        layer = self.layers[-1]
        d = layer.f2.weight.shape[0]
        plan = ((layer.norm_in.weight, layer.norm_in.bias, layer.norm_in.eps), layer.f1.weight[2 * d:], layer.f1.bias[2 * d:])
        self.__dict__["_one_token_plan"] = plan  # a plain attribute: not a submodule, not in state_dict
        return plan

    @staticmethod
    def flops(cfg: HSTUConfig, history_len: int, n_candidates: int) -> dict[str, int]:
        """As SoftmaxStack.flops: f1 (8 d^2) + f2 (2 d^2) per token per layer, last history
        layer K/V only (4 d^2); attention 4 L^2 d per history layer, 4 M (L + 1) d per candidate layer."""
        d, L, M, layers = cfg.d_model, history_len, n_candidates, cfg.n_layers
        per_token_linear = 2 * d * 4 * d + 2 * d * d
        return {
            "linear": (layers - 1) * L * per_token_linear + L * 2 * d * 2 * d + layers * M * per_token_linear,
            "history_attention": (layers - 1) * 4 * L * L * d,
            "candidate_attention": layers * 4 * M * (L + 1) * d,
        }


class HSTUModel(SingleStackRanker):
    family = "hstu"
    config: HSTUConfig
    config_class = HSTUConfig
    SIZES = SIZES

    def __init__(self, cfg: HSTUConfig):
        super().__init__(cfg, HSTUStack(cfg))
