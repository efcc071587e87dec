"""The run record: one DuckDB file per run (`runs/<run_id>/sandbox.duckdb`), schema in docs/schema.md.

Everything a run produces that analysis or training needs lands here: the catalog, who got
which arm, every event, every ranking request with the slate it served, and every rejected
input. The loop logs continuously, so writes are buffered and appended in large Arrow
batches (DuckDB `register` + `INSERT ... SELECT`): row-by-row inserts run at a few thousand
rows/s, a 250k-row Arrow append at several hundred thousand.

Readers flush first, so a reader never misses what was logged before it asked.
Buffering is bounded in time as well as rows (`flush_seconds` of wall time): a crashed
process loses at most that much of the record's tail, and each flush appends a row to
`flushes` with the newest event id recorded so far, so after a crash the record says
where it ends (docs/streaming.md, runbook).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from experiments.assignment import assignment_table
from ranker.interface import RANKING_SCORE, RankResponse, SlateRequest, TrackMetadata
from streaming.events import BEHAVIOURS, SCENARIOS, DeadLetter, EventBatch

SCHEMA = {
    "runs": "run_id VARCHAR, started_at TIMESTAMP, seed BIGINT, settings JSON",
    "tracks": "track_id BIGINT, artist_id BIGINT, genre_id BIGINT, duration_ms BIGINT, release_ts BIGINT",
    "assignments": "user_id BIGINT, experiment VARCHAR, arm VARCHAR, bucket INTEGER",
    "events": ("event_id BIGINT, ts BIGINT, user_id BIGINT, track_id BIGINT, scenario VARCHAR, "
               "behaviour VARCHAR, request_id BIGINT, position SMALLINT, arm VARCHAR, play_ms INTEGER, "
               "schema_version SMALLINT"),
    "requests": ("request_id BIGINT, ts BIGINT, user_id BIGINT, scenario VARCHAR, arm VARCHAR, "
                 "model_name VARCHAR, model_version VARCHAR, n_candidates INTEGER, slate_size INTEGER"),
    "impressions": "request_id BIGINT, position SMALLINT, track_id BIGINT, score FLOAT, arm VARCHAR, model_name VARCHAR",
    "dead_letters": "received_ts BIGINT, source VARCHAR, payload VARCHAR, reason VARCHAR",
    "flushes": "flushed_at TIMESTAMP, events BIGINT, last_event_id BIGINT",
    # the simulator's true P(full play | examined) per ranked impression (policy logs only)
    "oracle_engagement": "request_id BIGINT, track_id BIGINT, engagement FLOAT",
}
EVENT_COLUMNS = tuple(EventBatch.DTYPES)
FLUSH_ROWS = 250_000  # buffered rows (events + impressions) that trigger an append
FLUSH_SECONDS = 5.0  # wall time after which buffered rows are appended whatever their number


def _names(codes: np.ndarray, names: tuple[str, ...]) -> pa.DictionaryArray:
    """Codes as an Arrow dictionary of names: no Python string per row."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int8)), pa.array(names))


def _repeated_names(values: Sequence[str], sizes: Sequence[int]) -> pa.DictionaryArray:
    """values[i] repeated sizes[i] times, as an Arrow dictionary: a run has a few arm and
    model names but hundreds of thousands of impressions, and a Python string per row
    would cost more than the append itself."""
    codes, names = pd.factorize(np.asarray(values, dtype=object))
    return pa.DictionaryArray.from_arrays(pa.array(np.repeat(codes.astype(np.int32), sizes)),
                                          pa.array([str(name) for name in names], pa.string()))


def _code_sql(column: str, names: tuple[str, ...]) -> str:
    """SQL giving the contract code of a name column (NULL for an unknown name)."""
    listed = ", ".join(f"'{name}'" for name in names)
    return f"(list_position([{listed}], {column}) - 1)"


# The events table in the contract's codes, in the order the live loop applied them.
EVENTS_IN_ORDER = f"""
    SELECT event_id, ts, user_id, track_id,
           {_code_sql('scenario', SCENARIOS)} AS scenario, {_code_sql('behaviour', BEHAVIOURS)} AS behaviour,
           request_id, position, arm, play_ms, schema_version
    FROM events ORDER BY event_id, rowid"""


def _event_batch(columns: dict[str, np.ndarray], source: Path) -> EventBatch:
    for name, names in (("scenario", SCENARIOS), ("behaviour", BEHAVIOURS)):
        if np.ma.is_masked(columns[name]):
            raise ValueError(f"{source}: events.{name} holds a value outside {names}")
    columns = {name: np.asarray(values) for name, values in columns.items()}
    columns["arm"] = columns["arm"].astype(object)
    return EventBatch.from_columns(**columns)


