"""Import a public interaction log (CSV, TSV, Parquet or RecBole's .inter) as an `events` table.

The same trainer, metrics and leave-one-out protocol then run on public data. Each
interaction becomes one behaviour event; unless `negatives="none"` it is preceded by a
synthetic slate (the positive and sampled negatives) so the impression objective has
something to rank. How negatives are drawn decides what an impression-trained model learns:

  - "uniform" (default): any other item, equally likely. A model learns "what this user
    picks over a random item", which keeps popular items up, as the field's protocols expect;
  - "popularity": items of other interactions in the same time window, i.e. drawn in
    proportion to popularity at that time. Against such negatives a popular item is as often
    a negative as a positive, so BCE on the slate teaches the model to demote popularity
    (measured in docs/results.md); the next-item objective's logQ correction is the remedy;
  - "none": interactions only, for the next-item objective, which needs no slates.

The settings are kept in table `import_settings`, so train and eval can state them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import duckdb
import numpy as np
import pandas as pd

from ranker.training.data import DAY_MS
from streaming.events import BEHAVIOUR_CODE, BEHAVIOURS, SCENARIOS, EventBatch

NEGATIVE_SAMPLERS = ("uniform", "popularity", "none")
DEFAULT_BEHAVIOUR = "full_play"  # an implicit-feedback row means the user chose and consumed it
DEFAULT_SCENARIO = "library"


@dataclass(frozen=True)
class InteractionColumns:
    """Which source columns hold what. `behaviour`/`scenario` are optional."""

    user: str
    item: str
    timestamp: str
    behaviour: str | None = None
    scenario: str | None = None


@dataclass(frozen=True)
class ImportSummary:
    n_interactions: int
    n_users: int
    n_tracks: int
    n_requests: int
    n_events: int
    negatives: str = "uniform"


def _timestamps_ms(values: pd.Series, unit: str) -> np.ndarray:
    """Epoch ms from datetimes, date strings, or numbers in seconds/ms ('auto': numbers below
    1e11 are seconds, since 1e11 ms is 1973 but 1e11 s is the year 5138)."""
    if pd.api.types.is_datetime64_any_dtype(values) or values.dtype == object:
        parsed = pd.to_datetime(values, utc=True, errors="raise")
        return ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(1, "ms")).to_numpy(np.int64)
    numbers = values.to_numpy(dtype=np.float64)
    if unit == "auto":
        unit = "s" if np.nanmax(np.abs(numbers)) < 1e11 else "ms"
    if unit not in ("s", "ms"):
        raise ValueError(f"timestamp_unit must be 's', 'ms' or 'auto', not {unit!r}")
    return np.round(numbers * (1000 if unit == "s" else 1)).astype(np.int64)


def _codes(values: pd.Series | None, default: str, names: tuple[str, ...], what: str, n: int) -> np.ndarray:
    """Contract codes of a name column (case and spaces ignored); `default` where no column."""
    if values is None:
        return np.full(n, names.index(default), np.int8)
    spelled = values.astype(str).str.strip().str.lower()
    unknown = sorted(set(spelled.unique()) - set(names))
    if unknown:
        raise ValueError(f"{what} column holds unknown value(s) {unknown[:5]}; expected one of {list(names)}")
    return spelled.map({name: code for code, name in enumerate(names)}).to_numpy(np.int8)


def _value_key(value: object) -> str:
    """How a source value is matched against a behaviour map: a number that is a whole
    number reads as an integer (RecBole's `rating:float` 5.0 matches "5"), text as stripped."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def parse_behaviour_map(text: str) -> dict[str, str]:
    """'5=like,4=full_play,1-3=play' -> {"5": "like", "4": "full_play", "1": "play", ...}.
    A key `a-b` (whole numbers) stands for every integer from a to b."""
    mapping: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, name = part.partition("=")
        if not sep or not key.strip() or not name.strip():
            raise ValueError(f"behaviour map entry {part!r} is not VALUE=BEHAVIOUR (e.g. 5=like,4=full_play,1-3=play)")
        key, name = key.strip(), name.strip().lower()
        if name not in BEHAVIOURS or name == "impression":
            raise ValueError(f"behaviour map entry {part!r}: {name!r} is not one of "
                             f"{[b for b in BEHAVIOURS if b != 'impression']}")
        bounds = re.fullmatch(r"(-?\d+)\s*-\s*(-?\d+)", key)
        keys = [str(v) for v in range(int(bounds[1]), int(bounds[2]) + 1)] if bounds else [_value_key(key)]
        if not keys:
            raise ValueError(f"behaviour map entry {part!r}: the range {key!r} is empty")
        for k in keys:
            if mapping.get(k, name) != name:
                raise ValueError(f"behaviour map gives value {k!r} two behaviours ({mapping[k]!r}, {name!r})")
            mapping[k] = name
    if not mapping:
        raise ValueError("behaviour map is empty; expected VALUE=BEHAVIOUR pairs, e.g. 5=like,4=full_play,1-3=play")
    return mapping


def map_behaviours(values: pd.Series, mapping: Mapping[str, str]) -> pd.Series:
    """Behaviour names of a source column through `mapping` (see parse_behaviour_map); a
    value the map does not name is refused with the values it lacks."""
    keys = values.map(_value_key)
    unknown = sorted(set(keys.unique()) - set(mapping))
    if unknown:
        raise ValueError(f"behaviour map does not name value(s) {unknown[:5]} of the behaviour column; "
                         f"it names {sorted(mapping)}")
    return keys.map(dict(mapping))


def _read_inter(path: Path) -> pd.DataFrame:
    """RecBole's atomic file: tab-separated, header `name:type` (token, float, token_seq...).
    Columns are renamed to the bare name; token columns stay strings, as RecBole reads them."""
    with path.open() as handle:
        header = handle.readline().rstrip("\n").split("\t")
    names, dtypes = [], {}
    for field in header:
        name, sep, kind = field.partition(":")
        if not sep:
            raise ValueError(f"{path}: header field {field!r} is not `name:type` (RecBole's .inter format)")
        names.append(name)
        dtypes[name] = str if kind.startswith("token") else np.float64
    return pd.read_csv(path, sep="\t", skiprows=1, names=names, dtype=dtypes)


def _read_table(path: Path, wanted: list[str]) -> pd.DataFrame:
    """CSV/TSV/Parquet through DuckDB's readers (type and delimiter detection, fast), .inter
    through `_read_inter`."""
    suffix = path.suffix.lower()
    if suffix == ".inter":
        frame = _read_inter(path)
    else:
        reader = {".parquet": "read_parquet", ".csv": "read_csv_auto", ".tsv": "read_csv_auto",
                  ".txt": "read_csv_auto"}.get(suffix)
        if reader is None:
            raise ValueError(f"{path}: expected a .csv, .tsv, .txt, .parquet or RecBole .inter file")
        frame = duckdb.connect().execute(f"SELECT * FROM {reader}(?)", [str(path)]).df()
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; it has {list(frame.columns)}")
    return frame[wanted]


def _avoid_positive(negatives: np.ndarray, items: np.ndarray, n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Replace every negative equal to its row's positive by a uniform draw among the others."""
    clash = negatives == items[:, None]
    if clash.any() and n_items < 2:
        raise ValueError("cannot sample negatives: the source holds a single item")
    rows = np.nonzero(clash)[0]
    uniform = rng.integers(0, n_items - 1, len(rows))
    negatives[clash] = uniform + (uniform >= items[rows])  # uniform over items != positive
    return negatives


def sample_uniform_negatives(items: np.ndarray, n_negatives: int, n_items: int,
                             rng: np.random.Generator) -> np.ndarray:
    """`n_negatives` items per interaction, uniform over the catalogue minus the positive."""
    if n_items < 2:
        raise ValueError("cannot sample negatives: the source holds a single item")
    draws = rng.integers(0, n_items - 1, (len(items), n_negatives))
    return draws + (draws >= items[:, None])


def sample_window_negatives(items: np.ndarray, window: np.ndarray, n_negatives: int, n_items: int,
                            rng: np.random.Generator) -> np.ndarray:
    """For each interaction (sorted by window), `n_negatives` items drawn from the other
    interactions of the same time window (so by popularity at that time), never the positive
    itself. Where a window cannot supply one, a uniform draw from the catalogue does."""
    starts = np.searchsorted(window, window, side="left")
    ends = np.searchsorted(window, window, side="right")
    sizes = (ends - starts)[:, None]
    draws = starts[:, None] + (rng.random((len(items), n_negatives)) * sizes).astype(np.int64)
    negatives = items[draws]
    for _ in range(8):  # resample collisions with the positive; few remain after a round
        clash = negatives == items[:, None]
        if not clash.any():
            return negatives
        rows = np.nonzero(clash)[0]
        redraw = starts[rows] + (rng.random(len(rows)) * sizes[rows, 0]).astype(np.int64)
        negatives[clash] = items[redraw]
    return _avoid_positive(negatives, items, n_items, rng)


def _events(ts, users, items, behaviour_code, scenario_code, slates: np.ndarray | None,
            rng: np.random.Generator) -> pd.DataFrame:
    """Per interaction: its slate's impressions (1 ms before), then the behaviour event; event
    ids in that order, so a request's history is every earlier interaction."""
    n = len(ts)
    if slates is None:  # interactions only: no requests
        events = EventBatch.from_columns(event_id=np.arange(n), ts=ts, user_id=users, track_id=items,
                                         scenario=scenario_code, behaviour=behaviour_code)
        return events.to_pandas()
    k1 = slates.shape[1]
    positions = rng.permuted(np.tile(np.arange(k1), (n, 1)), axis=1)  # slot of each slate entry
    per = k1 + 1
    request = np.arange(n, dtype=np.int64)
    imp_events = EventBatch.from_columns(
        event_id=(request[:, None] * per + np.arange(k1)).ravel(),
        ts=np.repeat(ts - 1, k1),
        user_id=np.repeat(users, k1),
        track_id=slates.ravel(),
        scenario=np.repeat(scenario_code, k1),
        behaviour=np.full(n * k1, BEHAVIOUR_CODE["impression"]),
        request_id=np.repeat(request, k1),
        position=positions.ravel(),
    )
    act_events = EventBatch.from_columns(
        event_id=request * per + k1, ts=ts, user_id=users, track_id=items, scenario=scenario_code,
        behaviour=behaviour_code, request_id=request, position=positions[:, 0],
    )
    events = EventBatch.concat([imp_events, act_events])
    return events.select(np.argsort(events.event_id, kind="stable")).to_pandas()


def import_interactions(
    path: str | Path,
    db_path: str | Path,
    columns: InteractionColumns | Mapping[str, str],
    n_negatives: int = 9,
    window_ms: int = DAY_MS,
    timestamp_unit: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    negatives: str = "uniform",
    behaviour_map: Mapping[str, str] | str | None = None,
) -> ImportSummary:
    """Turn a public interaction log into an `events` table (see the module docstring).

    Rules (so the same trainer and metrics run on public data):
      - user and item ids are remapped densely in order of first appearance in time; the
        maps are kept in tables `user_ids(user_id, source_user)` and `track_ids(track_id, source_item)`;
      - a missing behaviour column means every row is `full_play` (implicit feedback records
        what the user chose to consume); a present one must hold Behaviour names, or values
        that `behaviour_map` turns into them (ML-100K's ratings: "5=like,4=full_play,1-3=play");
      - a missing scenario column means `library`;
      - unless negatives="none", each interaction becomes one synthetic request: a slate of
        the positive and `n_negatives` sampled items ("uniform" or "popularity", the latter
        from the same `window_ms`), in a random order, as impressions 1 ms before the
        interaction; the interaction's behaviour event follows, on the positive only.
    """
    path, db_path = Path(path), Path(db_path)
    if isinstance(columns, Mapping):
        columns = InteractionColumns(**columns)
    if negatives not in NEGATIVE_SAMPLERS:
        raise ValueError(f"negatives must be one of {NEGATIVE_SAMPLERS}, not {negatives!r}")
    if negatives != "none" and n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, not {n_negatives}")
    if not path.exists():
        raise FileNotFoundError(f"no interaction file at {path}")
    wanted = list(dict.fromkeys(c for c in (columns.user, columns.item, columns.timestamp,
                                             columns.behaviour, columns.scenario) if c))
    frame = _read_table(path, wanted).dropna(subset=[columns.user, columns.item, columns.timestamp])
    if frame.empty:
        raise ValueError(f"{path} holds no complete interactions")

    ts = _timestamps_ms(frame[columns.timestamp], timestamp_unit)
    order = np.lexsort((np.arange(len(frame)), ts))  # stable time order
    frame, ts = frame.iloc[order].reset_index(drop=True), ts[order]
    users, source_users = pd.factorize(frame[columns.user])
    items, source_items = pd.factorize(frame[columns.item])
    items = items.astype(np.int64)
    n = len(frame)
    if isinstance(behaviour_map, str):
        behaviour_map = parse_behaviour_map(behaviour_map)
    if behaviour_map is not None and columns.behaviour is None:
        raise ValueError("a behaviour map needs a behaviour column (--behaviour COL) to map")
    behaviours = frame.get(columns.behaviour)
    if behaviour_map is not None:
        behaviours = map_behaviours(behaviours, behaviour_map)
    behaviour_code = _codes(behaviours, DEFAULT_BEHAVIOUR, BEHAVIOURS, "behaviour", n)
    if np.any(behaviour_code == BEHAVIOUR_CODE["impression"]):
        raise ValueError("behaviour column holds 'impression': impressions are synthesised by the importer")
    scenario_code = _codes(frame.get(columns.scenario), DEFAULT_SCENARIO, SCENARIOS, "scenario", n)

    rng = np.random.default_rng(seed)
    slates = None
    if negatives == "uniform":
        slates = np.concatenate([items[:, None], sample_uniform_negatives(items, n_negatives, len(source_items), rng)], 1)
    elif negatives == "popularity":
        drawn = sample_window_negatives(items, ts // window_ms, n_negatives, len(source_items), rng)
        slates = np.concatenate([items[:, None], drawn], axis=1)  # [n, k+1], positive first
    events_df = _events(ts, users, items, behaviour_code, scenario_code, slates, rng)
    user_map = pd.DataFrame({"user_id": np.arange(len(source_users)),
                             "source_user": np.asarray(source_users).astype(str)})
    track_map = pd.DataFrame({"track_id": np.arange(len(source_items)),
                              "source_item": np.asarray(source_items).astype(str)})
    mapped = ",".join(f"{k}={v}" for k, v in behaviour_map.items()) if behaviour_map else ""
    settings = pd.DataFrame({"key": ["source", "negatives", "n_negatives", "window_ms", "seed", "behaviour",
                                     "behaviour_map"],
                             "value": [str(path), negatives, str(0 if slates is None else n_negatives),
                                       str(window_ms), str(seed), columns.behaviour or "", mapped]})

    db_path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(db_path))
    try:
        existing = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if "events" in existing and not overwrite:
            raise FileExistsError(f"{db_path} already has an `events` table; pass overwrite=True to replace it")
        for name, df in (("events_df", events_df), ("user_map", user_map), ("track_map", track_map),
                         ("settings_df", settings)):
            con.register(name, df)
        con.execute("CREATE OR REPLACE TABLE events AS SELECT * FROM events_df")
        # The catalogue of a public log is unknown beyond ids; release = first interaction.
        con.execute("""CREATE OR REPLACE TABLE tracks AS
                       SELECT track_id, NULL::BIGINT AS artist_id, NULL::BIGINT AS genre_id,
                              NULL::BIGINT AS duration_ms, min(ts) AS release_ts
                       FROM events_df GROUP BY track_id ORDER BY track_id""")
        con.execute("CREATE OR REPLACE TABLE user_ids AS SELECT * FROM user_map")
        con.execute("CREATE OR REPLACE TABLE track_ids AS SELECT * FROM track_map")
        con.execute("CREATE OR REPLACE TABLE import_settings AS SELECT * FROM settings_df")
    finally:
        con.close()
    return ImportSummary(n_interactions=n, n_users=len(source_users), n_tracks=len(source_items),
                         n_requests=0 if slates is None else n, n_events=len(events_df), negatives=negatives)
