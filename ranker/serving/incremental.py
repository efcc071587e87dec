"""TURBO's incremental history: append a user's new events to their cached K/V in place.

One switch, `PATHS`, picks how (as Meta's generative-recommenders keeps ops/pytorch beside
ops/triton); tests run the serving cache on both and assert they agree:

- "reference": encode the whole history again with the model's own `encode_history` and
  copy it into the buffers. Obviously correct; O(n^2) per event.
- "fast": K/V of the k new tokens only. History attention is causal inside each block, so
  a prefix's K/V never change when events are appended, and a token's embedding depends
  only on its own event and the gap to the previous one. One new event (the serving hot
  path) skips module calls: host-side ids, per-code tables and per-stack parameter plans,
  and a single query's attention as bmm-softmax-bmm over views of the cache.

The models stay plain nn.Modules (encode_history, score_candidates); what this path derives
from their weights lives in plain attributes keyed by the tensors it was derived from, and
`drop_derived_tables` forgets it (UserKVCache.set_model calls it on every model it serves).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import RankBatch
from ranker.models.astro import AstroModel
from ranker.models.base import SequenceRanker, SingleStackRanker, WeightDerivedTables
from ranker.models.embedding import TokenEmbedding
from ranker.models.hstu import HSTUStack, relative_buckets
from ranker.models.layers import SoftmaxStack, scale_queries
from streaming.events import BEHAVIOURS, SCENARIOS

if TYPE_CHECKING:  # the buffers' module imports this one
    from ranker.serving.cache import BlockBuffer, HistoryBuffer

PATHS = ("fast", "reference")


class OneEvent(NamedTuple):
    """One appended event as host integers: what the one-token serving path needs to embed it."""

    track: int
    behaviour: int
    scenario: int
    timestamp: int  # epoch ms
    gap: int  # time-gap bucket (history_time_gaps), 0 for the first event


def gap_bucket(gap_ms: int, n_buckets: int) -> int:
    """`history_time_gaps` of one event whose previous event is `gap_ms` earlier, on the host.

    The same float32 steps as `seconds_bucket` (ms -> f32, * 1e-3, +1, log2, * 2, floor), in
    numpy float32 scalars: ~1 us where the tensor version is ~10 ops. Tests check it equals
    the tensor path around every bucket boundary.
    """
    seconds = max(np.float32(gap_ms) * np.float32(1e-3), np.float32(0))
    return 1 + min(int(np.floor(np.log2(seconds + np.float32(1)) * np.float32(2))), n_buckets - 2)


def one_token(embed: TokenEmbedding, event: OneEvent, position: int) -> torch.Tensor:  # [1, d]
    """`TokenEmbedding.history(batch, start)` for a single new event in eval mode: five table rows summed
    (row views and adds, no index tensors or lookup ops)."""
    x = (embed.track.weight[event.track] + embed.behaviour.weight[event.behaviour]
         + embed.scenario.weight[event.scenario] + embed.position.weight[position] + embed.time_gap.weight[event.gap])
    return (embed.norm(x) if embed.input_norm else x)[None]


# ----------------------------------------------------------------------------- checks


def can_extend(model: SequenceRanker, cached_length: int, new_length: int) -> bool:
    """Whether appending events [cached_length, new_length) leaves every cached K/V valid.

    True when blocks only grow at their end. ASTRO's recency windows slide once the history
    outgrows the shortest window (before that, every window holds every event), so then it
    says False and the cache re-encodes. A sliding max_len window is the caller's to detect
    (the cached tokens are no longer a prefix).
    """
    cfg = model.config
    if isinstance(model, AstroModel) and cfg.partition == "recency" and new_length > min(cfg.recency_scales):
        return False
    return new_length > cached_length


def extension_range(model: SequenceRanker, history: HistoryBuffer, batch: RankBatch) -> tuple[int, int]:
    """[start, end) of the new events, the batch's shape checked; their values are checked
    by `_check_new_values` (k events) or `_one_event` (one). Only the new tokens are
    checked: the prefix was checked when it was encoded, and checking it again would
    cost more than the update itself."""
    if model.training:
        raise RuntimeError("extend_history is for inference; call model.eval() first")
    if len(batch.history_lengths) != 1:
        raise ValueError(f"extend_history takes one user's batch, got {len(batch.history_lengths)} rows")
    start, end = history.length, int(batch.history_lengths[0])
    if not can_extend(model, start, end):
        raise ValueError(f"cannot extend a cached history of {start} events to {end} events; re-encode it")
    if end > model.config.max_len or end > batch.history_tracks.shape[1]:
        raise ValueError(f"history length {end} exceeds the model's max_len={model.config.max_len} "
                         f"or the batch width {batch.history_tracks.shape[1]}")
    return start, end


def _value_limits(model: SequenceRanker) -> dict[str, int]:
    return {"history_tracks": model.config.n_tracks, "history_behaviours": len(BEHAVIOURS) - 1,
            "history_scenarios": len(SCENARIOS) - 1}


def _check_new_values(model: SequenceRanker, batch: RankBatch, start: int, end: int) -> None:
    """The ids of events [start, end) are inside their tables (one stacked check, one sync)."""
    limits = _value_limits(model)
    new = torch.stack([getattr(batch, name)[0, start:end] for name in limits])
    high = torch.tensor(list(limits.values()), device=new.device)[:, None]
    if bool(((new < 0) | (new > high)).any()):
        for (name, top), row in zip(limits.items(), new):
            if int(row.min()) < 0 or int(row.max()) > top:
                raise ValueError(f"RankBatch.{name} must be in [0, {top}], got [{int(row.min())}, {int(row.max())}]")


def _one_event(model: SequenceRanker, batch: RankBatch, at: int) -> OneEvent:
    """Event `at` of the batch's single row as host integers, checked like `_check_new_values`."""
    columns = (batch.history_tracks, batch.history_behaviours, batch.history_scenarios, batch.history_ts)
    if batch.history_ts.device.type == "cpu":  # numpy views read a scalar in ~0.1 us, .item() in ~3 us
        columns = tuple(column.numpy() for column in columns)
    codes = [int(column[0, at]) for column in columns[:3]]
    for (name, top), value in zip(_value_limits(model).items(), codes):
        if not 0 <= value <= top:
            raise ValueError(f"RankBatch.{name} must be in [0, {top}], got [{value}, {value}]")
    stamps = [int(t) for t in columns[3][0, max(at - 1, 0) : at + 1]]
    gap = gap_bucket(stamps[-1] - stamps[0], model.config.n_time_buckets) if at else 0
    return OneEvent(*codes, stamps[-1], gap)


