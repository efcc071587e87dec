"""HSTU-style baseline (Meta, arXiv 2402.17152): pointwise SiLU attention, no softmax.

Per layer (norm "pre", Meta's layout and the default):
            U, Q, K, V = SiLU(f1(Norm(x)))
            A = SiLU(alpha * Q K^T + rab) / N, masked      (rab: relative position + time bias)
            x = x + f2(Norm(A V) * U)
norm "post" (RecBole's SASRec layout, which lifted the softmax layers on ML-100K): the
input tokens are layer-normed (TokenEmbedding) and each layer maps a normalised x to
            U, Q, K, V = SiLU(f1(x));  x = Norm_in(x + f2(Norm(A V) * U))
with the same LayerNorm module (norm_in) moved from the layer's input to its output, so
a layer's parameters and state-dict keys are the same in both layouts (only the token
embedding gains its input LayerNorm, `embed.norm.*`, as post-norm softmax layers do).
The last history layer stops at K/V (`layer_keys_values`): post-norm they read the layer
before's normalised output as it is, and that layer's output norm never runs on history
(candidates run it). ASTRO's shared candidate path drops the blocks' last-layer output
altogether, which would leave a post-norm norm_in unused: that combination is refused.
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

import torch
import torch.nn.functional as F
from torch import nn

from ranker.models.config import DEFAULT_SIZES, ModelConfig
from ranker.models.layers import (
    BlockCache,
    BlockLayout,
    Dropout,
    Sliceable,
    layer_keys_values,
    merge_heads,
    scale_queries,
    split_heads,
)
from ranker.models.base import SingleStackRanker
from ranker.models.embedding import log_bucket, seconds_bucket

SIZES = DEFAULT_SIZES


@dataclass(frozen=True, kw_only=True)
class PointwiseAttentionConfig:
    """The fields of HSTU's pointwise attention, stated once: HSTUConfig has them, and so does
    AstroConfig, whose pointwise blocks are HSTU layers. Keyword-only, so a config's
    positional fields stay ModelConfig's."""

    n_rab_buckets: int = 48  # half-octave buckets of position distance and of seconds apart
    attention_norm: int = 0  # N in A = SiLU(.) / N; 0 means max_len

    def check_pointwise_attention(self) -> None:
        if self.n_rab_buckets < 1 or self.attention_norm < 0:
            raise ValueError(
                f"n_rab_buckets must be >= 1 and attention_norm >= 0, got {self.n_rab_buckets}, {self.attention_norm}"
            )


@dataclass(frozen=True)
class HSTUConfig(PointwiseAttentionConfig, ModelConfig):
    # ModelConfig.norm picks the layer layout (see the module docstring).
    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_pointwise_attention()


class HSTULayer(Sliceable, nn.Module):
    """Sliced (Sliceable): only the active heads' U, Q, K and V rows of f1 and their columns
    of f2 are in the weights; the relative bias is taken for those heads. norm_attn still
    normalises over all d channels, the others at zero, as the masked layer does.

    norm_in is the input LayerNorm when pre-norm and the output LayerNorm when post-norm
    (`post_norm`): `project` / `project_kv` then read x as it is (already normalised by the
    layer before, or by TokenEmbedding) and `finish` normalises the residual sum."""

    def __init__(self, cfg: HSTUConfig):
        """cfg: an HSTUConfig, or any config with its fields (ASTRO's pointwise blocks pass an
        AstroConfig, which carries n_rab_buckets, attention_norm and norm too)."""
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.post_norm = cfg.norm == "post"
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
        self.dropout = Dropout(cfg.dropout)
        self.slices = {}

    def slice_to(self, heads: torch.Tensor | None = None) -> None:
        """Run on these heads only (None: all of them); f1 and f2 are swapped for their rows / columns."""
        self.set_active(heads, self.norm_in.normalized_shape[0] // self.n_heads)

    def layer_input(self, x: torch.Tensor) -> torch.Tensor:
        """What f1 reads: Norm(x) pre-norm; x itself post-norm (normalised already)."""
        return x if self.post_norm else self.norm_in(x)

    def project(self, x: torch.Tensor):
        u, q, k, v = F.silu(self.f1(self.layer_input(x))).chunk(4, dim=-1)
        h = self.heads_now(self.n_heads)
        return u, split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def project_kv(self, x: torch.Tensor):
        rows, h = self.f1.weight.shape[0] // 2, self.heads_now(self.n_heads)  # K and V: the second half of f1's rows
        k, v = F.silu(F.linear(self.layer_input(x), self.f1.weight[rows:], self.f1.bias[rows:])).chunk(2, dim=-1)
        return split_heads(k, h), split_heads(v, h)

    def bias_table(self) -> torch.Tensor:
        """[heads, n_buckets^2]: rab for every (position bucket, time bucket) pair, one lookup."""
        table = self.rab_position.weight[:, None, :] + self.rab_time.weight[None, :, :]
        table = table.view(-1, self.n_heads).t()
        heads = self.slices.get("heads")
        return table if heads is None else table.index_select(0, heads)

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
        """x + Dropout(f2(Norm(AV) * U)); post-norm, that sum through norm_in (all d channels:
        the residual stream is never sliced, only the heads are)."""
        channels = self.slices.get("channels")
        if channels is None:
            normed = self.norm_attn(merge_heads(attended))
        else:
            merged = merge_heads(attended)  # [B, L, active channels]; the norm sees the others at zero
            full = merged.new_zeros(*merged.shape[:-1], x.shape[-1]).index_copy(-1, channels, merged)
            normed = self.norm_attn(full).index_select(-1, channels)
        x = x + self.dropout(self.f2(normed * u))
        return self.norm_in(x) if self.post_norm else x


def relative_buckets(query_pos, query_ts, key_pos, key_ts, n_buckets: int):
    """Buckets of how many events and how many seconds a key lies before a query."""
    position = log_bucket(query_pos[:, :, None] - key_pos[:, None, :], n_buckets)
    time = seconds_bucket(query_ts[:, :, None] - key_ts[:, None, :], n_buckets)
    return position.mul_(n_buckets).add_(time)  # one index into HSTULayer.bias_table


class HSTUStack(nn.Module):
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
            return layer.finish(x, layer.attention(scale_queries(q, layer.head_tau(tau)), k, v, buckets), u), k, v

        return layer_keys_values(self.layers, x, step)

    def outputs(self, x: torch.Tensor, layout: BlockLayout, timestamps: torch.Tensor,
                tau: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer's full causal pass, [B, L, d] (the next-item objective's input)."""
        buckets = relative_buckets(layout.index, timestamps, layout.index, timestamps, self.n_buckets)
        for layer in self.layers:
            if layer.f2 is None:
                raise ValueError("this stack's last layer keeps K/V only (candidate_path='shared'); "
                                 "it has no per-position output for the next-item objective")
            u, q, k, v = layer.project(x)
            x = layer.finish(x, layer.attention(scale_queries(q, tau), k, v, buckets), u)
        return x

    def attend_candidates(
        self, c: torch.Tensor, block: BlockCache, positions: torch.Tensor, request_ts: torch.Tensor,
        tau: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """History keys with one bias row per request (broadcast over candidates), plus self."""
        buckets = relative_buckets(positions[:, None], request_ts[:, None], block.positions, block.timestamps, self.n_buckets)
        for layer, k_hist, v_hist in zip(self.layers, block.keys, block.values):
            u, q, k, v = layer.project(c)
            q = scale_queries(q, layer.head_tau(tau))
            c = layer.finish(c, layer.attention(q, k_hist, v_hist, buckets, block.valid) + layer.self_attention(q, k, v), u)
        return c

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
