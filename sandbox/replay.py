"""`climber replay`: drive a recorded event log through the feature path again.

Operators do this to rebuild an online store that was lost or wiped, to rebuild features
under new settings (a longer `max_seq_len`), or to re-drive the streaming path (Kafka and
Faust workers) with a known log. The replay is a run of its own: `runs/<run_id>/` gets
its own DuckDB record and Feast repo, and the source is only read.
- The DuckDB record holds the replayed events, the dead letters with their reasons, and a
  `runs` row that names the source.

Sources:
- **A run's DuckDB file** (its `events` table). It is read in chunks, in event-id order:
  the order the live loop applied the events.
- **A JSON-lines file** (`.jsonl`, `.ndjson`, or either with `.gz`): one raw event per line,
  as produced to Kafka. A malformed or invalid line becomes a dead letter with the reason,
  and the replay goes on. The file is read through once before anything is applied, so a
  file that cannot be read to its end (a truncated or corrupt `.gz`, a `.gz` that is not
  gzip) stops the replay with one line naming the file, the line and the problem, and no
  run is created: nothing is applied, so the replay can simply be run again on a whole
  file. A UTF-8 byte-order mark at the start is ignored (RFC 8259 allows that), with a warning.

Events take the path a live run's events take (`EventPipeline`): validation, the
plausibility bounds, the DuckDB record, and then the features, through the embedded
updater or Kafka. With `verify` (the default), the source is read again, on its own
(decoded, validated and bounded afresh, not taken from the run's record), each user's
sequence is recomputed from it and compared with Feast, and the recorded event ids are
compared with the source's: a line the pipeline accepted or dropped wrongly shows up as a
mismatch. Any mismatch is reported, and the command fails.
"""

from __future__ import annotations

import gzip
import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from experiments.recorder import RunRecorder, iter_event_log
from features.sequence import UserSequence, apply_events
from sandbox.loop import EventPipeline, Stopwatch, build_feature_path
from sandbox.settings import SandboxSettings
from streaming.bus import InProcessBus
from streaming.events import decode_events, validate_batch
from streaming.plausibility import EventBounds, PlausibilityGate

SOURCE = "replay"  # the dead letters' and the bus's source label
BOM = b"\xef\xbb\xbf"
log = logging.getLogger(__name__)


class ReplayInputError(ValueError):
    """The source cannot be read to its end; the message names the file, the line and why."""
JSON_SUFFIXES = (".jsonl", ".ndjson")


@dataclass
class ReplayResult:
    source: Path
    run_dir: Path
    db_path: Path
    events_read: int  # events (DuckDB rows or JSON lines) taken from the source
    events_applied: int  # passed validation: recorded and sent to the feature path
    dead_letters: int
    dead_letter_reasons: dict[str, int]  # reason (first clause) -> count
    users: int
    feature_rows_written: int | None  # None on the Kafka path: the workers write (and count) them
    wall_seconds: float
    verified_users: int = 0  # 0 when verification was off
    mismatched_users: list[int] = field(default_factory=list)
    unrecorded_events: int = 0  # accepted on the source's own reading, missing from the record
    unexpected_events: int = 0  # recorded, but not accepted on the source's own reading

    @property
    def events_per_second(self) -> float:
        return self.events_read / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def ok(self) -> bool:
        return not self.mismatched_users and not self.unrecorded_events and not self.unexpected_events

    def to_dict(self) -> dict:
        return {**{k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()},
                "events_per_second": self.events_per_second, "ok": self.ok}


def source_kind(path: Path) -> str:
    """'duckdb' or 'json', from the file name; anything else is refused with the reason."""
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".duckdb"):
        if path.name.lower().endswith(".gz"):
            raise ValueError(f"{path}: a DuckDB file must be uncompressed to be read")
        return "duckdb"
    if name.endswith(JSON_SUFFIXES):
        return "json"
    raise ValueError(f"{path}: cannot tell the format; replay reads a run's .duckdb or JSON lines "
                     f"({', '.join(JSON_SUFFIXES)}, optionally .gz)")


