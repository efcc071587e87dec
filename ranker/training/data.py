"""Training data from the DuckDB event log: one sample per ranking request.

Feature compression as in Climber: a request stores its user's history once and all of its
impressions as targets (single user, many items), exactly the shape serving scores.

Layout (`RequestLog`) is compact so a million impressions fit in a few tens of MB:
  - tokens: every user's sequence tokens concatenated, sorted by (user_id, event_id);
  - per request: where its user's tokens start and where its history ends in that array,
    so history = tokens[max(first, end - max_len) : end] is sliced only at batch time;
  - per impression: candidate track, position and one label per task, grouped by request.
Tensors (`RankBatch`) are materialised per mini-batch by `RequestLog.batch`.

History semantics match `features.sequence.apply_events`: tokens are every behaviour except
`impression`, duplicates (redelivered event ids) count once, order is event_id (emission
order), and a request sees only tokens emitted strictly before its first impression.

The external importer (ranker.training.importer) turns a public interaction log into the same
`events` table, so the same trainer runs on public data; ranker.training.loo holds the
field's leave-one-out split over each user's token sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping

import duckdb
import numpy as np
import pandas as pd
import torch

from ranker.batch import TASKS, RankBatch
from ranker.window import SLIDING, check_hop, window_start
from streaming.events import BEHAVIOUR_CODE, BEHAVIOURS, SCENARIOS, EventBatch

DAY_MS = 86_400_000
# NDCG relevance: the positive tasks, summed (a skip is not relevance).
RELEVANCE_TASKS: tuple[str, ...] = ("full_play", "like", "share")

assert all(task in BEHAVIOUR_CODE for task in TASKS), "every task must be a behaviour name"


@dataclass(frozen=True)
class RequestLog:
    """Requests with their histories and labelled impressions (see the module docstring).

    `select` returns a subset of requests that shares the token and impression arrays, so
    train/eval splits cost only the per-request columns.
    """

    # tokens, sorted by (user_id, event_id)
    token_tracks: np.ndarray  # int32 [N_tok]
    token_behaviours: np.ndarray  # int8 [N_tok]
    token_scenarios: np.ndarray  # int8 [N_tok]
    token_ts: np.ndarray  # int64 [N_tok]
    # requests, in time order
    request_id: np.ndarray  # int64 [R]
    user_id: np.ndarray  # int64 [R]
    scenario: np.ndarray  # int8 [R]
    request_ts: np.ndarray  # int64 [R], ts of the first impression
    history_first: np.ndarray  # int64 [R], the user's first token
    history_end: np.ndarray  # int64 [R], one past the last token before the request
    candidate_start: np.ndarray  # int64 [R], into the impression arrays
    candidate_count: np.ndarray  # int64 [R]
    # impressions, grouped by request, in position order
    candidate_tracks: np.ndarray  # int32 [N_imp]
    candidate_positions: np.ndarray  # int16 [N_imp]
    labels: np.ndarray  # uint8 [N_imp, len(TASKS)]
    n_tracks: int
    token_users: np.ndarray | None = None  # int64 [N_tok], the user of each token (leave-one-out)

    def __len__(self) -> int:
        return len(self.request_id)

    @property
    def n_impressions(self) -> int:
        return int(self.candidate_count.sum())

    def select(self, rows: np.ndarray) -> "RequestLog":
        """The requests at `rows` (boolean mask or indices); shared arrays are not copied."""
        per_request = ("request_id", "user_id", "scenario", "request_ts", "history_first",
                       "history_end", "candidate_start", "candidate_count")
        return replace(self, **{name: getattr(self, name)[rows] for name in per_request})

    def history_window(self, rows: np.ndarray, max_len: int, hop: int = SLIDING) -> tuple[np.ndarray, np.ndarray]:
        """[start, end) token ranges of the last `max_len` tokens before each request, or with
        hop > 1 of the hop window (ranker.window) anchored at the user's first token."""
        first, end = self.history_first[rows], self.history_end[rows]
        if hop == SLIDING:
            return np.maximum(first, end - max_len), end
        return first + window_start(end - first, max_len, check_hop(hop, max_len)), end

    def impression_rows(self, rows: np.ndarray) -> np.ndarray:
        """Indices into the impression arrays, request by request, in position order: the
        order of `logits[batch.candidate_mask]` for `batch = self.batch(rows, ...)`."""
        counts = self.candidate_count[rows]
        starts = np.repeat(self.candidate_start[rows] - np.cumsum(counts) + counts, counts)
        return starts + np.arange(counts.sum())

    def batch(self, rows: np.ndarray, max_len: int, hop: int = SLIDING) -> RankBatch:
        """Materialise the requests at `rows` as padded tensors (ids shifted +1, 0 = pad)."""
        rows = np.asarray(rows)
        start, end = self.history_window(rows, max_len, hop)
        lengths = end - start
        n = max(int(lengths.max(initial=0)), 1)
        hist_mask = np.arange(n)[None, :] < lengths[:, None]
        hist_index = np.where(hist_mask, start[:, None] + np.arange(n)[None, :], 0)

        counts = self.candidate_count[rows]
        m = max(int(counts.max(initial=0)), 1)
        cand_mask = np.arange(m)[None, :] < counts[:, None]
        cand_index = np.where(cand_mask, self.candidate_start[rows][:, None] + np.arange(m)[None, :], 0)

        def gather(values: np.ndarray, index: np.ndarray, mask: np.ndarray, shift: int = 0) -> torch.Tensor:
            if len(values) == 0:
                return torch.zeros(index.shape, dtype=torch.int64)
            return torch.from_numpy(np.where(mask, values[index].astype(np.int64) + shift, 0))

        labels = np.zeros((len(rows), m, len(TASKS)), np.float32)
        if self.n_impressions:
            labels[cand_mask] = self.labels[cand_index[cand_mask]]
        return RankBatch(
            history_tracks=gather(self.token_tracks, hist_index, hist_mask, shift=1),
            history_behaviours=gather(self.token_behaviours, hist_index, hist_mask),
            history_scenarios=gather(self.token_scenarios, hist_index, hist_mask),
            history_ts=gather(self.token_ts, hist_index, hist_mask),
            history_lengths=torch.from_numpy(lengths.astype(np.int64)),
            candidate_tracks=gather(self.candidate_tracks, cand_index, cand_mask, shift=1),
            candidate_mask=torch.from_numpy(cand_mask),
            scenario=torch.from_numpy(self.scenario[rows].astype(np.int64)),
            request_ts=torch.from_numpy(self.request_ts[rows].astype(np.int64)),
            labels=torch.from_numpy(labels),
        )

    def relevance(self, impression_rows: np.ndarray) -> np.ndarray:
        """Graded relevance for NDCG: the number of positive behaviours on an impression."""
        columns = [TASKS.index(task) for task in RELEVANCE_TASKS]
        return self.labels[impression_rows][:, columns].sum(axis=1).astype(np.float64)