# ----------------------------------------------------------------------------- the switch


def extend_history(model: SequenceRanker, history: HistoryBuffer, batch: RankBatch, path: str = "fast") -> None:
    """Append the events past `history.length` of `batch` (one row: the cached history plus k
    new events, in order) to `history` in place.

    The caller guarantees the cached tokens are the batch's prefix and that `can_extend`
    holds; afterwards `history.view()` equals `model.encode_history(batch)` up to float
    rounding, whichever `path` (PATHS) computed it.
    """
    if path not in PATHS:
        raise ValueError(f"incremental path must be one of {PATHS}, got {path!r}")
    start, end = extension_range(model, history, batch)
    if path == "reference":
        _extend_reference(model, history, batch, end)
    elif isinstance(model, AstroModel):
        (_extend_astro_one(model, history, batch, start) if end - start == 1
         else _extend_astro(model, history, batch, start, end))
    elif isinstance(model, SingleStackRanker):
        (_extend_single_stack_one(model, history, batch, start) if end - start == 1
         else _extend_single_stack(model, history, batch, start, end))
    else:
        raise TypeError(f"no incremental path for {type(model).__name__}")


def _extend_reference(model: SequenceRanker, history: HistoryBuffer, batch: RankBatch, end: int) -> None:
    """Encode the whole history again and copy it into the buffers: obviously correct, O(n^2)."""
    _check_new_values(model, batch, 0, end)
    encoded = model.encode_history(batch)
    for buffer, block in zip(history.blocks, encoded.blocks):
        length = int(block.valid[0].sum())
        buffer.reserve(length)
        for kv, keys, values in zip(buffer.kv, block.keys, block.values):
            kv[0, :, :length] = keys[0, :, :length]
            kv[1, :, :length] = values[0, :, :length]
        buffer.positions[:, :length] = block.positions[:, :length]
        buffer.timestamps[:, :length] = block.timestamps[:, :length]
        buffer.length = length
    history.length = end
    history.last_ts = int(encoded.last_ts[0])


