"""How the per-user KV cache holds K/V at rest: fp32 (the default), bf16, or int8 with one
fp32 scale per row (`UserKVCache(kv_storage=...)`).

A "row" is one token's d_head vector of one head, layer and K or V: int8 keeps
round(x / s) with s = max|x| / 127 over that row, so a token with large activations costs
no precision to the others. Stored K/V are unpacked to the model's dtype before scoring, on
every path (hit, extension, rebuild), so a user's scores never depend on which path served
them. bf16 halves the bytes, int8 (per-row scale) takes about (d_head + 4) / (4 d_head).

One switch as elsewhere in serving: `pack`/`unpack` are the vectorised path, and
`pack_reference`/`unpack_reference` the row-by-row definition the tests hold them to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranker.models.layers import BlockCache, HistoryCache

STORAGES = ("fp32", "bf16", "int8")
INT8_MAX = 127


@dataclass
class Packed:
    """One tensor at rest: `data` in the storage dtype, `scale` [..., 1] fp32 for int8."""

    data: torch.Tensor
    scale: torch.Tensor | None
    dtype: torch.dtype  # what unpack returns

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale) if t is not None)


def check_storage(kind: str) -> str:
    if kind not in STORAGES:
        raise ValueError(f"kv_storage must be one of {STORAGES}, got {kind!r}")
    return kind


def pack(x: torch.Tensor, kind: str) -> Packed:
    """x [..., d_head] (any float dtype) at rest in `kind`."""
    check_storage(kind)
    if kind == "fp32":
        return Packed(x.float().clone(), None, x.dtype)
    if kind == "bf16":
        return Packed(x.to(torch.bfloat16), None, x.dtype)
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / INT8_MAX  # [..., 1]
    q = torch.where(scale > 0, xf / torch.where(scale > 0, scale, 1.0), 0.0).round_().clamp_(-INT8_MAX, INT8_MAX)
    return Packed(q.to(torch.int8), scale, x.dtype)


def unpack(p: Packed) -> torch.Tensor:
    if p.scale is None:
        return p.data.to(p.dtype)
    return (p.data.float() * p.scale).to(p.dtype)


def pack_reference(x: torch.Tensor, kind: str) -> Packed:
    """Row by row, straight from the definition (slow; for the tests)."""
    check_storage(kind)
    if kind != "int8":
        return pack(x, kind)
    rows = x.float().reshape(-1, x.shape[-1])
    data = torch.zeros(rows.shape, dtype=torch.int8)
    scales = torch.zeros(len(rows), 1)
    for i, row in enumerate(rows):
        top = float(row.abs().max()) if row.numel() else 0.0
        scales[i, 0] = top / INT8_MAX
        if top > 0:
            for j, value in enumerate(row):
                data[i, j] = int(max(-INT8_MAX, min(INT8_MAX, torch.round(value / scales[i, 0]).item())))
    return Packed(data.view(x.shape), scales.view(*x.shape[:-1], 1), x.dtype)


def unpack_reference(p: Packed) -> torch.Tensor:
    if p.scale is None:
        return p.data.to(p.dtype)
    rows, scales = p.data.reshape(-1, p.data.shape[-1]), p.scale.reshape(-1)
    out = torch.stack([rows[i].float() * scales[i] for i in range(len(rows))]) if len(rows) else rows.float()
    return out.view(p.data.shape).to(p.dtype)


@dataclass
class PackedBlock:
    keys: list[Packed]  # per layer, [1, heads, L, d_head] at rest
    values: list[Packed]
    positions: torch.Tensor  # int64 [1, L]
    timestamps: torch.Tensor  # int64 [1, L]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (*self.keys, *self.values)) + sum(
            t.numel() * t.element_size() for t in (self.positions, self.timestamps))


@dataclass
class PackedHistory:
    """One user's HistoryCache at rest: the filled tokens only (no headroom)."""

    blocks: list[PackedBlock]
    history_length: int
    last_ts: int

    @classmethod
    def from_view(cls, history: HistoryCache, kind: str) -> "PackedHistory":
        """From a single-row HistoryCache (a HistoryBuffer's view)."""
        blocks = [PackedBlock([pack(k, kind) for k in block.keys], [pack(v, kind) for v in block.values],
                              block.positions.clone(), block.timestamps.clone()) for block in history.blocks]
        return cls(blocks, int(history.history_lengths[0]), int(history.last_ts[0]))

    def unpacked(self) -> HistoryCache:
        """A single-row HistoryCache in the model's dtype (what HistoryBuffer copies from)."""
        blocks = []
        for block in self.blocks:
            length = block.positions.shape[1]
            valid = torch.ones(1, length, dtype=torch.bool, device=block.positions.device)
            blocks.append(BlockCache([unpack(k) for k in block.keys], [unpack(v) for v in block.values], valid,
                                     block.positions, block.timestamps))
        device = self.blocks[0].positions.device
        return HistoryCache(blocks, torch.tensor([self.history_length], device=device),
                            torch.tensor([self.last_ts], device=device))

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)
