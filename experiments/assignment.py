"""Deterministic experiment assignment: the same user, salt and split give the same arm, anywhere.

bucket = blake2b(salt || "|" || user_id as decimal) read as a big-endian unsigned 64-bit
integer, mod 10,000. Arms own consecutive bucket ranges in the order given, sized by their
traffic share. A keyed cryptographic hash (never Python's `hash()`, which is salted per
process) makes buckets stable across processes, machines and languages, and a fresh salt
per experiment makes bucket positions independent between experiments.
"""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

N_BUCKETS = 10_000
MAX_ARM_LENGTH = 64  # the event contract's limit on `arm`


def buckets(user_ids: Sequence[int] | np.ndarray, salt: str) -> np.ndarray:
    """int64 bucket in [0, N_BUCKETS) for each user id."""
    prefix = salt.encode() + b"|"
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(prefix + str(int(u)).encode(), digest_size=8).digest(), "big") % N_BUCKETS
         for u in np.asarray(user_ids).tolist()),
        dtype=np.int64, count=len(user_ids),
    )


def bucket_bounds(arms: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
    """Arm labels and the exclusive upper bucket of each (the last one is N_BUCKETS)."""
    if not arms:
        raise ValueError("arms: need at least one arm")
    for label, share in arms.items():
        if not isinstance(label, str) or not 0 < len(label) <= MAX_ARM_LENGTH:
            raise ValueError(f"arm label {label!r}: must be a non-empty string of at most {MAX_ARM_LENGTH} chars")
        if not (isinstance(share, (int, float)) and math.isfinite(share) and share > 0):
            raise ValueError(f"arm {label!r}: traffic share must be a positive number, got {share!r}")
    labels = list(arms)
    shares = np.array([arms[a] for a in labels], np.float64)
    upper = np.round(np.cumsum(shares) / shares.sum() * N_BUCKETS).astype(np.int64)
    upper[-1] = N_BUCKETS
    return labels, upper


def assign_arms(user_ids: Sequence[int] | np.ndarray, experiment: str, salt: str,
                arms: Mapping[str, float]) -> np.ndarray:
    """object array of arm labels, aligned with `user_ids`.

    `experiment` names the experiment for records and errors; the salt alone decides buckets.
    """
    if not salt:
        raise ValueError(f"experiment {experiment!r}: salt must be a non-empty string")
    labels, upper = bucket_bounds(arms)
    arm_index = np.searchsorted(upper, buckets(user_ids, salt), side="right")
    return np.asarray(labels, dtype=object)[arm_index]


def assignment_table(user_ids: Sequence[int] | np.ndarray, arms: np.ndarray, experiment: str,
                     salt: str) -> pd.DataFrame:
    """The record of who got which arm: user_id, experiment, arm, bucket (one row per user)."""
    user_ids = np.asarray(user_ids, np.int64)
    arms = np.asarray(arms, dtype=object)
    if arms.shape != user_ids.shape:
        raise ValueError(f"{len(arms)} arms for {len(user_ids)} users")
    return pd.DataFrame({"user_id": user_ids, "experiment": experiment, "arm": arms,
                         "bucket": buckets(user_ids, salt)})