def _open_json(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def check_json_source(path: Path) -> int:
    """Read a JSON-lines source to its end without applying anything; return its lines.
    Raises `ReplayInputError` ("<file>: line <n>: <problem>") where it cannot be read."""
    lines = 0
    try:
        with _open_json(path) as f:
            for lines, _ in enumerate(f, start=1):
                pass
    except EOFError:
        problem = "the gzip data ends before its end marker (a truncated file?)"
    except gzip.BadGzipFile as exc:
        problem = f"not gzip data, although the name ends in .gz ({exc})"
    except zlib.error as exc:
        problem = f"corrupt gzip data ({exc})"
    except OSError as exc:
        problem = f"unreadable ({exc})"
    else:
        return lines
    raise ReplayInputError(f"{path}: line {lines + 1}: {problem}; nothing was applied")


def json_line_chunks(path: Path, chunk_lines: int, warn: bool = True) -> Iterator[list[bytes]]:
    """Non-empty lines of a JSON-lines file (gzip if named .gz), `chunk_lines` at a time;
    a byte-order mark at the start is dropped (with a warning, if `warn`)."""
    with _open_json(path) as f:
        chunk: list[bytes] = []
        for number, line in enumerate(f, start=1):
            if number == 1 and line.startswith(BOM):
                if warn:
                    log.warning("%s: line 1 starts with a UTF-8 byte-order mark; ignored", path)
                line = line[len(BOM):]
            line = line.rstrip(b"\r\n")
            if line.strip():
                chunk.append(line)
                if len(chunk) >= chunk_lines:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def replay(source: str | Path, settings: SandboxSettings, chunk_events: int = 50_000, verify: bool | None = None,
           progress: bool = False) -> ReplayResult:
    """Replay `source` into a new run under `settings` (transport, online store, max_seq_len).

    `verify=None` verifies unless the features are built by workers this command does not
    run (`--transport kafka` with `workers=0`): it could not tell when they are done.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"no event log at {source}")
    kind = source_kind(source)
    if chunk_events < 1:
        raise ValueError(f"chunk_events must be >= 1, got {chunk_events}")
    if verify is None:
        verify = settings.transport == "embedded" or settings.workers > 0
    elif verify and settings.transport == "kafka" and settings.workers == 0:
        raise ValueError("cannot verify a replay whose features are built by workers started elsewhere "
                         "(--transport kafka --workers 0); replay with --no-verify")
    run_dir = settings.run_dir()
    if (run_dir / "sandbox.duckdb").exists():
        raise FileExistsError(f"{run_dir} already holds a run; replay into a new --run-id")
    if kind == "json":
        check_json_source(source)  # before anything exists: a source that breaks off applies nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    recorder = RunRecorder(run_dir / "sandbox.duckdb")
    features = None
    try:
        recorder.log_run(settings.resolved_run_id(), settings.sim.seed,
                         {"replay_of": str(source.resolve()), **json.loads(settings.model_dump_json())})
        features, store = build_feature_path(settings, run_dir)
        bus = InProcessBus()
        pipeline = EventPipeline(bus, recorder, features, learners=[], watch=Stopwatch())
        read = _feed(pipeline, bus, source, kind, chunk_events, progress)
        pipeline.finish()
        if settings.transport == "kafka":  # the workers' rejects, kept with the run
            recorder.log_dead_letters(features.dead_letters())
        recorder.flush()
        applied = recorder.count("events")
        reasons = dict(recorder.connection.execute(
            "SELECT split_part(reason, ':', 1) AS why, count(*) FROM dead_letters GROUP BY why ORDER BY 2 DESC").fetchall())
        users = recorder.connection.execute("SELECT count(DISTINCT user_id) FROM events").fetchone()[0]
        result = ReplayResult(source=source, run_dir=run_dir, db_path=recorder.path, events_read=read,
                              events_applied=applied, dead_letters=recorder.count("dead_letters"),
                              dead_letter_reasons=reasons, users=int(users), feature_rows_written=features.rows_written,
                              wall_seconds=time.perf_counter() - started)
        if verify:
            reference, source_ids = source_reference(source, kind, chunk_events, settings.max_seq_len)
            recorded = recorder.read_events()
            users = sorted(set(reference) | set(np.unique(recorded.user_id).tolist()))
            served = store.get_sequences(users)
            result.verified_users = len(users)
            empty = UserSequence.empty()  # a user with no sequence events (impressions only) has none
            result.mismatched_users = [u for u in users if not served[u].equals(reference.get(u, empty))]
            result.unrecorded_events = int(np.setdiff1d(source_ids, recorded.event_id).size)
            result.unexpected_events = int(np.setdiff1d(recorded.event_id, source_ids).size)
        (run_dir / "replay.json").write_text(json.dumps(result.to_dict(), indent=2))
        return result
    finally:
        if features is not None:
            features.close()
        recorder.close()


def export_event_log(db_path: str | Path, out: str | Path, chunk_events: int = 100_000, progress: bool = False) -> int:
    """A run's events as JSON lines (gzip if `out` ends in .gz), in the order replay applies
    them: what `replay` reads back, what Kafka carries, what other tools take. Returns the
    number of events written; refuses to overwrite a file."""
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    out = Path(out)
    if source_kind(out) != "json":
        raise ValueError(f"{out}: export writes JSON lines; name the file {' or '.join(JSON_SUFFIXES)} (optionally .gz)")
    if out.exists():
        raise FileExistsError(f"{out} exists; export does not overwrite")
    opener = gzip.open if out.name.lower().endswith(".gz") else open
    written = 0
    partial = out.with_name(out.name + ".partial")
    columns = (TextColumn("exporting"), TextColumn("{task.fields[events]:,} events"), TimeElapsedColumn())
    try:
        with opener(partial, "wb") as f, Progress(*columns, disable=not progress, transient=True) as bar:
            task = bar.add_task("export", events=0)
            for batch in iter_event_log(db_path, chunk_events):
                f.write(b"".join(raw + b"\n" for raw in batch.encode_json()))
                written += len(batch)
                bar.update(task, events=written)
        partial.rename(out)  # a file named .jsonl is always a whole log
    finally:
        partial.unlink(missing_ok=True)
    return written


def source_reference(source: Path, kind: str, chunk_events: int, max_seq_len: int
                     ) -> tuple[dict[int, UserSequence], np.ndarray]:
    """What Feast must hold after a replay of `source`, from the source itself: read again,
    each chunk decoded, validated and bounded by a fresh gate (as the pipeline's rules say,
    but not through the pipeline or its record), the users' sequences recomputed.
    Returns them and the accepted event ids."""
    sequences: dict[int, UserSequence] = {}
    ids = []
    gate = PlausibilityGate(EventBounds())
    chunks = (iter_event_log(source, chunk_events) if kind == "duckdb"
              else (decode_events(lines)[0] for lines in json_line_chunks(source, chunk_events, warn=False)))
    for batch in chunks:
        good, _ = gate.check(validate_batch(batch)[0])
        sequences.update(apply_events(sequences, good, max_seq_len))
        ids.append(good.event_id)
    return sequences, np.concatenate(ids) if ids else np.zeros(0, np.int64)


def _feed(pipeline: EventPipeline, bus: InProcessBus, source: Path, kind: str, chunk_events: int,
          progress: bool) -> int:
    """Push the source through the pipeline chunk by chunk; returns the events read."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("replaying"), BarColumn(), TextColumn("{task.fields[events]:,} events"), TimeElapsedColumn())
    total = source.stat().st_size if kind == "json" and not source.name.lower().endswith(".gz") else None
    read = 0
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("replay", total=total, events=0)
        if kind == "duckdb":
            for batch in iter_event_log(source, chunk_events):
                pipeline.on_events(batch, source=SOURCE)
                read += len(batch)
                bar.update(task, events=read)
        else:
            for lines in json_line_chunks(source, chunk_events):
                pipeline.on_json(lines, source=SOURCE)
                read += len(lines)
                bar.update(task, advance=sum(len(line) + 1 for line in lines), events=read)
    return read

