"""ASTRO, the Climber ranking model (arXiv 2502.09888), as we interpret it (docs/astro.md).

    tokens -> split into Nb blocks (by behaviour group, scenario or recency scale)
           -> per block: its own transformer stack, causal over the block's history,
              attention logits / (tau * sqrt(d_head)) with tau from scenario and behaviour;
              block_attention picks the stack: "softmax" (transformer) or
              "pointwise" (HSTU layers: SiLU(alpha (q / tau) k + rab) / N, U gating, no FFN);
              `norm` makes either pre-norm (the default) or post-norm
           -> each candidate attends each block's history and itself (target-aware, SUMI)
           -> a per-dimension gate fuses the Nb block outputs -> one logit per task

Attention cost is sum_b L_b^2 d, about n^2 d / Nb for an even split, because each block's
tokens are gathered into their own tensor (no n x n mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ranker.batch import RankBatch
from ranker.models.hstu import HSTULayer, HSTUStack, PointwiseAttentionConfig, relative_buckets
from ranker.models.config import DEFAULT_SIZES, SoftmaxConfig
from ranker.models.layers import (
    BlockCache,
    HistoryCache,
    SoftmaxStack,
    TaskHeads,
    gather_tokens,
    layout_blocks,
    scale_queries,
)
from ranker.models.base import SequenceRanker, WeightDerivedTables, check_batch
from ranker.models.embedding import TARGET_BEHAVIOUR, last_timestamps
from streaming.events import BEHAVIOUR_CODE, SCENARIO_CODE

PARTITIONS = ("behaviour", "scenario", "recency", "none")
BLOCK_ATTENTIONS = ("softmax", "pointwise")
CANDIDATE_PATHS = ("per_block", "shared")


def softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class AstroConfig(PointwiseAttentionConfig, SoftmaxConfig):
    # Defaults: two behaviour blocks, what the user engaged with and everything else; HSTU
    # (pointwise) layers inside each block; one layer per block stack below l (see SIZES).
    # Why these won: docs/astro-ablations.md; the figures: docs/results.md.
    partition: str = "behaviour"  # one of PARTITIONS
    behaviour_groups: tuple[tuple[str, ...], ...] = (
        ("full_play", "like", "share", "add_to_playlist"),  # engaged
        ("play", "skip", "dislike"),  # listened without engaging, or turned away
    )
    scenario_groups: tuple[tuple[str, ...], ...] = (("home_feed",), ("daily_mix",), ("radio",), ("search",), ("library",))
    recency_scales: tuple[int, ...] = (32, 128, 512)  # block b = the last recency_scales[b] events
    block_positions: bool = True  # each block adds its own learned in-block position embedding
    share_block_layers: bool = False  # one transformer stack for all blocks (fewer parameters)
    temperature: str = "dynamic"  # "dynamic" (learned tau) or "fixed" (tau = 1, the ablation)
    tau_min: float = 0.1
    tau_hidden: int = 32
    fusion: str = "softmax"  # gate over blocks per dimension: "softmax" (sums to 1) or "sigmoid"
    # The stack inside each block: "softmax" (SoftmaxStack) or "pointwise" (HSTUStack, with tau).
    block_attention: str = "pointwise"
    # How candidates meet the blocks: "per_block" runs every candidate through each block's
    # stack and fuses the Nb outputs; "shared" gives candidates one stack of their own whose
    # queries attend every block's cached K/V, fused per layer (pointwise blocks only).
    candidate_path: str = "per_block"
    # n_rab_buckets, attention_norm (PointwiseAttentionConfig): read by pointwise blocks only.

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.temperature not in ("dynamic", "fixed"):
            raise ValueError(f"temperature must be 'dynamic' or 'fixed', got {self.temperature!r}")
        if self.fusion not in ("softmax", "sigmoid"):
            raise ValueError(f"fusion must be 'softmax' or 'sigmoid', got {self.fusion!r}")
        if self.block_attention not in BLOCK_ATTENTIONS:
            raise ValueError(f"block_attention must be one of {BLOCK_ATTENTIONS}, got {self.block_attention!r}")
        if self.candidate_path not in CANDIDATE_PATHS:
            raise ValueError(f"candidate_path must be one of {CANDIDATE_PATHS}, got {self.candidate_path!r}")
        if self.candidate_path == "shared" and self.block_attention != "pointwise":
            raise ValueError("candidate_path='shared' needs block_attention='pointwise'")
        if self.norm == "post" and self.candidate_path == "shared":
            # A shared-path block's last layer keeps K/V only (no f2, no output), and post-norm
            # moves that layer's only LayerNorm to its output: it would never run nor train.
            raise ValueError("norm='post' needs candidate_path='per_block': a shared-path block's last "
                             "layer keeps K/V only, so its post-norm output LayerNorm would never run")
        self.check_pointwise_attention()
        if self.tau_min <= 0:
            raise ValueError(f"tau_min must be > 0, got {self.tau_min}")
        _group_codes(self.behaviour_groups, BEHAVIOUR_CODE, "behaviour_groups")
        _group_codes(self.scenario_groups, SCENARIO_CODE, "scenario_groups")
        if not self.recency_scales or any(s < 1 for s in self.recency_scales):
            raise ValueError(f"recency_scales must be positive, got {self.recency_scales}")

    @property
    def stack_class(self) -> type[SoftmaxStack] | type[HSTUStack]:
        """The stack each block runs; both share encode / attend_candidates / flops."""
        return HSTUStack if self.block_attention == "pointwise" else SoftmaxStack

    @property
    def n_blocks(self) -> int:
        return {
            "behaviour": len(self.behaviour_groups),
            "scenario": len(self.scenario_groups),
            "recency": len(self.recency_scales),
            "none": 1,
        }[self.partition]


def _group_codes(groups: tuple[tuple[str, ...], ...], codes: dict[str, int], field: str) -> list[int]:
    """Block of each code (-1: in no block, so such tokens are left out of every block)."""
    if not groups or any(not g for g in groups):
        raise ValueError(f"{field} must be non-empty groups, got {groups}")
    block_of = [-1] * len(codes)
    for block, group in enumerate(groups):
        for name in group:
            if name not in codes:
                raise ValueError(f"{field}: unknown name {name!r}; known: {list(codes)}")
            if block_of[codes[name]] != -1:
                raise ValueError(f"{field}: {name!r} is in more than one group")
            block_of[codes[name]] = block
    return block_of


# The shared d_model / n_heads ladder. One layer per block stack up to m: a second layer
# roughly doubles the FLOPs per request there and did not pay for itself; from l on, two
# layers stay under HSTU's FLOPs at the same rung. xs is one block: every extra block is a
# second candidate pass the width cannot pay for, so xs costs exactly HSTU xs's FLOPs
# (a test holds it). The ablations behind these choices: docs/astro-ablations.md.
SIZES: dict[str, dict[str, Any]] = {name: {**size, "n_layers": 2 if name in ("l", "xl") else 1}
                                    for name, size in DEFAULT_SIZES.items()}
SIZES["xs"]["partition"] = "none"


class DynamicTemperature(nn.Module):
    """tau per block and head for a query token, from its scenario and behaviour embeddings.

    softplus + tau_min keeps tau away from 0 (no exploding logits); the output bias starts
    at tau = 1, so training begins from ordinary attention.
    """

    def __init__(self, cfg: AstroConfig):
        super().__init__()
        self.shape = (cfg.n_blocks, cfg.n_heads)
        self.tau_min = cfg.tau_min
        self.mlp = nn.Sequential(
            nn.Linear(2 * cfg.d_model, cfg.tau_hidden), nn.SiLU(), nn.Linear(cfg.tau_hidden, cfg.n_blocks * cfg.n_heads)
        )
        self.reset_start()

    def reset_start(self) -> None:
        """Small output weights and the bias at tau = 1 (SequenceRanker.apply_init calls it again)."""
        nn.init.normal_(self.mlp[2].weight, std=0.02)
        nn.init.constant_(self.mlp[2].bias, softplus_inverse(1.0 - self.tau_min) if self.tau_min < 1 else 0.0)

    def forward(self, scenario_emb: torch.Tensor, behaviour_emb: torch.Tensor) -> torch.Tensor:  # [..., Nb, h]
        raw = self.mlp(torch.cat([scenario_emb, behaviour_emb], dim=-1))
        return F.softplus(raw).view(*raw.shape[:-1], *self.shape) + self.tau_min


class BlockFusion(nn.Module):
    """Candidate-dependent gate per block and dimension: which time scale / behaviour matters.

    A softmax gate over a single block is identically 1, so with Nb = 1 there is no gate
    (no parameters, no FLOPs): the block's output passes through unchanged.
    """

    def __init__(self, cfg: AstroConfig):
        super().__init__()
        self.n_blocks = cfg.n_blocks
        self.kind = cfg.fusion
        self.gate = None if self.is_identity(cfg) else nn.Linear(cfg.d_model, cfg.n_blocks * cfg.d_model)

    @staticmethod
    def is_identity(cfg: AstroConfig) -> bool:
        return cfg.n_blocks == 1 and cfg.fusion == "softmax"

    def forward(self, candidates: torch.Tensor, block_outputs: torch.Tensor) -> torch.Tensor:
        """candidates [B, M, d] (the token embeddings), block_outputs [B, M, Nb, d] -> [B, M, d]."""
        if self.gate is None:
            return block_outputs[:, :, 0]
        gates = self.gate(candidates).view(block_outputs.shape)
        gates = gates.softmax(dim=2) if self.kind == "softmax" else torch.sigmoid(gates)
        return (gates * block_outputs).sum(2)


class AstroModel(SequenceRanker):
    family = "astro"
    config: AstroConfig
    config_class = AstroConfig
    SIZES = SIZES

    def __init__(self, cfg: AstroConfig):
        super().__init__(cfg)
        n_blocks, stack_class = cfg.n_blocks, cfg.stack_class
        if cfg.share_block_layers:
            shared = stack_class(cfg)
            self.stacks = nn.ModuleList([shared] * n_blocks)
        else:
            self.stacks = nn.ModuleList(stack_class(cfg) for _ in range(n_blocks))
        self.block_position = None
        if cfg.block_positions:
            self.block_position = nn.ModuleList(nn.Embedding(cfg.max_len + 1, cfg.d_model) for _ in range(n_blocks))
            for table in self.block_position:
                nn.init.normal_(table.weight, std=0.02)
        self.temperature = DynamicTemperature(cfg) if cfg.temperature == "dynamic" else None
        if cfg.candidate_path == "shared":
            for stack in self.stacks:  # nothing reads a block's last-layer output: only its K/V
                stack.layers[-1].norm_attn = stack.layers[-1].f2 = None
            self.fusion = None
            self.candidate_layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.n_layers))
            self.block_gate = nn.Linear(cfg.d_model, n_blocks * cfg.n_heads)  # per block and head
        else:
            self.fusion = BlockFusion(cfg)
        block_of_behaviour = _group_codes(cfg.behaviour_groups, BEHAVIOUR_CODE, "behaviour_groups")
        block_of_scenario = _group_codes(cfg.scenario_groups, SCENARIO_CODE, "scenario_groups")
        self.register_buffer("block_of_behaviour", torch.tensor(block_of_behaviour), persistent=False)
        self.register_buffer("block_of_scenario", torch.tensor(block_of_scenario), persistent=False)
        self.register_buffer("recency_scales", torch.tensor(cfg.recency_scales), persistent=False)
        self.apply_init()

    # -- partition

    def block_membership(self, batch: RankBatch) -> torch.Tensor:
        """bool [B, n, Nb]: which block(s) each valid history token belongs to."""
        valid = batch.history_mask
        if self.config.partition == "recency":  # overlapping windows: the last 32, last 128, ... events
            age = batch.history_lengths[:, None] - 1 - torch.arange(valid.shape[1], device=valid.device)[None]
            member = age[..., None] < self.recency_scales
        else:
            member = self.token_blocks(batch.history_behaviours, batch.history_scenarios)
        return member & valid[..., None]

    def prefix_invariant(self) -> bool:
        """The recency partition counts a token's age from the window's last token."""
        return self.config.partition != "recency"

    def token_blocks(self, behaviours: torch.Tensor, scenarios: torch.Tensor) -> torch.Tensor:
        """bool [..., Nb] for partitions that depend on the token alone (recency: every block)."""
        blocks = torch.arange(self.config.n_blocks, device=behaviours.device)
        kind = self.config.partition
        if kind == "behaviour":
            return self.block_of_behaviour[behaviours][..., None] == blocks
        if kind == "scenario":
            return self.block_of_scenario[scenarios][..., None] == blocks
        return torch.ones(*behaviours.shape, self.config.n_blocks, dtype=torch.bool, device=behaviours.device)

    def temperatures(self, scenarios: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor | None:
        """tau [..., Nb, heads] for query tokens with these scenario and behaviour codes (None if fixed).

        tau depends on a token only through its two codes, so it is a row of `tau_table`,
        not an MLP per token: per request, serving gathers rows and computes none."""
        table = self.tau_table()
        return None if table is None else table[scenarios, behaviours]

    def tau_table(self) -> torch.Tensor | None:
        """tau for every (scenario, behaviour) code pair, [S, B, Nb, h]: one MLP row per pair.

        With gradients on (training) it is computed at each call, so gradients reach the
        MLP and the embeddings; without, it is kept until a weight it reads moves (the same
        staleness rule as the serving path's per-code tables, ranker.serving.incremental).
        """
        if self.temperature is None:
            return None
        params = [self.embed.scenario.weight, self.embed.behaviour.weight, *self.temperature.parameters()]
        cached = self.__dict__.get("_tau_cache")
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if not grad and cached is not None and cached.key == cached.version():
            return cached.rows
        scenario = self.embed.scenario.weight[:, None].expand(-1, self.embed.behaviour.num_embeddings, -1)
        behaviour = self.embed.behaviour.weight[None].expand(self.embed.scenario.num_embeddings, -1, -1)
        table = self.temperature(scenario, behaviour)  # [S, B, Nb, h]
        if not grad:
            self.__dict__["_tau_cache"] = WeightDerivedTables(params, table)  # plain attribute, not state
        return table

    def _with_block_position(self, x: torch.Tensor, block: int, positions: torch.Tensor) -> torch.Tensor:
        return x if self.block_position is None else x + self.block_position[block](positions)

    # -- the two serving steps

    def encode_history(self, batch: RankBatch) -> HistoryCache:
        check_batch(batch, self.config)
        x = self.embed.history(batch)
        # tau scales history queries, and a one-layer stack's history has none (K/V only).
        tau = None if self.config.n_layers == 1 else self.temperatures(batch.history_scenarios, batch.history_behaviours)
        blocks = []  # tau above: [B, n, Nb, h]
        for b, layout in enumerate(layout_blocks(self.block_membership(batch))):
            width = layout.index.shape[1]
            xb = self._with_block_position(gather_tokens(x, layout.index), b, torch.arange(width, device=x.device))
            tau_b = None if tau is None else gather_tokens(tau[:, :, b], layout.index)
            timestamps = gather_tokens(batch.history_ts, layout.index)
            keys, values = self.stacks[b].encode(xb, layout, timestamps, tau_b)
            blocks.append(BlockCache(keys, values, layout.valid, layout.index, timestamps))
        return HistoryCache(blocks, batch.history_lengths, last_timestamps(batch))

    def sequence_output(self, batch: RankBatch) -> torch.Tensor:
        """[B, n, d]: after token t, each block's output at its newest token <= t (blocks are
        causal inside), fused by the gate read from token t (blocks not yet started get no
        weight). The same blocks, temperatures and gate the candidate path uses."""
        check_batch(batch, self.config)
        if self.fusion is None:
            raise ValueError("candidate_path='shared' keeps only K/V per block: no next-item objective")
        x = self.embed.history(batch)
        B, n, d = x.shape
        tau = self.temperatures(batch.history_scenarios, batch.history_behaviours)  # [B, n, Nb, h] or None
        outputs, started = [], []
        for b, layout in enumerate(layout_blocks(self.block_membership(batch))):
            width = layout.index.shape[1]
            xb = self._with_block_position(gather_tokens(x, layout.index), b, torch.arange(width, device=x.device))
            tau_b = None if tau is None else gather_tokens(tau[:, :, b], layout.index)
            out = self.stacks[b].outputs(xb, layout, gather_tokens(batch.history_ts, layout.index), tau_b)
            # newest block token at or before each step: cummax over "this step is a member"
            slot = torch.full((B, n), -1, dtype=torch.long, device=x.device)
            member_slot = torch.where(layout.valid, torch.arange(width, device=x.device).expand(B, -1), -1)
            slot.scatter_reduce_(1, layout.index, member_slot, reduce="amax")  # padding slots add -1
            newest = slot.cummax(dim=1).values if n else slot  # [B, n], -1 before the block starts
            has = newest >= 0
            picked = gather_tokens(out, newest.clamp_min(0)) if width else x.new_zeros(B, n, d)
            outputs.append(picked * has[..., None])
            started.append(has)
        blocks = torch.stack(outputs, dim=2)  # [B, n, Nb, d]
        has = torch.stack(started, dim=2)  # [B, n, Nb]
        if self.fusion.gate is None:
            return blocks[:, :, 0]
        gates = self.fusion.gate(x).view(blocks.shape)
        if self.fusion.kind == "softmax":
            gates = gates.masked_fill(~has[..., None], float("-inf")).softmax(dim=2).nan_to_num(0.0)
        else:
            gates = torch.sigmoid(gates) * has[..., None]
        return (gates * blocks).sum(2)

    def score_candidates(self, cache: HistoryCache, batch: RankBatch) -> torch.Tensor:
        c = self.embed.candidates(batch, cache.history_lengths, cache.last_ts)  # [B, M, d]
        M = c.shape[1]
        target = torch.full_like(batch.scenario, TARGET_BEHAVIOUR)
        tau = self.temperatures(batch.scenario, target)  # [B, Nb, h]
        if self.fusion is None:
            return self.heads(self._shared_candidates(c, cache, batch, tau))
        outputs = []
        for b, block in enumerate(cache.blocks):
            cb = self._with_block_position(c, b, block.lengths[:, None])
            tau_b = None if tau is None else tau[:, None, b].expand(-1, M, -1)
            outputs.append(self.stacks[b].attend_candidates(cb, block, cache.history_lengths, batch.request_ts, tau_b))
        return self.heads(self.fusion(c, torch.stack(outputs, dim=2)))

    def _shared_candidates(self, c: torch.Tensor, cache: HistoryCache, batch: RankBatch,
                           tau: torch.Tensor | None) -> torch.Tensor:
        """candidate_path="shared": c [B, M, d] -> [B, M, d]. Per layer, one projection of the
        candidates; their queries (scaled by each block's tau) attend each block's cached K/V
        with that block layer's relative bias; a softmax gate per block and head, from the
        candidate token, mixes the Nb results, the candidate's weight on itself is added once,
        and one output projection follows.
        A candidate costs one token's linear work, not Nb, whatever the number of blocks."""
        B, M, _ = c.shape
        h = self.config.n_heads
        gates = self.block_gate(c).view(B, M, -1, h).softmax(2).permute(0, 3, 1, 2)  # [B, h, M, Nb]
        buckets = [relative_buckets(cache.history_lengths[:, None], batch.request_ts[:, None], block.positions,
                                    block.timestamps, self.config.n_rab_buckets) for block in cache.blocks]
        for i, layer in enumerate(self.candidate_layers):
            u, q, k, v = layer.project(c)  # q, k, v [B, h, M, dh]
            attended = layer.self_attention(q, k, v)  # itself, once
            for b, block in enumerate(cache.blocks):
                q_b = scale_queries(q, None if tau is None else tau[:, None, b].expand(-1, M, -1))
                block_layer = self.stacks[b].layers[i]
                a_b = block_layer.attention(q_b, block.keys[i], block.values[i], buckets[b], block.valid)
                attended = attended + gates[..., b, None] * a_b
            c = layer.finish(c, attended, u)
        return c

    # -- incremental history

    # -- cost

    def even_block_lengths(self, n: int) -> list[int]:
        """Block lengths the analytic FLOPs assume: an even split, or the recency windows."""
        cfg = self.config
        if cfg.partition == "recency":
            return [min(s, n) for s in cfg.recency_scales]
        return [n // cfg.n_blocks + (b < n % cfg.n_blocks) for b in range(cfg.n_blocks)]

    def flops_breakdown(self, n: int, M: int, block_lengths: list[int] | None = None) -> dict[str, int]:
        """Forward FLOPs (2 per multiply-add) for one request; pass real block_lengths for one user.

        Sum over blocks of the block stack's flops(L_b, M) (SoftmaxStack or HSTUStack, as
        `block_attention` says; attention ~ sum_b L_b^2 d, ~ n^2 d / Nb), plus the fusion gate
        (2 d Nb d per candidate; none for one block) and heads. tau is a table lookup (0).
        """
        cfg = self.config
        lengths = self.even_block_lengths(n) if block_lengths is None else block_lengths
        shared = cfg.candidate_path == "shared"
        total = {"linear": 0, "history_attention": 0, "candidate_attention": 0}
        for length in lengths:  # shared: the blocks encode history only (M = 0)
            for key, value in cfg.stack_class.flops(cfg, length, 0 if shared else M).items():
                total[key] += value
        if shared:  # one stack of candidate layers; each query attends every block, and itself once
            for key, value in HSTUStack.flops(cfg, 0, M).items():
                total[key] += value
            total["candidate_attention"] += cfg.n_layers * 4 * M * sum(lengths) * cfg.d_model
        # tau is a gather from tau_table, computed once per weight version, not per request
        # (S * B = 45 MLP rows, 45 (4 d t + 2 t Nb h) FLOPs, when the weights change).
        total["temperature"] = 0
        d = cfg.d_model
        total["fusion"] = 0 if not shared and BlockFusion.is_identity(cfg) else \
            M * 2 * d * cfg.n_blocks * (cfg.n_heads if shared else d)
        total["heads"] = TaskHeads.flops(cfg, M)
        return total
