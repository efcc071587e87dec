"""TURBO's per-user KV cache: encode a user's history once, extend it as events arrive.

Entries are keyed by (user, model version) and hold, per block and layer, the K/V of the
history window they were built from (`HistoryBuffer`) plus that window's tokens. A lookup
compares the user's current window (the last `max_len` tokens of their Feast sequence, or
with `window_hop` > 1 the hop window of ranker.window, whose start moves in steps) with the
cached one:

- same tokens                                   -> hit, score straight from the cache;
- cached tokens are a prefix, k events appended -> incremental: K/V for the k new tokens
  only (history attention is causal inside each block, so the prefix is unchanged);
- anything else (the window slid past max_len, a recency block slid, the model version
  changed, no entry)                             -> full rebuild, batched across users.

Memory: a byte budget over everything entries hold (K/V buffers at their capacity, the
token arrays); the least recently used entries are evicted to stay under it, and an
entry larger than the whole budget is used for its request and never stored. K/V are held
in fp32 by default; `kv_storage="bf16"` or `"int8"` (per-row scale) keeps them packed at
rest, without headroom, and unpacks them for every use (ranker.serving.kv_storage).

Not thread-safe by design: one scoring thread owns it (ranker.serving.service's worker or the
sandbox's loop), so lookups and extensions need no lock.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from features.sequence import UserSequence
from ranker.batch import RankBatch
from ranker.models.layers import BlockCache, HistoryCache
from ranker.models.base import SequenceRanker
from ranker.serving.incremental import PATHS, can_extend, drop_derived_tables, extend_history
from ranker.serving.kv_storage import PackedHistory, check_storage
from ranker.window import SLIDING, check_hop, window_start

DEFAULT_BUDGET_BYTES = 256 * 2**20


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


def _tail(sequence: UserSequence, start: int) -> UserSequence:
    """Tokens [start:] of `sequence` (views), keeping its high-water mark."""
    if start == 0:
        return sequence
    return UserSequence(sequence.track_ids[start:], sequence.behaviours[start:], sequence.scenarios[start:],
                        sequence.timestamps[start:], sequence.last_event_id)


def model_window(sequence: UserSequence, max_len: int) -> UserSequence:
    """The last `max_len` tokens: what the model sees of a longer sequence (the sliding window)."""
    return _tail(sequence, max(len(sequence) - max_len, 0))


def hop_window(sequence: UserSequence, max_len: int, hop: int, anchor: int = 0) -> UserSequence:
    """The hop window (ranker.window) of `sequence` with its hop grid anchored at token `anchor`:
    it starts at anchor + a multiple of `hop` and holds at most `max_len` tokens."""
    return _tail(sequence, anchor + window_start(len(sequence) - anchor, max_len, hop))


def find_window(sequence: UserSequence, window: UserSequence) -> int | None:
    """Where `window`'s tokens start inside `sequence` (None if they are not all there): how a
    cached window's start is followed as the stored sequence gains tokens and, once the
    feature store's own cap is reached, drops its oldest."""
    if len(window) == 0:
        return None
    for start in np.flatnonzero(sequence.timestamps == window.timestamps[0]).tolist():
        if start + len(window) <= len(sequence) and _same_tokens(_tail(sequence, start), window, len(window)):
            return start
    return None