def drop_derived_tables(model: SequenceRanker) -> None:
    """Forget what was computed from weights (AstroModel's per-code tables and tau table, the
    stacks' parameter plans); rebuilt on next use. In-place weight changes are detected
    anyway; this covers reloads that replace Parameter objects."""
    for module in model.modules():
        for name in ("_one_event_cache", "_one_token_plan", "_tau_cache", "_bias_rows",
                     "_stage_two_tables", "_stage_two_layers"):
            module.__dict__.pop(name, None)


# ----------------------------------------------------------------------------- single-stack rankers (SASRec, HSTU)


def _extend_single_stack(model: SingleStackRanker, history: HistoryBuffer, batch: RankBatch, start: int, end: int) -> None:
    _check_new_values(model, batch, start, end)
    x = model.embed.history(batch, start)[:, : end - start]
    block = history.blocks[0]
    block.reserve(end)
    block.positions[:, start:end] = torch.arange(start, end, device=x.device)
    block.timestamps[:, start:end] = batch.history_ts[:, start:end]
    stack_extend(model.stack, x, block, start)
    block.length = history.length = end
    history.last_ts = int(batch.history_ts[0, end - 1])


def _extend_single_stack_one(model: SingleStackRanker, history: HistoryBuffer, batch: RankBatch, at: int) -> None:
    """One new event through `stack_extend_one` (the serving hot path)."""
    event = _one_event(model, batch, at)
    block = history.blocks[0]
    block.reserve(at + 1)
    block.positions.select(1, at).fill_(at)  # fill_ on a view: ~4x cheaper than setitem
    block.timestamps.select(1, at).fill_(event.timestamp)
    stack_extend_one(model.stack, one_token(model.embed, event, at), block, at, model.config.d_head**-0.5)
    block.length = history.length = at + 1
    history.last_ts = event.timestamp


# ----------------------------------------------------------------------------- ASTRO


def _extend_astro(model: AstroModel, history: HistoryBuffer, batch: RankBatch, start: int, end: int) -> None:
    """k new events: each block that any of them joins runs `stack_extend` on its share."""
    _check_new_values(model, batch, start, end)
    x = model.embed.history(batch, start)[:, : end - start]  # [1, k, d]
    behaviours, scenarios = batch.history_behaviours[:, start:end], batch.history_scenarios[:, start:end]
    tau = model.temperatures(scenarios, behaviours)  # [1, k, Nb, h]
    member = model.token_blocks(behaviours[0], scenarios[0])  # [k, Nb]
    touched = [(b, new) for b, new in enumerate(member.t().contiguous()) if bool(new.any())]
    for b, new in touched:
        block = history.blocks[b]
        xb = x[:, new]
        tau_b = None if tau is None else tau[:, new, b]
        length, grown = block.length, block.length + xb.shape[1]
        block.reserve(grown)
        at = torch.arange(start, end, device=x.device)[new]
        block.positions[0, length:grown] = at
        block.timestamps[0, length:grown] = batch.history_ts[0, at]
        if model.block_position is not None:  # rows of the block's position table, no lookup op
            xb = xb + model.block_position[b].weight[length:grown]
        stack_extend(model.stacks[b], xb, block, length, tau_b)
        block.length = grown
    history.length = end
    history.last_ts = int(batch.history_ts[0, end - 1])


