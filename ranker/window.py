"""The history window a model sees: the last `max_len` tokens, or a hop window.

Sliding (hop = 1): the window is always the last `max_len` tokens, so once a user's history
is full every new event moves the window's start, every token's position shifts by one,
and a cached encoding of the previous window can never be extended: the KV cache
rebuilds on every event.

Hop window (hop = h > 1): the start moves only in steps of h tokens, to the first multiple
of h that leaves at most `max_len` tokens. Between hops the window only grows at its end,
so positions (counted from the window's start), ASTRO's in-block positions and HSTU's
relative buckets of the cached tokens stay as they were, and the cache extends; once per h
events it re-encodes. The window then holds between max_len - h + 1 and max_len tokens.
hop = 1 is the sliding window exactly.

Training slices sliding windows unless `TrainConfig.window_hop` says otherwise; serving and
offline evaluation take `hop` as a setting (bench.cache_economics compares the two on the
same impressions).
"""

from __future__ import annotations

import numpy as np

SLIDING = 1


def check_hop(hop: int, max_len: int) -> int:
    if not 1 <= int(hop) <= max_len:
        raise ValueError(f"window hop must be in [1, max_len={max_len}], got {hop}")
    return int(hop)


def window_start(n_tokens, max_len: int, hop: int = SLIDING):
    """Index of the first token the model sees out of `n_tokens` (int or int array), counted
    from where the hop grid is anchored (the user's first token)."""
    over = np.asarray(n_tokens) - max_len
    start = np.where(over > 0, -(-over // hop) * hop, 0)
    return int(start) if np.ndim(start) == 0 else start