def iterate_batches(n_rows: int, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0
                    ) -> Iterator[np.ndarray]:
    """Row indices in batches; the shuffle depends only on (seed, epoch), so every DDP rank
    and every resumed run sees the same global order."""
    order = np.random.default_rng([seed, epoch]).permutation(n_rows) if shuffle else np.arange(n_rows)
    for start in range(0, n_rows, batch_size):
        yield order[start:start + batch_size]


# --------------------------------------------------------------------------------------
# Building a RequestLog from DuckDB


def _code_sql(column: str, names: tuple[str, ...]) -> str:
    """SQL mapping a name column to its contract code (NULL for an unknown name)."""
    listed = ", ".join(f"'{name}'" for name in names)
    return f"(list_position([{listed}], {column}) - 1)"


def _check_known(con: duckdb.DuckDBPyConnection, column: str, names: tuple[str, ...]) -> None:
    unknown = con.execute(
        f"SELECT DISTINCT {column} FROM events WHERE {_code_sql(column, names)} IS NULL LIMIT 5"
    ).fetchall()
    if unknown:
        raise ValueError(f"events.{column} holds unknown value(s) {[u[0] for u in unknown]}; "
                         f"expected one of {list(names)}")


def _check_events_table(con: duckdb.DuckDBPyConnection, db_path: Path) -> None:
    tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "events" not in tables:
        raise ValueError(f"{db_path} has no `events` table (tables: {sorted(tables)})")
    columns = {row[0] for row in con.execute("DESCRIBE events").fetchall()}
    missing = {"event_id", "ts", "user_id", "track_id", "scenario", "behaviour", "request_id",
               "position"} - columns
    if missing:
        raise ValueError(f"{db_path}: table `events` lacks column(s) {sorted(missing)}")
    _check_known(con, "behaviour", BEHAVIOURS)
    _check_known(con, "scenario", SCENARIOS)