def _extend_astro_one(model: AstroModel, history: HistoryBuffer, batch: RankBatch, at: int) -> None:
    """`extend_history` of one new event, in ~25 ATen calls: host-side ids and time gap,
    tau, block membership and the behaviour + scenario embedding from per-code tables
    (`_astro_one_event_tables`), and `stack_extend_one` in the block(s) it joins."""
    event = _one_event(model, batch, at)
    tables = model.__dict__.get("_one_event_cache")
    if tables is None or tables.key != tables.version():
        tables = _astro_one_event_tables(model)
    per_code = tables.rows[event.scenario][event.behaviour]  # (embedding row, blocks, scales)
    e = model.embed
    x = (per_code[0] + e.track.weight[event.track] + e.position.weight[at] + e.time_gap.weight[event.gap])[None]  # [1, d]
    if e.input_norm:
        x = e.norm(x)
    for b, scale in zip(per_code[1], per_code[2]):
        block = history.blocks[b]
        length = block.length
        block.reserve(length + 1)
        block.positions.select(1, length).fill_(at)  # fill_ on a view: ~4x cheaper than setitem
        block.timestamps.select(1, length).fill_(event.timestamp)
        xb = x if model.block_position is None else x + model.block_position[b].weight[length]
        stack_extend_one(model.stacks[b], xb, block, length, scale)
        block.length = length + 1
    history.length = at + 1
    history.last_ts = event.timestamp


def _astro_one_event_tables(model: AstroModel) -> WeightDerivedTables:
    """Per (scenario, behaviour) code pair: the summed behaviour + scenario embedding
    row, the blocks an event with those codes joins, and each such block's query scale
    1 / (tau sqrt(d_head)) [h, 1, 1] (a float for fixed temperature).

    They depend on a token only through its two codes (5 x 8 pairs), so they are computed
    once with the model's own `temperatures` and `token_blocks` and recomputed when a
    weight they read moves (data pointer or in-place version: load_state_dict, .to(), an
    optimiser step). `drop_derived_tables` (UserKVCache.set_model) drops them, for reloads that replace Parameters.
    """
    params = [model.embed.scenario.weight, model.embed.behaviour.weight, model.block_of_behaviour,
              model.block_of_scenario, *(model.temperature.parameters() if model.temperature is not None else ())]
    with torch.inference_mode(False), torch.no_grad():
        device = model.embed.scenario.weight.device
        scenarios = torch.arange(model.embed.scenario.num_embeddings, device=device)[:, None]
        behaviours = torch.arange(model.embed.behaviour.num_embeddings - 1, device=device)[None, :]
        scenarios, behaviours = torch.broadcast_tensors(scenarios, behaviours)  # [S, B] each
        rows = model.embed.behaviour(behaviours) + model.embed.scenario(scenarios)  # [S, B, d]
        tau = model.temperatures(scenarios, behaviours)  # [S, B, Nb, h] or None
        scale = query_scales(tau, model.config.d_head)
        member = model.token_blocks(behaviours, scenarios)  # [S, B, Nb]
    table = []
    for s, per_scenario in enumerate(member):
        table.append([])
        for b, joined in enumerate(per_scenario):
            blocks = joined.nonzero()[:, 0].tolist()
            scales = [scale if tau is None else scale[s, b, blk] for blk in blocks]
            table[-1].append((rows[s, b], blocks, scales))
    tables = WeightDerivedTables(params, table)
    model.__dict__["_one_event_cache"] = tables  # a plain attribute: not a buffer, not in state_dict
    return tables


# ----------------------------------------------------------------------------- block stacks


def stack_extend(stack: nn.Module, x: torch.Tensor, block: BlockBuffer, start: int,
                 tau: torch.Tensor | None = None) -> None:
    """Append k new tokens x [1, k, d] at [start, start + k) of one block's buffers, in place."""
    if isinstance(stack, HSTUStack):
        _hstu_extend(stack, x, block, start, tau)
    else:
        _softmax_extend(stack, x, block, start, tau)


def stack_extend_one(stack: nn.Module, x: torch.Tensor, block: BlockBuffer, at: int,
                     query_scale: torch.Tensor | float) -> None:
    """`stack_extend` for one new token x [1, d] at index `at`: the serving hot path."""
    if isinstance(stack, HSTUStack):
        _hstu_extend_one(stack, x, block, at, query_scale)
    else:
        _softmax_extend_one(stack, x, block, at, query_scale)


