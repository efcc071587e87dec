"""Slow, obviously-correct reference forwards: one candidate at a time, written out.

Each candidate is appended to its block's unpadded history and a plain causal attention
(written here, not the models' SDPA/cache code) runs over [history..., candidate]: softmax,
or HSTU's pointwise SiLU with rab. The batched models must match these (tests/test_astro.py,
tests/test_model_baselines.py); they exist to be read and to prove, not to be fast.

    reference_logits(model, batch)  # [B, M, len(TASKS)], any family
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ranker.batch import TASKS, RankBatch
from ranker.models.astro import AstroConfig, AstroModel
from ranker.models.base import SequenceRanker
from ranker.models.embedding import TARGET_BEHAVIOUR, log_bucket, seconds_bucket
from streaming.events import BEHAVIOURS, SCENARIOS


def _gap_bucket(gap_ms: torch.Tensor, n_buckets: int) -> int:
    """Buckets 1.. for a gap in ms (0 is kept for "no previous event")."""
    return 1 + int(seconds_bucket(gap_ms, n_buckets - 1))


def reference_history_tokens(model, batch: RankBatch, row: int) -> torch.Tensor:
    """[length, d]: the sum of embeddings, time gap to the previous event (bucket 0 for the first)."""
    e, length = model.embed, int(batch.history_lengths[row])
    tokens = []
    for i in range(length):
        gap = 0 if i == 0 else _gap_bucket(batch.history_ts[row, i] - batch.history_ts[row, i - 1], e.n_time_buckets)
        tokens.append(
            e.track.weight[batch.history_tracks[row, i]] + e.behaviour.weight[batch.history_behaviours[row, i]]
            + e.scenario.weight[batch.history_scenarios[row, i]] + e.position.weight[i] + e.time_gap.weight[gap]
        )
    return e.norm(torch.stack(tokens)) if tokens else torch.zeros(0, model.config.d_model)


def reference_candidate_token(model, batch: RankBatch, row: int, m: int) -> torch.Tensor:
    """[d]: target behaviour, request scenario, position = history length, gap since the last event."""
    e, length = model.embed, int(batch.history_lengths[row])
    gap = 0
    if length:
        gap = _gap_bucket(batch.request_ts[row] - batch.history_ts[row, length - 1], e.n_time_buckets)
    return e.norm(
        e.track.weight[batch.candidate_tracks[row, m]] + e.behaviour.weight[TARGET_BEHAVIOUR]
        + e.scenario.weight[batch.scenario[row]] + e.position.weight[length] + e.time_gap.weight[gap]
    )


def softmax_reference(layers, x: torch.Tensor, tau: torch.Tensor | None) -> torch.Tensor:
    """Plain causal transformer over one unpadded sequence x [L, d]; tau [L, heads]. Pre-norm:
    x + f(norm(x)); post-norm (layer.post_norm): norm(x + f(x))."""
    L, d = x.shape
    for layer in layers:
        h, post = layer.n_heads, layer.post_norm
        q, k, v = (t.view(L, h, d // h).transpose(0, 1) for t in layer.qkv(x if post else layer.norm1(x)).chunk(3, -1))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if tau is not None:
            logits = logits / tau.T[:, :, None]
        logits = logits.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        x = x + layer.out((logits.softmax(-1) @ v).transpose(0, 1).reshape(L, d))
        if post:
            x = layer.norm1(x)
            x = layer.norm2(x + layer.ffn(x))
        else:
            x = x + layer.ffn(layer.norm2(x))
    return x


def pointwise_reference(layers, x: torch.Tensor, positions: torch.Tensor, ts: torch.Tensor,
                        tau: torch.Tensor | None, norm: float) -> torch.Tensor:
    """Meta's HSTU layer written out for one unpadded sequence x [L, d], causal.

    positions/ts [L]: each token's index in the full history and time (ms); tau [L, heads]
    divides the q.k term of each query (rab is not divided), None means tau = 1.
    Pre-norm: U, Q, K, V from norm_in(x), x + f2(...); post-norm (layer.post_norm): from x
    itself, norm_in(x + f2(...)).
    """
    L, d = x.shape
    for layer in layers:
        h, post = layer.n_heads, layer.post_norm
        u, q, k, v = F.silu(layer.f1(x if post else layer.norm_in(x))).chunk(4, -1)
        q, k, v = (t.view(L, h, d // h).transpose(0, 1) for t in (q, k, v))
        bias = layer.rab_position(log_bucket(positions[:, None] - positions[None, :], layer.n_buckets))
        bias = bias + layer.rab_time(seconds_bucket(ts[:, None] - ts[None, :], layer.n_buckets))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        if tau is not None:
            logits = logits / tau.T[:, :, None]
        weights = F.silu(logits + bias.permute(2, 0, 1)) * torch.ones(L, L).tril() / norm
        attended = (weights @ v).transpose(0, 1).reshape(L, d)
        x = x + layer.f2(layer.norm_attn(attended) * u)
        if post:
            x = layer.norm_in(x)
    return x


def in_block(cfg: AstroConfig, batch: RankBatch, row: int, i: int, block: int) -> bool:
    length = int(batch.history_lengths[row])
    if cfg.partition == "behaviour":
        return BEHAVIOURS[batch.history_behaviours[row, i]] in cfg.behaviour_groups[block]
    if cfg.partition == "scenario":
        return SCENARIOS[batch.history_scenarios[row, i]] in cfg.scenario_groups[block]
    if cfg.partition == "recency":
        return i >= length - cfg.recency_scales[block]
    return True


def astro_reference(model: AstroModel, batch: RankBatch) -> torch.Tensor:
    """One forward per candidate: each block = [that block's history, the candidate], causal."""
    cfg = model.config
    logits = torch.zeros(*batch.candidate_tracks.shape, len(TASKS))
    for row in range(len(batch.history_lengths)):
        history = reference_history_tokens(model, batch, row)
        length = len(history)
        target = torch.tensor(TARGET_BEHAVIOUR)
        for m in range(batch.candidate_tracks.shape[1]):
            if not batch.candidate_mask[row, m]:
                continue
            candidate = reference_candidate_token(model, batch, row, m)
            outputs = []
            for b in range(cfg.n_blocks):
                idx = [i for i in range(length) if in_block(cfg, batch, row, i, b)]
                seq = torch.cat([history[idx], candidate[None]])
                if cfg.block_positions:
                    seq = seq + model.block_position[b].weight[: len(idx) + 1]
                tau = None
                if cfg.temperature == "dynamic":
                    scen = torch.cat([batch.history_scenarios[row, idx], batch.scenario[row : row + 1]])
                    beh = torch.cat([batch.history_behaviours[row, idx], target[None]])
                    tau = model.temperatures(scen, beh)[:, b]
                if cfg.block_attention == "pointwise":
                    positions = torch.tensor([*idx, length])
                    ts = torch.cat([batch.history_ts[row, idx], batch.request_ts[row : row + 1]])
                    norm = float(cfg.attention_norm or cfg.max_len)
                    outputs.append(pointwise_reference(model.stacks[b].layers, seq, positions, ts, tau, norm)[-1])
                else:
                    outputs.append(softmax_reference(model.stacks[b].layers, seq, tau)[-1])
            fused = model.fusion(candidate[None, None], torch.stack(outputs)[None, None])[0, 0]
            logits[row, m] = model.heads(fused)
    return logits


def per_candidate_reference(model, batch: RankBatch, sequence_output) -> torch.Tensor:
    """Logits from running sequence_output(model, row, [history..., candidate]) per candidate."""
    logits = torch.zeros(*batch.candidate_tracks.shape, len(TASKS))
    for row in range(len(batch.history_lengths)):
        history = reference_history_tokens(model, batch, row)
        for m in range(batch.candidate_tracks.shape[1]):
            if batch.candidate_mask[row, m]:
                seq = torch.cat([history, reference_candidate_token(model, batch, row, m)[None]])
                logits[row, m] = model.heads(sequence_output(model, batch, row, seq)[-1])
    return logits


def sasrec_sequence(model, batch, row, seq):
    return softmax_reference(model.stack.layers, seq, tau=None)


def hstu_sequence(model: SequenceRanker, batch: RankBatch, row: int, x: torch.Tensor) -> torch.Tensor:
    """Meta's HSTU layer written out (the reference ASTRO's pointwise blocks also use),
    causal over [history..., candidate], tau = 1."""
    length = len(x) - 1
    ts = torch.cat([batch.history_ts[row, :length], batch.request_ts[row : row + 1]])
    return pointwise_reference(model.stack.layers, x, torch.arange(len(x)), ts, None, float(model.config.max_len))


def sasrec_reference(model: SequenceRanker, batch: RankBatch) -> torch.Tensor:
    return per_candidate_reference(model, batch, sasrec_sequence)


def hstu_reference(model: SequenceRanker, batch: RankBatch) -> torch.Tensor:
    return per_candidate_reference(model, batch, hstu_sequence)


REFERENCES = {"astro": astro_reference, "sasrec": sasrec_reference, "hstu": hstu_reference}


def reference_logits(model: SequenceRanker, batch: RankBatch) -> torch.Tensor:
    """The reference forward of `model`'s family: what `model(batch)` must equal."""
    return REFERENCES[model.family](model, batch)
