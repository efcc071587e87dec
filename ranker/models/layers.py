"""Layers every family shares: block layouts, the encoded history (`HistoryCache`), the
softmax transformer stack and the task heads.

A stack runs in the two serving steps: `encode` the history (per-layer K/V, causal) and
`attend_candidates` (each candidate sees its block's history and itself: SUMI scoring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import TASKS, RankBatch
from ranker.models.config import ModelConfig, SoftmaxConfig

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
    """x [B, n, ...] -> [B, L, ...] at index [B, L] (each in [0, n)).

    One row lookup in the flattened [B * n, ...] tensor: the index stays [B * L], where
    take_along_dim would expand it to x's trailing shape and check and wrap every entry,
    and the backward adds whole rows (index_add) instead of scattering single entries."""
    B, n = x.shape[:2]
    rows = (index + torch.arange(B, device=index.device)[:, None] * n).reshape(-1)
    return x.reshape(B * n, *x.shape[2:]).index_select(0, rows).view(*index.shape, *x.shape[2:])


def gather_tokens_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gather_tokens written the obvious way (tests compare the two, values and gradients)."""
    return torch.take_along_dim(x, index.view(*index.shape, *([1] * (x.dim() - 2))), dim=1)


class Dropout(nn.Module):
    """nn.Dropout's function (each entry zeroed with probability p, the rest scaled by
    1 / (1 - p); the identity in eval mode) with a cheaper mask on CPU: one float32
    uniform per entry, where nn.Dropout's bernoulli_ draws a float64 (two 32-bit words of
    the generator, serially). The mask is the same distribution up to p's rounding to
    2^-24; the draws differ, so a seed gives other masks than nn.Dropout would."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return _ScaledMask.apply(x, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _ScaledMask(torch.autograd.Function):
    """x * mask, mask = (uniform >= p) / (1 - p) in x's dtype: one tensor kept for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:  # type: ignore[override]
        mask = torch.rand(x.shape, dtype=x.dtype, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


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


def head_rows(heads: torch.Tensor, d_head: int, offsets: tuple[int, ...]) -> torch.Tensor:
    """Row indices of these heads' channels in each projection stacked at `offsets` (e.g.
    q, k, v at 0, d, 2d): concatenated per projection, so `.chunk(len(offsets))` still splits them."""
    per_head = (heads[:, None] * d_head + torch.arange(d_head, device=heads.device)).flatten()
    return torch.cat([per_head + offset for offset in offsets])


class Sliceable:
    """A layer that can run on a structured subset of its units (ranker.training.growth's
    sliced sparse phases). The growth code swaps the layer's prunable weights for
    physically smaller ones (the active units' rows or columns) and sets `slices`: the
    active heads (and, where a layer needs them, their channels) for what is not a weight,
    e.g. the temperature and relative bias of each head. Empty for the full layer; only
    training sets it, so a model that serves always has it empty."""

    slices: dict[str, torch.Tensor]

    def head_tau(self, tau: torch.Tensor | None) -> torch.Tensor | None:
        """tau [..., heads] of the heads this layer runs on now."""
        heads = self.slices.get("heads")
        return tau if tau is None or heads is None else tau.index_select(-1, heads)

    def heads_now(self, n_heads: int) -> int:
        heads = self.slices.get("heads")
        return n_heads if heads is None else len(heads)

    def set_active(self, heads: torch.Tensor | None = None, d_head: int = 1, **units: torch.Tensor | None) -> None:
        """`slices`: the active heads and their channels, and any other kind of units."""
        self.slices = {} if heads is None else {"heads": heads, "channels": head_rows(heads, d_head, (0,))}
        self.slices.update({kind: index for kind, index in units.items() if index is not None})


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


class SoftmaxLayer(Sliceable, nn.Module):
    """Transformer layer, the same math as nn.TransformerEncoderLayer(norm_first=True) for
    cfg.norm "pre", (norm_first=False) for "post" (RecBole's SASRec: norm1 after attention,
    norm2 after the feed-forward, the input tokens normalised by TokenEmbedding).

    Sliced (see Sliceable): only the active heads (q, k, v rows of `qkv`, columns of `out`)
    and feed-forward units (rows of ffn.0, columns of ffn.3) are in the weights.
    """

    def __init__(self, cfg: SoftmaxConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.post_norm = cfg.norm == "post"
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        hidden = cfg.ffn_mult * d
        self.ffn = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), Dropout(cfg.dropout), nn.Linear(hidden, d))
        self.resid_dropout = Dropout(cfg.dropout)
        self.slices = {}

    def slice_to(self, heads: torch.Tensor | None = None, ffn: torch.Tensor | None = None) -> None:
        """Run on these heads and these feed-forward units (None: all of them); the growth
        code has swapped qkv, out, ffn.0 and ffn.3 for their active rows or columns."""
        self.set_active(heads, self.out.out_features // self.n_heads, ffn=ffn)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.post_norm else self.norm1(x)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(self.attention_input(x)).chunk(3, dim=-1)
        h = self.heads_now(self.n_heads)
        return split_heads(q, h), split_heads(k, h), split_heads(v, h)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V only: the last layer's history needs nothing else (no query, no output)."""
        rows, h = self.qkv.weight.shape[0] // 3, self.heads_now(self.n_heads)  # rows: q's (d, or the active heads')
        k, v = F.linear(self.attention_input(x), self.qkv.weight[rows:], self.qkv.bias[rows:]).chunk(2, dim=-1)
        return split_heads(k, h), split_heads(v, h)

    def attend(self, q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None)

    def finish(self, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        x = x + self.resid_dropout(self.out(merge_heads(attended)))
        if self.post_norm:
            x = self.norm1(x)
            return self.norm2(x + self.resid_dropout(self.ffn(x)))
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




class SoftmaxStack(nn.Module):
    """A stack of SoftmaxLayers run in the two serving steps: encode history, attend candidates.

    `candidate_attention` is a serving choice, not a hyperparameter (the math is the same):
    "sdpa" runs one fused kernel with the SUMI mask (the CUDA path), "split" skips the
    masked M x M candidate block, which pays on CPU once M is large against L (bench/serve.py
    measures both; the figures are in docs/results.md).
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
            return layer.finish(x, layer.attend(scale_queries(q, layer.head_tau(tau)), k, v)), k, v

        return layer_keys_values(self.layers, x, step)

    def outputs(self, x: torch.Tensor, layout: BlockLayout, timestamps: torch.Tensor,
                tau: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer's full causal pass, [B, L, d]: token t's output sees tokens <= t, what
        the next-item objective reads at every position."""
        for layer in self.layers:
            q, k, v = layer.project(x)
            x = layer.finish(x, layer.attend(scale_queries(q, tau), k, v))
        return x

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
            q = scale_queries(q, layer.head_tau(tau))
            if split:
                attended = split_candidate_attention(q, k_hist, v_hist, k, v, bias)
            else:
                attended = layer.attend(q, torch.cat([k_hist, k], 2), torch.cat([v_hist, v], 2), mask)
            c = layer.finish(c, attended)
        return c

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


class TaskHeads(Sliceable, nn.Module):
    """Final norm, a shared hidden layer, then one logit per task. Sliced (Sliceable): only
    the active hidden units (rows of net.1, columns of net.3) are in the weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.head_hidden or cfg.d_model
        self.net = nn.Sequential(
            nn.LayerNorm(cfg.d_model), nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, len(TASKS))
        )
        self.slices = {}

    def slice_to(self, hidden: torch.Tensor | None = None) -> None:
        """Run on these hidden units (None: all); net.1 and net.3 are swapped for their rows / columns."""
        self.set_active(hidden=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @staticmethod
    def flops(cfg: ModelConfig, n_candidates: int) -> int:
        hidden = cfg.head_hidden or cfg.d_model
        return n_candidates * (2 * cfg.d_model * hidden + 2 * hidden * len(TASKS))