def _count_tokens_before(token_user: np.ndarray, token_event: np.ndarray,
                         query_user: np.ndarray, query_event: np.ndarray) -> np.ndarray:
    """For each query, the number of tokens ordered before (query_user, query_event), i.e.
    with a smaller user, or the same user and a smaller event id. One merged sort."""
    n_tok = len(token_user)
    users = np.concatenate([token_user, query_user])
    events = np.concatenate([token_event, query_event])
    is_token = np.concatenate([np.ones(n_tok, bool), np.zeros(len(query_user), bool)])
    # Queries sort before tokens with the same key: "strictly before" the impression.
    order = np.lexsort((is_token, events, users))
    tokens_so_far = np.cumsum(is_token[order])
    before = np.empty(len(query_user), np.int64)
    query_slots = order >= n_tok
    before[order[query_slots] - n_tok] = tokens_so_far[query_slots]
    return before


def load_request_log(db_path: str | Path) -> RequestLog:
    """Read `events` (and `tracks`, if present) from a DuckDB file into a RequestLog."""
    db_path = Path(db_path)
    if not db_path.exists():
        raise FileNotFoundError(f"no DuckDB file at {db_path}")
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        _check_events_table(con, db_path)
        label_columns = ", ".join(
            f"max(behaviour = '{task}')::UTINYINT AS {task}" for task in TASKS)
        task_list = ", ".join(f"'{task}'" for task in TASKS)
        # Redelivered events share an event_id: keep one, as apply_events does.
        con.execute(f"""
            CREATE TEMP VIEW once AS SELECT DISTINCT ON (event_id) * FROM events;
            CREATE TEMP VIEW labelled AS
              SELECT request_id, track_id, {label_columns}
              FROM once WHERE request_id >= 0 AND behaviour IN ({task_list})
              GROUP BY request_id, track_id;
        """)
        tokens = con.execute(f"""
            SELECT user_id, event_id, track_id::INTEGER AS track_id,
                   {_code_sql('behaviour', BEHAVIOURS)}::TINYINT AS behaviour,
                   {_code_sql('scenario', SCENARIOS)}::TINYINT AS scenario, ts
            FROM once WHERE behaviour <> 'impression' ORDER BY user_id, event_id
        """).fetchnumpy()
        label_select = ", ".join(f"coalesce(l.{task}, 0)::UTINYINT AS {task}" for task in TASKS)
        impressions = con.execute(f"""
            SELECT i.request_id, i.user_id, {_code_sql('i.scenario', SCENARIOS)}::TINYINT AS scenario,
                   i.track_id::INTEGER AS track_id, i.position::SMALLINT AS position,
                   i.event_id, i.ts, {label_select}
            FROM once i LEFT JOIN labelled l USING (request_id, track_id)
            WHERE i.behaviour = 'impression' AND i.request_id >= 0
            ORDER BY i.request_id, i.position, i.event_id
        """).fetchnumpy()
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        max_catalog_id = -1
        if "tracks" in tables:
            (max_catalog_id,) = con.execute("SELECT coalesce(max(track_id), -1) FROM tracks").fetchone() or (-1,)
    finally:
        con.close()
    return _build_request_log(tokens, impressions, max_catalog_id)


def _as_array(column, dtype) -> np.ndarray:
    return np.asarray(column, dtype=dtype)  # DuckDB may hand back masked arrays for no rows


