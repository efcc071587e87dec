"""How much there is to learn: the floor and the ceiling on a model's own evaluation.

A full-play GAUC means little alone: the ladder's models span 0.679 to 0.684, which could be
a saturated task or weak models. So beside every model, on exactly its evaluation
impressions, this reports
- the oracle: the simulator's true P(full play | examined) of each impression when it was
  shown (table `oracle_engagement`, written by `climber simulate`): no ranker can order a
  user's impressions better on average;
- popularity: plays of the track before the evaluation window (full plays in a log without
  `play` events, e.g. one made by `climber import`): a ranker that knows no user;
- each model's share of the gap closed, (model - popularity) / (oracle - popularity).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np

from ranker.batch import TASKS
from ranker.training.data import RequestLog
from ranker.training.metrics import gauc
from streaming.events import BEHAVIOURS

ORACLE_KEY, POPULARITY_KEY = "gauc/full_play/oracle", "gauc/full_play/popularity"


def oracle_engagement(db_path: str | Path, request_ids: np.ndarray, track_ids: np.ndarray) -> np.ndarray | None:
    """The oracle's engagement of each (request, track), or None if the log has none of them."""
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "oracle_engagement" not in tables:
            return None
        wanted = np.unique(request_ids)
        con.register("wanted", {"request_id": wanted})
        found = con.execute("SELECT o.request_id, o.track_id, o.engagement FROM oracle_engagement o "
                            "JOIN wanted USING (request_id)").fetchnumpy()
    finally:
        con.close()
    n_tracks = int(max(track_ids.max(initial=0), np.max(found["track_id"], initial=0))) + 1
    keys = np.asarray(found["request_id"], np.int64) * n_tracks + np.asarray(found["track_id"], np.int64)
    order = np.argsort(keys)
    keys, values = keys[order], np.asarray(found["engagement"], np.float64)[order]
    want = request_ids.astype(np.int64) * n_tracks + track_ids.astype(np.int64)
    at = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
    if len(keys) == 0 or not (keys[at] == want).all():
        return None  # a log without the oracle for every evaluated impression (e.g. a sandbox run)
    return values[at]


def ceiling_metrics(db_path: str | Path, train_log: RequestLog, eval_log: RequestLog) -> dict[str, float]:
    """Full-play GAUC of the oracle (NaN without its table) and of popularity on `eval_log`'s impressions."""
    impressions = eval_log.impression_rows(np.arange(len(eval_log)))
    labels = eval_log.labels[impressions, TASKS.index("full_play")]
    tracks = eval_log.candidate_tracks[impressions].astype(np.int64)
    users = np.repeat(eval_log.user_id, eval_log.candidate_count)
    requests = np.repeat(eval_log.request_id, eval_log.candidate_count)
    start = eval_log.request_ts.min(initial=np.iinfo(np.int64).max)
    before = train_log.token_ts < start
    played = (train_log.token_behaviours == BEHAVIOURS.index("play")) & before
    if not played.any():  # an imported log may hold full plays only
        played = (train_log.token_behaviours == BEHAVIOURS.index("full_play")) & before
    plays = np.bincount(train_log.token_tracks[played], minlength=eval_log.n_tracks).astype(np.float64)
    # Ties broken by track id, as a popularity ranker would be (deterministic).
    popularity = plays[tracks] + tracks / (10.0 * (tracks.max(initial=0) + 1))
    oracle = oracle_engagement(db_path, requests, tracks) if len(tracks) else None
    return {ORACLE_KEY: gauc(labels, oracle, users) if oracle is not None else float("nan"),
            POPULARITY_KEY: gauc(labels, popularity, users)}


def gap_closed(model: float, popularity: float, oracle: float) -> float:
    """Share of the popularity-to-oracle gap a model closes (NaN without an oracle)."""
    gap = oracle - popularity
    return float((model - popularity) / gap) if np.isfinite(gap) and gap > 0 else float("nan")
