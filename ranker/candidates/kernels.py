"""Compiled inner loops of candidate generation (numba), for the two steps that cost the most.

A ranking call carries tens of requests, so the numpy versions of these steps spent their
time in the overhead of some twenty small array calls each, not in the work: merging one
stage's proposals into each row's candidates and gathering the best tracks of a row's
groups. Written as plain loops over rows they run in a few microseconds. The same steps,
one source at a time, are `generate_with_sources_reference` (ranker/candidates/reference.py); the tests
hold the generator to it.

`nogil`: the loop runs beside the feature writer's thread without holding the GIL.
`cache`: compiled once per machine into `__pycache__`, not at every start-up.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def merge_stage(taken: np.ndarray, tracks: np.ndarray, codes: np.ndarray, count: np.ndarray, rows: np.ndarray,
                proposed: np.ndarray, quota: np.ndarray, ts: np.ndarray, stage_codes: np.ndarray,
                may_repeat: np.ndarray, release_ts: np.ndarray, check_release: bool) -> np.ndarray:
    """Append to each of `rows` its first `quota` proposals ([len(rows), k], -1 = none) that
    are released at the row's `ts` (when `check_release`) and not in `taken` [n_rows,
    n_tracks] yet; writes `tracks`, `codes` (the row's `stage_codes`) and `count` in place and
    returns how many each row kept.

    A row whose proposals are random draws (`may_repeat`) keeps only the first copy of a
    track: it is marked taken when kept, so a later copy finds it taken. Other rows are
    marked after their loop, as the stage's proposals are checked against what the row held
    before the stage."""
    kept = np.zeros(len(rows), np.int64)
    for i in range(len(rows)):
        row, limit, base, n = rows[i], quota[i], count[rows[i]], 0
        for j in range(proposed.shape[1]):
            if n >= limit:
                break
            track = proposed[i, j]
            if track < 0 or taken[row, track]:
                continue
            if check_release and release_ts[track] > ts[i]:
                continue
            if may_repeat[i]:
                taken[row, track] = True
            tracks[row, base + n] = track
            codes[row, base + n] = stage_codes[i]
            n += 1
        if not may_repeat[i]:
            for slot in range(base, base + n):
                taken[row, tracks[row, slot]] = True
        count[row] = base + n
        kept[i] = n
    return kept


@numba.njit(cache=True, nogil=True)
def gather_best(tracks: np.ndarray, group_start: np.ndarray, groups: np.ndarray, k: int) -> np.ndarray:
    """int64 [B, k]: the best tracks of each row's groups ([B, G], ids outside the index or
    negative are skipped), interleaved group by group: slot s takes rank s // n of group
    s % n among the row's n valid groups; -1 where that group has no such rank.
    `tracks` holds each group's tracks best first, group g at group_start[g]:group_start[g+1]."""
    n_groups = len(group_start) - 1
    out = np.full((groups.shape[0], k), -1, np.int64)
    valid = np.empty(groups.shape[1], np.int64)
    for b in range(groups.shape[0]):
        n_valid = 0
        for g in range(groups.shape[1]):
            group = groups[b, g]
            if 0 <= group < n_groups:
                valid[n_valid] = group
                n_valid += 1
        if n_valid == 0:
            continue
        for slot in range(k):
            group, rank = valid[slot % n_valid], slot // n_valid
            start = group_start[group]
            if rank < group_start[group + 1] - start:
                out[b, slot] = tracks[start + rank]
    return out