def iter_event_log(path: str | Path, chunk_rows: int = 100_000) -> Iterator[EventBatch]:
    """A run's events in `chunk_rows` batches, in the order `read_events` gives, read-only
    and without holding the whole log in memory (replay of large logs)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no event log at {path}")
    connection = duckdb.connect(str(path), read_only=True)
    connection.execute("SET enable_progress_bar = false")  # callers show their own progress
    try:
        tables = {row[0] for row in connection.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "events" not in tables:
            raise ValueError(f"{path} has no events table (tables: {sorted(tables)})")
        reader = connection.sql(EVENTS_IN_ORDER).to_arrow_reader(chunk_rows)
        for chunk in reader:
            columns = {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.schema.names}
            for name in ("scenario", "behaviour"):  # NULL (a name outside the contract) must not pass as 0
                if chunk.column(name).null_count:
                    raise ValueError(f"{path}: events.{name} holds a value outside "
                                     f"{SCENARIOS if name == 'scenario' else BEHAVIOURS}")
            yield _event_batch(columns, path)
    finally:
        connection.close()


def event_batch_hash(events: EventBatch) -> str:
    """blake2b over every column in contract dtypes (little-endian) and arm strings; the
    same events in the same order give the same hex digest on any machine."""
    digest = hashlib.blake2b(digest_size=32)
    for name, dtype in EventBatch.DTYPES.items():
        column = getattr(events, name)
        digest.update(name.encode())
        if dtype is object:
            digest.update("\x00".join(map(str, column.tolist())).encode())
        else:
            digest.update(np.ascontiguousarray(column, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
    return digest.hexdigest()


class RunRecorder:
    """Owns one run's DuckDB file; see the module docstring. Opening an existing file appends."""

    def __init__(self, path: str | Path, flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = duckdb.connect(str(self.path))
        for table, columns in SCHEMA.items():
            self.connection.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns})")
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._flushed_at = time.monotonic()
        self._last_event_id = self.connection.execute("SELECT max(last_event_id) FROM flushes").fetchall()[0][0]
        self._events: list[EventBatch] = []
        self._requests: list[tuple] = []
        self._impressions: list[tuple[int, np.ndarray, np.ndarray, str, str]] = []
        self._buffered = 0

    # -- writers ----------------------------------------------------------------------

    def _append(self, table: str, data: pa.Table | pd.DataFrame) -> None:
        if len(data) == 0:
            return
        self.connection.register("_incoming", data)
        try:
            columns = ", ".join(data.column_names if isinstance(data, pa.Table) else data.columns)
            self.connection.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        finally:
            self.connection.unregister("_incoming")

    def log_run(self, run_id: str, seed: int, settings: Mapping[str, Any]) -> None:
        self._append("runs", pd.DataFrame({
            "run_id": [run_id], "started_at": [pd.Timestamp.now(tz="UTC").tz_localize(None)], "seed": [seed],
            "settings": [json.dumps(settings, sort_keys=True, default=str)],
        }))

    def log_tracks(self, metadata: TrackMetadata) -> None:
        self._append("tracks", pd.DataFrame({
            "track_id": np.arange(metadata.n_tracks), "artist_id": metadata.artist_id,
            "genre_id": metadata.genre_id, "duration_ms": metadata.duration_ms, "release_ts": metadata.release_ts,
        }))

    def log_assignments(self, user_ids: Sequence[int] | np.ndarray, arms: np.ndarray, experiment: str,
                        salt: str) -> None:
        self._append("assignments", assignment_table(user_ids, arms, experiment, salt))

    def log_events(self, batch: EventBatch) -> None:
        if len(batch):
            self._events.append(batch)
            self._buffered += len(batch)
            self._maybe_flush()

    def log_response(self, request: SlateRequest, response: RankResponse, arm: str) -> None:
        """One served request: its row in `requests` and its top `slate_size` as impressions."""
        if response.request_id != request.request_id:
            raise ValueError(f"response for request {response.request_id} logged with request {request.request_id}")
        shown = response.order[: request.slate_size]
        self._requests.append((request.request_id, request.ts, request.user_id, request.scenario, arm,
                               response.model_name, response.model_version, len(response.candidates),
                               request.slate_size))
        self._impressions.append((request.request_id, response.candidates[shown],
                                  np.asarray(response.scores[RANKING_SCORE])[shown], arm, response.model_name))
        self._buffered += len(shown) + 1
        self._maybe_flush()

    def log_responses(self, requests: Sequence[SlateRequest], responses: Sequence[RankResponse],
                      arms: Sequence[str]) -> None:
        if not len(requests) == len(responses) == len(arms):
            raise ValueError(f"{len(requests)} requests, {len(responses)} responses, {len(arms)} arms")
        for request, response, arm in zip(requests, responses, arms):
            self.log_response(request, response, arm)

    def log_oracle_engagement(self, request_ids: np.ndarray, track_ids: np.ndarray, engagement: np.ndarray) -> None:
        self._append("oracle_engagement", pa.table({"request_id": np.asarray(request_ids, np.int64),
                                                    "track_id": np.asarray(track_ids, np.int64),
                                                    "engagement": np.asarray(engagement, np.float32)}))

    def log_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Written at once: dead letters are rare and each is worth keeping even on a crash."""
        self._append("dead_letters", pd.DataFrame({
            "received_ts": [d.received_ts for d in letters], "source": [d.source for d in letters],
            "payload": [d.payload for d in letters], "reason": [d.reason for d in letters],
        }))

    def _maybe_flush(self) -> None:
        if self._buffered >= self.flush_rows or time.monotonic() - self._flushed_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        flushed_events = 0
        if self._events:
            events = EventBatch.concat(self._events)
            flushed_events = len(events)
            newest = int(events.event_id.max())
            self._last_event_id = newest if self._last_event_id is None else max(self._last_event_id, newest)
            columns = events.columns()
            columns["scenario"] = _names(events.scenario, SCENARIOS)
            columns["behaviour"] = _names(events.behaviour, BEHAVIOURS)
            columns["arm"] = pa.array(events.arm, type=pa.string())
            self._append("events", pa.table(columns))
            self._events = []
        if self._requests:
            self._append("requests", pd.DataFrame(self._requests, columns=[
                "request_id", "ts", "user_id", "scenario", "arm", "model_name", "model_version",
                "n_candidates", "slate_size"]))
            self._requests = []
        if self._impressions:
            sizes = [len(tracks) for _, tracks, _, _, _ in self._impressions]
            self._append("impressions", pa.table({
                "request_id": np.repeat([i[0] for i in self._impressions], sizes).astype(np.int64),
                "position": np.concatenate([np.arange(n, dtype=np.int16) for n in sizes]),
                "track_id": np.concatenate([i[1] for i in self._impressions]).astype(np.int64),
                "score": np.concatenate([i[2] for i in self._impressions]).astype(np.float32),
                "arm": _repeated_names([i[3] for i in self._impressions], sizes),
                "model_name": _repeated_names([i[4] for i in self._impressions], sizes),
            }))
            self._impressions = []
        self._buffered = 0
        if flushed_events:
            self._append("flushes", pd.DataFrame({"flushed_at": [pd.Timestamp.now(tz="UTC").tz_localize(None)],
                                                  "events": [flushed_events], "last_event_id": [self._last_event_id]}))

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.connection.close()

    # -- readers ----------------------------------------------------------------------

    def last_flushed_event_id(self) -> int | None:
        """The newest event id the file holds as of the last flush (None: no events yet)."""
        return self._last_event_id

    def read_events(self) -> EventBatch:
        """The whole events table as a batch, ordered by event_id (then insertion order)."""
        self.flush()
        return _event_batch(self.connection.execute(EVENTS_IN_ORDER).fetchnumpy(), self.path)

    def event_log_hash(self) -> str:
        """Content hash of the events table ordered by event_id (see `event_batch_hash`)."""
        return event_batch_hash(self.read_events())

    def count(self, table: str) -> int:
        if table not in SCHEMA:
            raise ValueError(f"unknown table {table!r}; tables are {sorted(SCHEMA)}")
        self.flush()
        return self.connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]

    def behaviour_counts(self) -> pd.DataFrame:
        """Events per scenario (rows) and behaviour (columns), in contract order."""
        self.flush()
        counts = self.connection.execute(
            "SELECT scenario, behaviour, count(*) AS n FROM events GROUP BY ALL").df()
        table = counts.pivot(index="scenario", columns="behaviour", values="n")
        table = table.reindex(index=[s for s in SCENARIOS if s in table.index],
                              columns=list(BEHAVIOURS)).fillna(0).astype(np.int64)
        table.columns.name = None
        return table
