"""Stage two of serving (candidates against cached history K/V) with a small fixed cost.

One switch, `SCORING_PATHS`, picks how `NeuralRanker` scores a batch (tests run both and
assert they agree):

- "reference": the model's own `score_candidates`. Obviously correct.
- "fast": the same arithmetic for ASTRO with pointwise (HSTU) blocks and per-block
  candidate paths on CPU (the default model), written for a small batch. At the batch
  sizes of a server below saturation (1-4) much of a call is fixed cost: hundreds of small
  torch calls, module calls and tables rebuilt per call, not FLOPs. This path computes what
  depends only on weights once per weight version (each block layer's relative-bias table,
  the candidate token's behaviour + scenario rows, tau per scenario; kept as the incremental
  path keeps its tables, so a reload that replaces Parameters goes through
  `drop_derived_tables`, as `UserKVCache.set_model` does), the relative buckets of all
  blocks in one pass, calls no modules, and skips the key mask where no row of a block is
  padded (one user's cached view never is).
  Any other model, device or dtype (softmax blocks, the shared candidate path, sliced
  layers, CUDA, bf16) takes the reference path.

Each op is the reference's op on the same operands in the same order, so the scores agree
to float rounding (the tests hold them to the cache's EXACT tolerance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ranker.batch import RankBatch
from ranker.models.astro import AstroModel
from ranker.models.base import SequenceRanker, WeightDerivedTables
from ranker.models.embedding import TARGET_BEHAVIOUR, seconds_bucket
from ranker.models.hstu import HSTUStack, relative_buckets
from ranker.models.layers import HistoryCache, merge_heads, split_heads

SCORING_PATHS = ("fast", "reference")


def has_fast_path(model: SequenceRanker) -> bool:
    """Whether `score_fast` covers this model as it is now (else the reference is used)."""
    if not isinstance(model, AstroModel) or model.fusion is None or model.training:
        return False
    weight = model.embed.track.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    layers = model.__dict__.get("_stage_two_layers")
    if layers is None:  # the module tree is fixed once built; what each layer runs on (slices) is not
        if not all(isinstance(stack, HSTUStack) for stack in model.stacks):
            return False
        layers = model.__dict__["_stage_two_layers"] = [model.heads, *(l for s in model.stacks for l in s.layers)]
    return not any(layer.slices for layer in layers)


def score_candidates(model: SequenceRanker, history: HistoryCache, batch: RankBatch, path: str = "fast") -> torch.Tensor:
    """Logits [B, M, len(TASKS)], as `model.score_candidates(history, batch)`."""
    if path not in SCORING_PATHS:
        raise ValueError(f"scoring path must be one of {SCORING_PATHS}, got {path!r}")
    if path == "fast" and has_fast_path(model):
        return score_fast(model, history, batch)
    return model.score_candidates(history, batch)


def _tables(model: AstroModel) -> WeightDerivedTables:
    """What the fast path reads from weights: per scenario, the candidate token's behaviour
    + scenario row [S, d] and tau [S, Nb, h] (None if fixed); per block, per layer, the
    relative-bias table [h, buckets^2] and its bucket-0 column [1, h, 1, 1] (a candidate's
    weight on itself). Kept until a weight they read moves (the tau table's rule)."""
    cached = model.__dict__.get("_stage_two_tables")
    if cached is not None and cached.key == cached.version():
        return cached
    layers = [layer for stack in model.stacks for layer in stack.layers]
    params = [model.embed.behaviour.weight, model.embed.scenario.weight,
              *(p for layer in layers for p in (layer.rab_position.weight, layer.rab_time.weight)),
              *(model.temperature.parameters() if model.temperature is not None else ())]
    with torch.inference_mode(False), torch.no_grad():
        embed = model.embed
        scenarios = torch.arange(embed.scenario.num_embeddings, device=embed.scenario.weight.device)
        target = torch.full_like(scenarios, TARGET_BEHAVIOUR)
        rows = embed.behaviour(target) + embed.scenario(scenarios)  # [S, d]: the reference's first sum
        tau = model.temperatures(scenarios, target)  # [S, Nb, h] or None
        bias = [[(table := layer.bias_table()).clone(), table[:, 0].view(1, -1, 1, 1).clone()]
                for stack in model.stacks for layer in stack.layers]
    tables = WeightDerivedTables(params, (rows, tau, bias))
    model.__dict__["_stage_two_tables"] = tables  # a plain attribute, dropped by drop_derived_tables
    return tables


def score_fast(model: AstroModel, history: HistoryCache, batch: RankBatch) -> torch.Tensor:
    """`AstroModel.score_candidates` for pointwise blocks, per-block candidates (see module doc)."""
    rows, tau, bias = _tables(model).rows
    embed = model.embed
    lengths, request_ts = history.history_lengths, batch.request_ts
    # the candidate tokens [B, M, d] (TokenEmbedding.candidates)
    gap = torch.where(lengths > 0, 1 + seconds_bucket(request_ts - history.last_ts, embed.n_time_buckets - 1), 0)
    # index_select and F.embedding: the lookups of the reference's embeddings, without indexing's Python path
    per_row = rows.index_select(0, batch.scenario) + F.embedding(lengths, embed.position.weight) \
        + F.embedding(gap, embed.time_gap.weight)
    c = F.embedding(batch.candidate_tracks, embed.track.weight) + per_row[:, None, :]
    if embed.input_norm:
        c = embed.norm(c)
    tau = None if tau is None else tau.index_select(0, batch.scenario)  # [B, Nb, h]
    # every block's relative buckets [B, 1, L_b] in one pass over the keys of all blocks
    widths = [block.positions.shape[1] for block in history.blocks]
    every = relative_buckets(lengths[:, None], request_ts[:, None], torch.cat([b.positions for b in history.blocks], 1),
                             torch.cat([b.timestamps for b in history.blocks], 1), model.config.n_rab_buckets)
    outputs, start, n_layers = [], 0, model.config.n_layers
    for b, (block, stack) in enumerate(zip(history.blocks, model.stacks)):
        buckets = every[:, :, start:start + widths[b]]
        start += widths[b]
        block_lengths = block.valid.sum(1)
        keep = None if bool((block_lengths == widths[b]).all()) else block.valid  # None: no padded key
        cb = c if model.block_position is None else c + F.embedding(block_lengths[:, None], model.block_position[b].weight)
        tau_b = None if tau is None else tau[:, b, :, None, None]  # [B, h, 1, 1]
        for i, layer in enumerate(stack.layers):
            table, self_bias = bias[b * n_layers + i]
            cb = _layer(layer, cb, block.keys[i], block.values[i], buckets, keep, tau_b, table, self_bias)
        outputs.append(cb)
    blocks = torch.stack(outputs, dim=2)  # [B, M, Nb, d]
    fusion = model.fusion
    if fusion.gate is None:
        fused = blocks[:, :, 0]
    else:
        gates = F.linear(c, fusion.gate.weight, fusion.gate.bias).view(blocks.shape)
        gates = gates.softmax(dim=2) if fusion.kind == "softmax" else torch.sigmoid(gates)
        fused = (gates * blocks).sum(2)
    norm, hidden, _, out = model.heads.net
    x = F.layer_norm(fused, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    x = F.gelu(F.linear(x, hidden.weight, hidden.bias))
    return F.linear(x, out.weight, out.bias)


def _layer(layer, c, k_hist, v_hist, buckets, keep, tau, table, self_bias) -> torch.Tensor:
    """One HSTULayer's candidate step (project, attention to the block and to itself, finish);
    post-norm layers read c as it is and normalise the residual sum with norm_in instead."""
    h = layer.n_heads
    norm_in = layer.norm_in
    x = c if layer.post_norm else F.layer_norm(c, norm_in.normalized_shape, norm_in.weight, norm_in.bias, norm_in.eps)
    u, q, k, v = F.silu(F.linear(x, layer.f1.weight, layer.f1.bias)).chunk(4, dim=-1)
    q, k, v = split_heads(q, h), split_heads(k, h), split_heads(v, h)
    if tau is not None:
        q = q / tau
    B, _, Lq, dh = q.shape
    Lk = k_hist.shape[2]
    bias = table.index_select(1, buckets.reshape(-1)).view(h * B, buckets.shape[1], Lk)
    heads_first = lambda t: t.transpose(0, 1).reshape(h * B, -1, dh)  # noqa: E731
    w = F.silu(torch.baddbmm(bias, heads_first(q * layer.alpha), heads_first(k_hist).transpose(1, 2)))
    if keep is not None:
        w.masked_fill_(~keep[None, :, None].expand(h, -1, 1, -1).reshape(h * B, 1, Lk), 0.0)
    attended = (torch.bmm(w, heads_first(v_hist)) / layer.norm).view(h, B, Lq, dh).transpose(0, 1)
    attended = attended + F.silu(layer.alpha * (q * k).sum(-1, keepdim=True) + self_bias) / layer.norm * v
    norm_attn = layer.norm_attn
    merged = F.layer_norm(merge_heads(attended), norm_attn.normalized_shape, norm_attn.weight, norm_attn.bias,
                          norm_attn.eps)
    c = c + F.linear(merged * u, layer.f2.weight, layer.f2.bias)
    return F.layer_norm(c, norm_in.normalized_shape, norm_in.weight, norm_in.bias, norm_in.eps) if layer.post_norm else c
