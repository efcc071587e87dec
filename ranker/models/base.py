"""The base class every neural ranker family derives from, and the single-stack ranker.

All three families (ASTRO, SASRec-style, HSTU-style) score a request the same way, in two
steps that serving can call separately (TURBO's KV cache):

    cache  = model.encode_history(batch)          # per block, per layer K and V of the history
    logits = model.score_candidates(cache, batch)  # the M candidates against that K/V
    model(batch) == model.score_candidates(model.encode_history(batch), batch)

History attention is causal inside each block, so the K/V of a history prefix never change
when events are appended; a candidate sees its block's history and itself, never another
candidate (target-aware "SUMI" scoring: one pass scores all M). Serving keeps one user's
cache in a `HistoryBuffer` and appends new events to it in place (ranker.serving.incremental):

    buffer = HistoryBuffer(model.encode_history(batch), row)   # preallocated, with headroom
    extend_history(model, buffer, longer_batch)                  # K/V of the new events only
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import RankBatch
from ranker.models.config import ModelConfig
from ranker.models.embedding import TokenEmbedding, last_timestamps
from ranker.models.layers import (
    CANDIDATE_ATTENTION, BlockCache, HistoryCache, SoftmaxStack, TaskHeads, single_block_layout,
)
from streaming.events import BEHAVIOURS, SCENARIOS


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

    def set_candidate_attention(self, kind: str) -> None:
        """Pick the candidate attention kernel of every softmax stack (see SoftmaxStack)."""
        if kind not in CANDIDATE_ATTENTION:
            raise ValueError(f"candidate attention must be one of {CANDIDATE_ATTENTION}, got {kind!r}")
        for module in self.modules():
            if isinstance(module, SoftmaxStack):
                module.candidate_attention = kind

    def sequence_output(self, batch: RankBatch) -> torch.Tensor:
        """[B, n, d]: the history's representation after each token (causal), for the
        next-item objective; width n = the batch's longest history."""
        raise NotImplementedError

    def prefix_invariant(self) -> bool:
        """Whether a history token's output depends only on the tokens up to it, counted from
        the window's start (never on the window's end), so one window can hold every prefix
        that shares its start (ranker.training.next_item, merged prefixes)."""
        return True

    def next_item_query(self, hidden: torch.Tensor) -> torch.Tensor:
        """The user side of a next-item logit: hidden [..., d] through a parameter-free layer
        norm (one scale whatever the stack's last layer) when cfg.logit_norm, else as is."""
        return F.layer_norm(hidden, hidden.shape[-1:]) if self.config.logit_norm else hidden

    def next_item_logits(self, hidden: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [..., d] against item embeddings (tied with the input track table, as in
        SASRec): [..., n_tracks] for the whole catalogue, or [..., K] for `items` [K] (0-based)."""
        table = self.embed.track.weight[1:] if items is None else self.embed.track.weight[items + 1]
        return self.next_item_query(hidden) @ table.t()

    def apply_init(self) -> None:
        """cfg.init "normal": RecBole's SASRec / BERT init, run once the model is built. Every
        Linear weight N(0, 0.02) and bias 0, every LayerNorm 1 and 0; the token tables are
        N(0, 0.02) under either init. A module with a deliberate start (ASTRO's temperature
        at tau = 1) re-applies it in `reset_start`, so "normal" changes scales, not meanings."""
        if self.config.init == "default":
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            reset = getattr(module, "reset_start", None)
            if module is not self and callable(reset):
                reset()

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
        self.apply_init()

    def encode_history(self, batch: RankBatch) -> HistoryCache:
        check_batch(batch, self.config)
        layout = single_block_layout(batch)
        width = layout.index.shape[1]
        x = self.embed.history(batch)[:, :width]
        timestamps = batch.history_ts[:, :width]
        keys, values = self.stack.encode(x, layout, timestamps)
        block = BlockCache(keys, values, layout.valid, layout.index, timestamps)
        return HistoryCache([block], batch.history_lengths, last_timestamps(batch))

    def sequence_output(self, batch: RankBatch) -> torch.Tensor:
        check_batch(batch, self.config)
        layout = single_block_layout(batch)
        width = layout.index.shape[1]
        return self.stack.outputs(self.embed.history(batch)[:, :width], layout, batch.history_ts[:, :width])

    def score_candidates(self, cache: HistoryCache, batch: RankBatch) -> torch.Tensor:
        c = self.embed.candidates(batch, cache.history_lengths, cache.last_ts)
        c = self.stack.attend_candidates(c, cache.blocks[0], cache.history_lengths, batch.request_ts)
        return self.heads(c)

    def flops_breakdown(self, n: int, M: int) -> dict[str, int]:
        flops = type(self.stack).flops(self.config, n, M)
        flops["heads"] = TaskHeads.flops(self.config, M)
        return flops