def query_scales(tau: torch.Tensor | None, d_head: int) -> torch.Tensor | float:
    """What `stack_extend_one` multiplies queries by: 1 / (tau sqrt(d_head)), tau [..., h] -> [..., h, 1, 1]."""
    return d_head**-0.5 if tau is None else (tau * d_head**0.5).reciprocal()[..., None, None]


def _softmax_extend(stack: SoftmaxStack, x: torch.Tensor, block: BlockBuffer, start: int,
                    tau: torch.Tensor | None = None) -> None:
    """Append k new tokens x [1, k, d] at [start, start + k) of the block's buffers, in place.

    Each new token attends the cached prefix and the new tokens before it (the same
    causal rule as `SoftmaxStack.encode`), so the buffers end up as a full re-encode would fill them.
    Capacity must already be reserved.
    """
    end = start + x.shape[1]
    causal = None  # one new token sees every key
    if x.shape[1] > 1:
        causal = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
    for i, layer in enumerate(stack.layers):
        last = i == len(stack.layers) - 1
        q, k, v = (None, *layer.project_kv(x)) if last else layer.project(x)
        block.keys[i][:, :, start:end] = k
        block.values[i][:, :, start:end] = v
        if not last:
            attended = F.scaled_dot_product_attention(
                scale_queries(q, tau), block.keys[i][:, :, :end], block.values[i][:, :, :end], attn_mask=causal)
            x = layer.finish(x, attended)


def _softmax_extend_one(stack: SoftmaxStack, x: torch.Tensor, block: BlockBuffer, at: int,
                        query_scale: torch.Tensor | float) -> None:
    """`_softmax_extend` for one new token x [1, d] at index `at` of the block: the serving hot path.

    The same math as `_softmax_extend` (tests compare them) in 15 ATen calls for two layers:
    functional layer norms and linears on the cached weights (`_softmax_plan`), K and
    V written with one copy into the fused storage, and the single query's attention as
    bmm-softmax-bmm over views of the cache (no mask, no SDPA dispatch, no module calls).
    query_scale is 1 / (tau sqrt(d_head)), [h, 1, 1] (`query_scales`) or a float.
    Capacity must already be reserved.
    """
    end = at + 1
    plan = _softmax_plan(stack)
    last = len(plan) - 1
    d = x.shape[-1]
    post = stack.layers[0].post_norm
    for i, (norm1, qkv_w, qkv_b, out_w, out_b, norm2, up_w, up_b, down_w, down_b) in enumerate(plan):
        kv = block.kv[i]  # [2, h, capacity, dh]
        h, dh = kv.shape[1], kv.shape[3]
        qkv = F.linear(x if post else F.layer_norm(x, (d,), *norm1), qkv_w, qkv_b).view(3, h, dh)
        kv.select(2, at).copy_(qkv[1:])  # K and V of the new token
        if i == last:  # nothing reads the last layer's history output
            return
        weights = torch.bmm(qkv[0].unsqueeze(1) * query_scale, kv[0, :, :end].transpose(1, 2)).softmax(-1)  # [h, 1, end]
        x = x + F.linear(torch.bmm(weights, kv[1, :, :end]).view(1, d), out_w, out_b)  # heads merged
        if post:  # norm(x + f(x)) after each sublayer
            x = F.layer_norm(x, (d,), *norm1)
            x = F.layer_norm(x + F.linear(F.gelu(F.linear(x, up_w, up_b)), down_w, down_b), (d,), *norm2)
        else:
            x = x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,), *norm2), up_w, up_b)), down_w, down_b)