def history_batch(windows: Sequence[UserSequence], n_tracks: int, device: torch.device | str = "cpu") -> RankBatch:
    """Left-aligned padded history tensors of `windows` (no candidates yet).

    Track ids shift by +1 (0 = padding); an id the model has no embedding for (a track
    newer than its catalogue) becomes 0, the padding row, rather than failing the request.
    """
    lengths = np.array([len(w) for w in windows], np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    arrays = {name: np.zeros((len(windows), width), np.int64)
              for name in ("track_ids", "behaviours", "scenarios", "timestamps")}
    for row, window in enumerate(windows):
        for name, array in arrays.items():
            array[row, : len(window)] = getattr(window, name)
    tracks = arrays["track_ids"] + 1
    tracks[(tracks > n_tracks) | (tracks < 0)] = 0
    tracks[np.arange(width)[None, :] >= lengths[:, None]] = 0
    as_tensor = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    empty = torch.zeros(len(windows), 0, dtype=torch.int64, device=device)
    return RankBatch(
        history_tracks=as_tensor(tracks), history_behaviours=as_tensor(arrays["behaviours"]),
        history_scenarios=as_tensor(arrays["scenarios"]), history_ts=as_tensor(arrays["timestamps"]),
        history_lengths=as_tensor(lengths), candidate_tracks=empty, candidate_mask=empty.bool(),
        scenario=torch.zeros(len(windows), dtype=torch.int64, device=device),
        request_ts=torch.zeros(len(windows), dtype=torch.int64, device=device),
    )


def _pad_rows(tensors: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
    """Single-row tensors stacked along dim 0, zero-padded to the widest along `axis`
    (2 for K/V [1, h, L, dh], 1 for [1, L])."""
    if axis == 2:
        return pad_sequence([t[0].transpose(0, 1) for t in tensors], batch_first=True).transpose(1, 2)
    return pad_sequence([t[0] for t in tensors], batch_first=True)


def stack_histories(histories: Sequence[HistoryCache]) -> HistoryCache:
    """One batched HistoryCache from single-user ones, so a micro-batch of users is scored
    in one pass. Padding is invalid (masked), so each row scores as it would alone."""
    if len(histories) == 1:
        return histories[0]
    blocks = []
    for parts in zip(*(h.blocks for h in histories)):
        blocks.append(BlockCache(
            keys=[_pad_rows(layer, 2) for layer in zip(*(p.keys for p in parts))],
            values=[_pad_rows(layer, 2) for layer in zip(*(p.values for p in parts))],
            valid=_pad_rows([p.valid for p in parts], 1),
            positions=_pad_rows([p.positions for p in parts], 1),
            timestamps=_pad_rows([p.timestamps for p in parts], 1),
        ))
    return HistoryCache(blocks, torch.cat([h.history_lengths for h in histories]),
                        torch.cat([h.last_ts for h in histories]))


@dataclass
class CacheStats:
    hits: int = 0  # the cached tokens were the user's current window
    incremental: int = 0  # k events appended: K/V computed for those k only
    rebuilds: int = 0  # no usable entry: the history re-encoded in full
    cold: int = 0  # no history at all: nothing to cache
    evictions: int = 0  # entries dropped to stay under the byte budget
    oversized: int = 0  # entries larger than the whole budget, used once and not stored
    entries: int = 0
    bytes: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.incremental + self.rebuilds

    @property
    def hit_rate(self) -> float:
        """Share of lookups (users with history) served without encoding anything."""
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def reuse_rate(self) -> float:
        """Share of lookups that reused cached K/V (hits and incremental updates)."""
        return (self.hits + self.incremental) / self.lookups if self.lookups else 0.0


@dataclass
class _Entry:
    history: HistoryBuffer | PackedHistory  # PackedHistory unless kv_storage is fp32
    window: UserSequence  # the tokens the K/V were computed from
    nbytes: int


def _token_bytes(window: UserSequence) -> int:
    return sum(getattr(window, name).nbytes for name in ("track_ids", "behaviours", "scenarios", "timestamps"))


def _same_tokens(a: UserSequence, b: UserSequence, length: int) -> bool:
    """Whether the first `length` tokens of a and b are the same events."""
    return all(np.array_equal(getattr(a, name)[:length], getattr(b, name)[:length])
               for name in ("timestamps", "track_ids", "behaviours", "scenarios"))


class UserKVCache:
    """Per-(user, model version) history K/V with incremental updates and an LRU byte budget."""

    def __init__(self, model: SequenceRanker, model_version: str, budget_bytes: int = DEFAULT_BUDGET_BYTES,
                 headroom: float = 0.25, incremental: str = "fast", kv_storage: str = "fp32",
                 window_hop: int = SLIDING) -> None:
        """`incremental` picks how appended events are encoded (ranker.serving.incremental.PATHS):
        "fast" serves, "reference" re-encodes and exists to check it. `kv_storage` is how
        entries hold K/V at rest (ranker.serving.kv_storage.STORAGES). `window_hop` is the
        served window's hop (ranker.window): 1 slides it by every event past max_len."""
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if incremental not in PATHS:
            raise ValueError(f"incremental path must be one of {PATHS}, got {incremental!r}")
        self.incremental = incremental
        self.window_hop = check_hop(window_hop, model.config.max_len)
        self.kv_storage = check_storage(kv_storage)
        self.budget_bytes = int(budget_bytes)
        self.headroom = headroom
        self.stats = CacheStats()
        # Set to a list to record every lookup of a user with history as (user, outcome,
        # the entry's bytes after it), outcome "hit", "incremental" or "rebuild": what an
        # experiment keeps to replay the cache at other byte budgets (bench.cache_economics).
        self.lookup_log: list[tuple[int, str, int]] | None = None
        self._entries: OrderedDict[tuple[int, str], _Entry] = OrderedDict()
        self.set_model(model, model_version)

    def set_model(self, model: SequenceRanker, model_version: str) -> None:
        """Serve a (re)loaded model: entries of any other version can never be used again, so
        they are dropped now rather than left to age out of the budget."""
        check_hop(self.window_hop, model.config.max_len)  # a shorter max_len must still fit a hop
        self.model, self.model_version = model.eval(), str(model_version)
        drop_derived_tables(model)
        self.device = next(model.parameters()).device
        for key in [k for k in self._entries if k[1] != self.model_version]:
            self._drop(key, count=False)
        with torch.inference_mode():
            self._empty = model.encode_history(history_batch([UserSequence.empty()], 1, self.device))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self.stats.bytes

    def clear(self) -> None:
        for key in list(self._entries):
            self._drop(key, count=False)

    def histories(self, user_ids: Sequence[int], sequences: Sequence[UserSequence]) -> list[HistoryCache]:
        """One single-row HistoryCache per user (in order), each equal to encoding that user's
        current window from scratch. Users must be distinct within a call."""
        if len(user_ids) != len(sequences):
            raise ValueError(f"{len(user_ids)} user ids but {len(sequences)} sequences")
        if len(set(user_ids)) != len(user_ids):
            raise ValueError("user ids must be distinct within one histories() call")
        max_len = self.model.config.max_len
        windows = [self.window(int(u), s) for u, s in zip(user_ids, sequences)]
        out: list[HistoryCache | None] = [None] * len(user_ids)
        rebuild: list[int] = []
        with torch.inference_mode():
            for i, (user, window) in enumerate(zip(user_ids, windows)):
                out[i] = self._reuse(int(user), window)
                if out[i] is None:
                    rebuild.append(i)
            if rebuild:
                batch = history_batch([windows[i] for i in rebuild], self.model.config.n_tracks, self.device)
                encoded = self.model.encode_history(batch)
                for row, i in enumerate(rebuild):
                    out[i] = self._store(int(user_ids[i]), windows[i], HistoryBuffer(encoded, row, self.headroom, max_len))
        return out  # type: ignore[return-value]

    def window(self, user: int, sequence: UserSequence) -> UserSequence:
        """The tokens of `sequence` the model sees for `user`: the last max_len (window_hop 1),
        or the hop window. Its hop grid is anchored at the start of the user's cached
        window while that window is still inside the sequence (the store may cap
        sequences and drop their oldest tokens), else at the sequence's first token; for a
        sequence the store never capped both anchors give the same window."""
        max_len = self.model.config.max_len
        if self.window_hop == SLIDING or len(sequence) <= max_len:
            return model_window(sequence, max_len)
        entry = self._entries.get((user, self.model_version))
        anchor = None if entry is None else find_window(sequence, entry.window)
        return hop_window(sequence, max_len, self.window_hop, anchor or 0)

    # -- internals

    def _reuse(self, user: int, window: UserSequence) -> HistoryCache | None:
        """The cached history if it is current or can be extended to `window`; None to rebuild."""
        key = (user, self.model_version)
        if len(window) == 0:
            self.stats.cold += 1
            self._drop(key, count=False)
            return self._empty
        entry = self._entries.get(key)
        if entry is None:
            return None
        cached = len(entry.window)
        if cached == len(window) and entry.window.last_event_id == window.last_event_id \
                and _same_tokens(entry.window, window, cached):
            self.stats.hits += 1
            self._entries.move_to_end(key)
            self._log(user, "hit", entry.nbytes)
            return entry.history.view() if isinstance(entry.history, HistoryBuffer) else entry.history.unpacked()
        if cached < len(window) and can_extend(self.model, cached, len(window)) \
                and _same_tokens(entry.window, window, cached):
            if isinstance(entry.history, PackedHistory):  # extend in the model's dtype, packed again in _store
                entry.history = HistoryBuffer(entry.history.unpacked(), 0, self.headroom, self.model.config.max_len)
            extend_history(self.model, entry.history, history_batch([window], self.model.config.n_tracks, self.device),
                           self.incremental)
            self.stats.incremental += 1
            self._drop(key, count=False)
            return self._store(user, window, entry.history, counted=False, outcome="incremental")
        self._drop(key, count=False)
        return None

    def _log(self, user: int, outcome: str, nbytes: int) -> None:
        if self.lookup_log is not None:
            self.lookup_log.append((user, outcome, nbytes))

    def _store(self, user: int, window: UserSequence, history: HistoryBuffer, counted: bool = True,
               outcome: str = "rebuild") -> HistoryCache:
        """Insert as most recent, evicting least recent entries to fit the budget."""
        if counted:
            self.stats.rebuilds += 1
        stored: HistoryBuffer | PackedHistory = history
        if self.kv_storage != "fp32":  # scored from what is stored, so no path differs from a hit
            stored = PackedHistory.from_view(history.view(), self.kv_storage)
        nbytes = stored.nbytes + _token_bytes(window)
        view = history.view() if stored is history else stored.unpacked()
        self._log(user, outcome, nbytes)
        if nbytes > self.budget_bytes:
            self.stats.oversized += 1
            return view
        while self.stats.bytes + nbytes > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[(user, self.model_version)] = _Entry(stored, window, nbytes)
        self.stats.bytes += nbytes
        self.stats.entries = len(self._entries)
        return view

    def _drop(self, key: tuple[int, str], count: bool = True) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.stats.bytes -= entry.nbytes
        self.stats.entries = len(self._entries)
        if count:
            self.stats.evictions += 1