def _build_request_log(tokens: Mapping[str, np.ndarray], impressions: Mapping[str, np.ndarray],
                       max_catalog_id: int) -> RequestLog:
    token_user = _as_array(tokens["user_id"], np.int64)
    imp_request = _as_array(impressions["request_id"], np.int64)
    imp_user = _as_array(impressions["user_id"], np.int64)
    imp_event = _as_array(impressions["event_id"], np.int64)
    imp_ts = _as_array(impressions["ts"], np.int64)

    # Impressions are sorted by request: one segment per request.
    new_request = np.r_[True, imp_request[1:] != imp_request[:-1]] if len(imp_request) else np.zeros(0, bool)
    starts = np.flatnonzero(new_request)
    counts = np.diff(np.r_[starts, len(imp_request)])
    segment = np.cumsum(new_request) - 1
    if np.any(imp_user != imp_user[starts][segment]):
        bad = imp_request[np.flatnonzero(imp_user != imp_user[starts][segment])[0]]
        raise ValueError(f"request_id {bad} has impressions for more than one user_id")
    first_event = np.minimum.reduceat(imp_event, starts) if len(starts) else np.zeros(0, np.int64)
    first_ts = np.minimum.reduceat(imp_ts, starts) if len(starts) else np.zeros(0, np.int64)
    user = imp_user[starts]

    history_end = _count_tokens_before(token_user, _as_array(tokens["event_id"], np.int64), user, first_event)
    history_first = np.searchsorted(token_user, user, side="left").astype(np.int64)
    time_order = np.lexsort((imp_request[starts], first_ts))
    track_max = max(int(max_catalog_id),
                    int(_as_array(tokens["track_id"], np.int64).max(initial=-1)),
                    int(_as_array(impressions["track_id"], np.int64).max(initial=-1)))
    return RequestLog(
        token_tracks=_as_array(tokens["track_id"], np.int32),
        token_behaviours=_as_array(tokens["behaviour"], np.int8),
        token_scenarios=_as_array(tokens["scenario"], np.int8),
        token_ts=_as_array(tokens["ts"], np.int64),
        request_id=imp_request[starts][time_order],
        user_id=user[time_order],
        scenario=_as_array(impressions["scenario"], np.int8)[starts][time_order],
        request_ts=first_ts[time_order],
        history_first=history_first[time_order],
        history_end=history_end[time_order],
        candidate_start=starts.astype(np.int64)[time_order],
        candidate_count=counts.astype(np.int64)[time_order],
        candidate_tracks=_as_array(impressions["track_id"], np.int32),
        candidate_positions=_as_array(impressions["position"], np.int16),
        labels=np.stack([_as_array(impressions[task], np.uint8) for task in TASKS], axis=1)
        if len(imp_request) else np.zeros((0, len(TASKS)), np.uint8),
        n_tracks=track_max + 1,
        token_users=token_user,
    )


# --------------------------------------------------------------------------------------
# Time split


@dataclass(frozen=True)
class TimeSplit:
    train: RequestLog
    eval: RequestLog
    cutoff_ts: int  # train requests are before it, eval requests at or after it


def after_training_log(run_dir: Path) -> tuple["RequestLog", np.ndarray, np.ndarray]:
    """An experiment run's A/B-phase requests (those after its warm-up log, which the arms
    were trained on), with each impression's full-play label and user, in impression order."""
    cutoff = int(load_request_log(Path(run_dir) / "warm_up.duckdb").request_ts.max()) + 1
    log = split_by_time(load_request_log(Path(run_dir) / "sandbox.duckdb"), cutoff_ts=cutoff).eval
    impressions = log.impression_rows(np.arange(len(log)))
    return log, log.labels[impressions, TASKS.index("full_play")], np.repeat(log.user_id, log.candidate_count)


def split_by_time(log: RequestLog, eval_window_ms: int = DAY_MS, cutoff_ts: int | None = None) -> TimeSplit:
    """Train on earlier requests, evaluate on the last `eval_window_ms` of the log (by
    default the last day). Histories of eval requests may reach back into the train period,
    as they would in production; train requests never see anything at or after the cutoff."""
    if len(log) == 0:
        raise ValueError("the event log holds no requests with impressions; nothing to train on")
    if cutoff_ts is None:
        cutoff_ts = int(log.request_ts.max()) - int(eval_window_ms) + 1
    is_eval = log.request_ts >= cutoff_ts
    if is_eval.all() or not is_eval.any():
        span_h = (log.request_ts.max() - log.request_ts.min()) / 3_600_000
        raise ValueError(f"time split at {cutoff_ts} leaves an empty side: the log spans {span_h:.1f} h "
                         f"of requests; choose a shorter eval window than {eval_window_ms} ms")
    return TimeSplit(log.select(~is_eval), log.select(is_eval), int(cutoff_ts))