def _build_softmax_plan(stack: SoftmaxStack) -> list[tuple]:
    """Each layer's parameters in `_softmax_extend_one`'s order, gathered once: ~30 module
    attribute lookups cost about as much as the step's arithmetic. It holds the Parameter
    objects themselves, so in-place loads, optimiser steps and .to() (which swaps
    param.data) keep it current; `_softmax_plan` rebuilds it when a Parameter object was
    replaced (load_state_dict(assign=True), torch's overwrite-on-conversion)."""
    plan = [((layer.norm1.weight, layer.norm1.bias, layer.norm1.eps), layer.qkv.weight, layer.qkv.bias,
             layer.out.weight, layer.out.bias, (layer.norm2.weight, layer.norm2.bias, layer.norm2.eps),
             layer.ffn[0].weight, layer.ffn[0].bias, layer.ffn[3].weight, layer.ffn[3].bias)
            for layer in stack.layers]
    last = stack.layers[-1].qkv
    # a plain attribute: not a submodule, not in state_dict; keyed by the Parameter it was built from
    stack.__dict__["_one_token_plan"] = (last._parameters, last.weight, plan)
    return plan


def _softmax_plan(stack: SoftmaxStack) -> list[tuple]:
    """The stack's plan while it still holds the stack's Parameter objects (one dict lookup)."""
    cached = stack.__dict__.get("_one_token_plan")
    if cached is not None and cached[0]["weight"] is cached[1]:
        return cached[2]
    return _build_softmax_plan(stack)


def _hstu_extend(stack: HSTUStack, x: torch.Tensor, block: BlockBuffer, start: int,
                 tau: torch.Tensor | None = None) -> None:
    """Append k new tokens x [1, k, d] at [start, start + k) of the block's buffers (see
    `_softmax_extend`); their positions and timestamps must already be written."""
    end = start + x.shape[1]
    positions, timestamps = block.positions[:, :end], block.timestamps[:, :end]
    buckets = relative_buckets(positions[:, start:], timestamps[:, start:], positions, timestamps, stack.n_buckets)
    causal = torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
    for i, layer in enumerate(stack.layers):
        last = i == len(stack.layers) - 1
        u, q, k, v = (None, None, *layer.project_kv(x)) if last else layer.project(x)
        block.keys[i][:, :, start:end] = k
        block.values[i][:, :, start:end] = v
        if not last:
            keys, values = block.keys[i][:, :, :end], block.values[i][:, :, :end]
            attended = layer.attention(scale_queries(q, tau), keys, values, buckets, causal[None])
            x = layer.finish(x, attended, u)


def _hstu_extend_one(stack: HSTUStack, x: torch.Tensor, block: BlockBuffer, at: int,
                     query_scale: torch.Tensor | float) -> None:
    """`_hstu_extend` for one new token x [1, d] at index `at` of the block: the serving hot path.

    The same math as `_hstu_extend` (tests compare them) without its per-call set-up: the last
    layer, the only one a one-layer stack has, is a layer norm, one linear on the K/V rows
    of f1 and a SiLU, written with one copy into the fused K/V storage. Earlier layers
    attend the whole cached prefix (one query sees every earlier key, so no mask) with
    the new token's bias row. query_scale is alpha / tau, [h, 1, 1] or a float
    (`query_scales`: the same 1 / (tau sqrt(d_head))). Capacity must
    already be reserved, and the token's position and timestamp written.
    """
    end = at + 1
    d = x.shape[-1]
    last = len(stack.layers) - 1
    last_norm, last_kv_weight, last_kv_bias = _hstu_plan(stack)
    buckets = None
    for i, layer in enumerate(stack.layers):
        kv = block.kv[i]  # [2, h, capacity, dh]
        h, dh = kv.shape[1], kv.shape[3]
        if i == last:  # nothing reads the last layer's history output: K and V only
            normed = x if last_norm is None else F.layer_norm(x, (d,), *last_norm)
            kv.select(2, at).copy_(F.silu(F.linear(normed, last_kv_weight, last_kv_bias)).view(2, h, dh))
            return
        if buckets is None:  # the same for every layer: the new token against every key, [end]
            buckets = relative_buckets(block.positions[:, at:end], block.timestamps[:, at:end],
                                       block.positions[:, :end], block.timestamps[:, :end], stack.n_buckets).view(-1)
        x = hstu_layer_one(layer, x, kv, at, buckets, query_scale)


def hstu_layer_one(layer, x: torch.Tensor, kv: torch.Tensor, at: int, buckets: torch.Tensor,
                   query_scale: torch.Tensor | float) -> torch.Tensor:
    """One attending pointwise layer for the new token x [1, d] at `at`: writes its K/V into
    kv [2, h, capacity, dh] and returns the layer's output [1, d]. `buckets` [at + 1]: its
    relative buckets against every key. (A function of its own so a benchmark can time it
    compiled: `climber bench incremental --compile-check`.)"""
    end, d = at + 1, x.shape[-1]
    h, dh = kv.shape[1], kv.shape[3]
    norm_in = (layer.norm_in.weight, layer.norm_in.bias, layer.norm_in.eps)  # post-norm: the output norm
    normed = x if layer.post_norm else F.layer_norm(x, (d,), *norm_in)
    uqkv = F.silu(F.linear(normed, layer.f1.weight, layer.f1.bias)).view(4, h, dh)
    kv.select(2, at).copy_(uqkv[2:])  # K and V of the new token, one copy
    u, q = uqkv[0], uqkv[1]
    bias = _bias_rows(layer).index_select(1, buckets).unsqueeze(1)  # [h, 1, end]
    weights = F.silu(torch.baddbmm(bias, q.unsqueeze(1) * query_scale, kv[0, :, :end].transpose(1, 2)))  # [h, 1, end]
    attended = (torch.bmm(weights, kv[1, :, :end]) / layer.norm).view(1, d)  # heads merged
    x = x + F.linear(F.layer_norm(attended, (d,), layer.norm_attn.weight, layer.norm_attn.bias,
                                  layer.norm_attn.eps) * u.reshape(1, d), layer.f2.weight, layer.f2.bias)
    return F.layer_norm(x, (d,), *norm_in) if layer.post_norm else x


def _bias_rows(layer) -> torch.Tensor:
    """The layer's `bias_table()` [h, n_buckets^2], contiguous, so one event's bias is one
    index_select of `end` columns (the table itself is a transposed sum: gathering from it
    strides through memory, and rebuilding it per event costs as much as the gather).
    Recomputed when the rab weights move; not cached while growth slices the heads."""
    if layer.slices.get("heads") is not None:
        return layer.bias_table().contiguous()
    tables = layer.__dict__.get("_bias_rows")
    if tables is None or tables.key != tables.version():
        with torch.inference_mode(False), torch.no_grad():
            tables = WeightDerivedTables([layer.rab_position.weight, layer.rab_time.weight],
                                         layer.bias_table().contiguous())
        layer.__dict__["_bias_rows"] = tables  # a plain attribute: not a buffer, not in state_dict
    return tables.rows


def _build_hstu_plan(stack: HSTUStack) -> tuple:
    """The last layer's input norm (None post-norm: its K/V read the normalised x as it is,
    and its output norm never runs on the history) and the K/V rows of its f1, gathered
    once: module attribute lookups and the two slices cost as much as the one-layer step's
    arithmetic. Views of the Parameters, so in-place updates show through (`_hstu_plan`
    checks they still are)."""
    layer = stack.layers[-1]
    d = layer.f1.weight.shape[1]  # f2 is None on the last layer of a shared-candidate-path block
    norm = None if layer.post_norm else (layer.norm_in.weight, layer.norm_in.bias, layer.norm_in.eps)
    plan = (norm, layer.f1.weight[2 * d:], layer.f1.bias[2 * d:])
    f1 = layer.f1
    # a plain attribute: not a submodule, not in state_dict; keyed by the Parameter and the storage it views
    stack.__dict__["_one_token_plan"] = (f1._parameters, f1.weight, f1.weight.data_ptr(), f1.bias.data_ptr(), plan)
    return plan


def _hstu_plan(stack: HSTUStack) -> tuple:
    """The stack's plan while its views still see the stack's weights: the same Parameter
    object, at the same storage (.to() swaps param.data, which a view would not follow)."""
    cached = stack.__dict__.get("_one_token_plan")
    if cached is not None and cached[0]["weight"] is cached[1] and cached[1].data_ptr() == cached[2] \
            and cached[0]["bias"].data_ptr() == cached[3]:
        return cached[4]
    return _build_hstu_plan(stack)
