"""The one client that reads and writes sandbox features in Feast.

Every run gets its own feature store under a data directory (e.g. `runs/<run_id>/feast/`):
the repo's `feature_store.yaml` is pointed into that directory, so runs never share a
registry or an online database, and `features/repo/definitions.py` stays the schema.

Reads and writes on SQLite and Redis take a fast path: a whole batch's `ValueProto` bytes
encoded and decoded with numpy (`features.feast_codec`), in the rows and hashes Feast's own
stores use; `get_sequences_via_feast` / `read_track_stats_via_feast` go through Feast's
`online_read` and are the reference the tests hold the fast path to. Writes may come from
another thread and use their own SQLite connection. Why each choice (WAL, synchronous=OFF,
Redis `skip_dedup`) and what it costs on a crash: docs/streaming.md, "The Feast client".
"""

from __future__ import annotations

import struct
import threading
import time
from datetime import timezone
from pathlib import Path
from typing import Literal, Mapping, Sequence
from urllib.parse import unquote, urlparse

import numpy as np
import yaml
from feast import FeatureStore, FeatureView, RepoConfig
from feast.errors import FeatureViewNotFoundException
from feast.feast_object import ALL_RESOURCE_TYPES
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import compute_table_id
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from features.feast_codec import decode_float64_lists, decode_int64_lists, decode_int64s, encode_int64s
from features.redis_rows import RedisRows
from features.repo import definitions
from features.sequence import UserSequence
from features.sqlite_rows import FeatureColumns, SqliteWriter, naive_utc, sqlite_ts
from features.track_stats import N_BEHAVIOURS, RECENT_FEATURES, TOTAL_FEATURES, TrackStats

REPO_DIR = Path(__file__).parent / "repo"
_INT64 = struct.Struct("<q")
OnlineStoreKind = Literal["sqlite", "redis"]
SEQUENCE_ARRAYS = ("track_ids", "behaviours", "scenarios", "timestamps")  # UserSequence fields
SEQUENCE_FEATURES = SEQUENCE_ARRAYS + ("length", "last_event_id")
TRACK_STAT_FEATURES = ("totals", "recent", "as_of_ts")  # arrays indexed by behaviour code
_KEYS_PER_QUERY = 30_000  # under SQLite's default limit of bound variables (32,766 since 3.32)


def redis_connection_string(url: str) -> str:
    """Feast's Redis connection string ("host:port,db=0,password=...") from a redis:// URL.
    A string without a scheme is taken to be in Feast's format already."""
    if "://" not in url:
        return url
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
        raise ValueError(f"redis_url {url!r}: expected redis://[user:password@]host:port[/db]")
    parts = [f"{parsed.hostname}:{parsed.port or 6379}"]
    if parsed.path.strip("/"):
        parts.append(f"db={int(parsed.path.strip('/'))}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def repo_config(data_dir: Path, online_store: OnlineStoreKind = "sqlite", redis_url: str = "") -> RepoConfig:
    """The repo's feature_store.yaml with registry, online store and offline files in `data_dir`."""
    config = yaml.safe_load((REPO_DIR / "feature_store.yaml").read_text())
    config["repo_path"] = str(data_dir)  # relative FileSource paths resolve against it
    config["registry"]["path"] = str(data_dir / "registry.db")
    if online_store == "sqlite":
        config["online_store"] = {"type": "sqlite", "path": str(data_dir / "online.db")}
    elif online_store == "redis":
        if not redis_url:
            raise ValueError("online_store='redis' needs a redis_url, e.g. redis://127.0.0.1:6379")
        config["online_store"] = {
            "type": "redis",
            "connection_string": redis_connection_string(redis_url),
            "skip_dedup": True,
        }
    else:
        raise ValueError(f"online_store must be 'sqlite' or 'redis', got {online_store!r}")
    return RepoConfig(**config)


def feast_objects() -> list:
    """Every Feast object declared in the definitions module, as `feast apply` would find them."""
    types = tuple(ALL_RESOURCE_TYPES)
    return [obj for obj in vars(definitions).values() if isinstance(obj, types)]


class FeatureStoreClient:
    """User sequences and track statistics in a per-run Feast store; a `SequenceSource`."""

    def __init__(self, data_dir: str | Path, online_store: OnlineStoreKind = "sqlite", redis_url: str = "") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = FeatureStore(repo_path=str(self.data_dir),
                                  config=repo_config(self.data_dir, online_store, redis_url))
        self._views: dict[str, FeatureView] = {}
        self._entity_keys: dict[str, dict[int, bytes]] = {}  # join key -> id -> serialised key
        self._key_prefixes: dict[str, bytes] = {}
        self._lock = threading.Lock()  # views and key cache may be filled from a writer thread
        self._sqlite: SqliteWriter | None = None
        self._redis = RedisRows(self.store) if RedisRows.handles(self.store) else None
        # Streaming workers set this: their Redis writes then fail with StoreLostError once
        # the store has lost the marker `apply` sets, instead of writing onto an emptied store.
        self.guard_store_loss = False
        online = self.store.provider.online_store
        if isinstance(online, SqliteOnlineStore):
            connection = online._get_conn(self.store.config)  # Feast offers no pragma setting
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            options = self.store.config.online_store
            if not options.vector_enabled and not getattr(options, "enable_openai_compatible_store", False):
                self._sqlite = SqliteWriter(online._get_db_path(self.store.config))

    def apply(self) -> None:
        """Register the definitions and create the online tables (idempotent)."""
        self.store.apply(feast_objects())
        with self._lock:
            self._views.clear()
        if self._redis is not None:
            self._redis.mark()

    def _view(self, name: str) -> FeatureView:
        with self._lock:
            if name not in self._views:
                try:
                    self._views[name] = self.store.get_feature_view(name)
                except FeatureViewNotFoundException:
                    raise RuntimeError(
                        f"feature view {name!r} is not in the registry at {self.data_dir}; "
                        "call FeatureStoreClient.apply() first"
                    ) from None
            return self._views[name]

    def _keys(self, join_key: str, ids: Sequence[int]) -> list[bytes]:
        """Feast's serialised entity keys, cached: the same few thousand entities recur.

        A key of one int64 join key is a fixed prefix (count, name, value type, length)
        and the value's 8 little-endian bytes, so keys not cached yet are built from the
        prefix Feast's `serialize_entity_key` gives, checked once per join key against
        Feast's own key of a second value; if the layout were ever different, each key
        comes from Feast."""
        with self._lock:
            cache = self._entity_keys.setdefault(join_key, {})
            prefix = self._key_prefixes.get(join_key, b"")
            if join_key not in self._key_prefixes:
                prefix = self._key_prefixes[join_key] = self._key_prefix(join_key)
        try:
            return [cache[i] for i in ids]
        except KeyError:
            pass
        for i in ids:
            if i not in cache:
                cache[i] = prefix + _INT64.pack(i) if prefix else self._feast_key(join_key, i)
        return [cache[i] for i in ids]

    def _feast_key(self, join_key: str, value: int) -> bytes:
        proto = EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=value)])
        return serialize_entity_key(proto, entity_key_serialization_version=self.store.config.entity_key_serialization_version)

    def _key_prefix(self, join_key: str) -> bytes:
        """What precedes the value in Feast's key for `join_key`, or b"" when a key is not
        that prefix plus the value's 8 bytes."""
        zero, probe = self._feast_key(join_key, 0), -0x0123456789ABCDEF
        prefix = zero[:-_INT64.size]
        exact = zero.endswith(bytes(_INT64.size)) and self._feast_key(join_key, probe) == prefix + _INT64.pack(probe)
        return prefix if exact else b""

    def _table(self, view_name: str) -> str:
        config = self.store.config
        return compute_table_id(config.project, self._view(view_name),
                                config.registry.enable_online_feature_view_versioning)

    def _write(self, view_name: str, join_key: str, ids: list[int], columns: FeatureColumns,
               timestamps_ms: list[int], fence: str | None = None, expected: Sequence[bytes] = (),
               owner: tuple[str, bytes] | None = None) -> list[int]:
        """Write the rows; return the positions a fenced write left alone (Redis only)."""
        if not ids:
            return []
        view = self._view(view_name)
        if self._sqlite is not None:
            stamps = {ms: sqlite_ts(ms) for ms in set(timestamps_ms)}
            event_ts = [stamps[ms] for ms in timestamps_ms]
            self._sqlite.upsert(self._table(view_name), self._keys(join_key, ids), columns, event_ts)
        elif self._redis is not None:
            return self._redis.write(view, [self._redis.key(k) for k in self._keys(join_key, ids)], columns.values,
                                     timestamps_ms, guard=self.guard_store_loss, fence=fence, expected=expected,
                                     owner=owner)
        else:
            names = list(columns.values)
            stamps = {ms: naive_utc(ms).replace(tzinfo=timezone.utc) for ms in set(timestamps_ms)}
            rows = [
                (EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=i)]),
                 {name: ValueProto.FromString(columns.values[name][row]) for name in names},
                 stamps[ms], None)
                for row, (i, ms) in enumerate(zip(ids, timestamps_ms))
            ]
            self.store.provider.online_write_batch(self.store.config, view, rows, progress=None)
        return []

    def _read(self, view_name: str, join_key: str, ids: Sequence[int],
              features: Sequence[str]) -> list[dict[str, ValueProto] | None]:
        """Reference read, through the provider's `online_read` (what `get_online_features`
        starts from): one dict of feature protos per id, None where the entity has no row
        (SQLite says so with None, Redis with a dict of unset values)."""
        if len(ids) == 0:
            return []
        keys = [EntityKeyProto(join_keys=[join_key], entity_values=[ValueProto(int64_val=i)]) for i in ids]
        found = self.store.provider.online_read(self.store.config, self._view(view_name), keys, list(features))
        return [row if row and any(v.WhichOneof("val") for v in row.values()) else None for _, row in found]

    def _read_values(self, view_name: str, join_key: str, ids: Sequence[int],
                     features: Sequence[str]) -> tuple[list[int], dict[str, list[bytes]]] | None:
        """Fast read (SQLite, Redis): the stored ValueProto bytes, decoded later a column at
        a time by `features.feast_codec` instead of one protobuf per value. On SQLite the
        query is the one `online_read` runs, on Feast's own connection. Returns the positions in `ids` that
        have a row and, per feature, their bytes in that order; None when this store or a
        row is not what the fast path handles (the caller then takes the reference read)."""
        if self._redis is not None:
            rows = self._redis.read(self._view(view_name), [self._redis.key(k) for k in self._keys(join_key, ids)],
                                    features)
            present = [i for i, row in enumerate(rows) if row]
            return present, {name: [rows[i][name] for i in present] for name in features}
        if self._sqlite is None:
            return None
        keys = self._keys(join_key, ids)
        connection = self.store.provider.online_store._get_conn(self.store.config)
        table, found = self._table(view_name), {}
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            part = keys[start:start + _KEYS_PER_QUERY]
            sql = f'SELECT entity_key, feature_name, value FROM "{table}" WHERE entity_key IN ({",".join("?" * len(part))})'
            for key, name, value in connection.execute(sql, part):
                found.setdefault(key, {})[name] = value
        rows = [found.get(key) for key in keys]
        present = [i for i, row in enumerate(rows) if row and any(row.values())]  # b"": an unset value
        try:
            return present, {name: [rows[i][name] for i in present] for name in features}
        except KeyError:  # a row missing a feature: leave the odd case to the reference read
            return None

    # -- user sequences ---------------------------------------------------------------

    def write_sequences(self, sequences: Mapping[int, UserSequence], event_ts: int | None = None) -> int:
        """Upsert many users' sequences in one online-store write; returns rows written.

        `event_ts` (simulated epoch ms) stamps every row; None stamps each row with its
        newest token's time.
        """
        columns, stamps = self._sequence_columns(sequences, event_ts)
        self._write("user_sequence", "user_id", [int(u) for u in sequences], columns, stamps)
        return len(sequences)

    def write_sequences_fenced(self, sequences: Mapping[int, UserSequence], based_on: Mapping[int, int]) -> list[int]:
        """Write each user's sequence only if the stored row's `last_event_id` is still
        `based_on[user]` (-1: no row), the row the new one was computed from; returns the
        users left alone because their row changed meanwhile (the caller re-reads them).

        On Redis the check and the write are one server-side script per chunk, so two
        workers that both believe they own a user (one paused past a rebalance) cannot
        overwrite each other's newer rows. Other stores take one writer process (SQLite),
        so there is no one to fence against: the rows are written as they are."""
        users = [int(u) for u in sequences]
        if not users:
            return []
        if self._redis is None:
            self.write_sequences(sequences)
            return []
        expected = [b"" if based_on[u] < 0 else blob
                    for u, blob in zip(users, encode_int64s(np.array([based_on[u] for u in users], np.int64)))]
        columns, stamps = self._sequence_columns(sequences, None)
        stale = self._write("user_sequence", "user_id", users, columns, stamps, fence="last_event_id", expected=expected)
        return [users[i] for i in stale]

    @staticmethod
    def _sequence_columns(sequences: Mapping[int, UserSequence], event_ts: int | None
                          ) -> tuple[FeatureColumns, list[int]]:
        seqs = list(sequences.values())
        lengths = np.array([len(s) for s in seqs], np.int64)
        columns = FeatureColumns(len(seqs))
        if seqs:
            columns.int64_lists(SEQUENCE_ARRAYS, [np.concatenate([getattr(s, name) for s in seqs])
                                                  for name in SEQUENCE_ARRAYS], lengths)
            columns.int64s(("length", "last_event_id"), [lengths, [s.last_event_id for s in seqs]])
        stamps = [int(s.timestamps[-1]) if len(s) else 0 for s in seqs] if event_ts is None else [event_ts] * len(seqs)
        return columns, stamps

    def get_sequences(self, user_ids: Sequence[int]) -> dict[int, UserSequence]:
        """Sequences of `user_ids`. Every requested user is a key: one with no row yet gets
        `UserSequence.empty()`, so rankers treat new and unknown users alike.

        On SQLite the values are decoded a column at a time (`_read_values`); elsewhere,
        and as the reference the tests compare with, `get_sequences_via_feast`. A user's
        arrays are views of the read's columns, so they live as long as one of the read's
        sequences does (memory stays the size of what was read)."""
        ids = [int(u) for u in user_ids]
        fast = self._read_values("user_sequence", "user_id", ids, SEQUENCE_ARRAYS + ("last_event_id",))
        if fast is None:
            return self.get_sequences_via_feast(ids)
        present, values = fast
        columns, lengths = {}, None
        for name in SEQUENCE_ARRAYS:
            columns[name], counts = decode_int64_lists(values[name])
            if lengths is not None and not np.array_equal(counts, lengths):
                raise ValueError("stored sequence arrays of one user differ in length")
            lengths = counts
        found = {}
        if present:
            track_ids, timestamps = columns["track_ids"], columns["timestamps"]
            behaviours, scenarios = columns["behaviours"].astype(np.int8), columns["scenarios"].astype(np.int8)
            ends = np.cumsum(lengths)
            for i, start, end, last_id in zip(present, (ends - lengths).tolist(), ends.tolist(),
                                              decode_int64s(values["last_event_id"]).tolist()):
                found[ids[i]] = UserSequence(track_ids[start:end], behaviours[start:end], scenarios[start:end],
                                             timestamps[start:end], last_event_id=last_id)
        return {user: found[user] if user in found else UserSequence.empty() for user in ids}

    def get_last_event_ids(self, user_ids: Sequence[int]) -> dict[int, int]:
        """Each user's high-water mark: the newest event id in the stored sequence, or -1
        (as in `UserSequence.empty()`) for a user with no row. One small field instead of
        four 256-long arrays, for pollers such as the stream benchmark's freshness probe,
        which would otherwise load the workers' feature store with full reads."""
        ids = [int(u) for u in user_ids]
        fast = self._read_values("user_sequence", "user_id", ids, ("last_event_id",))
        if fast is None:
            return {user: seq.last_event_id for user, seq in self.get_sequences_via_feast(ids).items()}
        present, values = fast
        found = dict(zip((ids[i] for i in present), decode_int64s(values["last_event_id"]).tolist()))
        return {user: found.get(user, UserSequence.empty().last_event_id) for user in ids}

    def get_sequences_via_feast(self, user_ids: Sequence[int]) -> dict[int, UserSequence]:
        """`get_sequences` through the provider's `online_read`, one protobuf per value."""
        ids = [int(u) for u in user_ids]
        result = {}
        for user, row in zip(ids, self._read("user_sequence", "user_id", ids, SEQUENCE_FEATURES)):
            if row is None:
                result[user] = UserSequence.empty()
                continue
            arrays = {name: np.array(row[name].int64_list_val.val, np.int64) for name in SEQUENCE_ARRAYS}
            result[user] = UserSequence(
                track_ids=arrays["track_ids"],
                behaviours=arrays["behaviours"].astype(np.int8),
                scenarios=arrays["scenarios"].astype(np.int8),
                timestamps=arrays["timestamps"],
                last_event_id=row["last_event_id"].int64_val,
            )
        return result

    # -- track statistics -------------------------------------------------------------

    def claim_owner(self, name: str) -> bytes | None:
        """A generation token for `name` (Redis; None elsewhere): writes naming an older
        token fail with `NotOwnerError` (see `features.redis_rows`)."""
        return self._redis.claim(name) if self._redis is not None else None

    def write_track_stats(self, stats: TrackStats, event_ts: int | None = None,
                          owner: tuple[str, bytes] | None = None, marks: np.ndarray | None = None) -> int:
        """Upsert the given tracks' rows (typically those `apply_track_events` touched).
        `owner` (name, token from `claim_owner`): on Redis, write only while that token is
        the newest claim, else raise `NotOwnerError` having written nothing.
        `marks` (int64 [K, P]): row i's `source_marks`, written in the same row write as its
        counts (one HSET on Redis, one transaction on SQLite); None writes them empty, which
        is what every writer but the Kafka path's track worker wants (a rebuilt row counts
        nothing from any Kafka partition)."""
        columns = FeatureColumns(len(stats))
        per_track = np.full(len(stats), N_BEHAVIOURS, np.int64)
        columns.int64_lists(("totals",), [stats.totals.ravel()], per_track)
        columns.float64_lists(("recent",), [stats.recent.ravel()], per_track)
        columns.int64s(("as_of_ts",), [stats.as_of_ts])
        if marks is None:
            columns.int64_lists(("source_marks",), [np.zeros(0, np.int64)], np.zeros(len(stats), np.int64))
        else:
            marks = np.asarray(marks, np.int64)
            if marks.shape[0] != len(stats):
                raise ValueError(f"{marks.shape[0]} rows of source marks for {len(stats)} tracks")
            columns.int64_lists(("source_marks",), [marks.ravel()], np.full(len(stats), marks.shape[1], np.int64))
        stamps = stats.as_of_ts.tolist() if event_ts is None else [event_ts] * len(stats)
        self._write("track_stats", "track_id", stats.track_ids.tolist(), columns, stamps,
                    owner=owner if owner and owner[1] is not None else None)
        return len(stats)

    def read_track_stats(self, track_ids: Sequence[int]) -> TrackStats:
        """Stored rows of the distinct `track_ids`, sorted by id, so the result can be the
        `current` of `apply_track_events` (a Faust agent restoring state); tracks with no
        row are zeros. Decoded a column at a time on SQLite, like `get_sequences`."""
        ids = np.unique(np.asarray(track_ids, np.int64))
        fast = self._read_values("track_stats", "track_id", ids.tolist(), TRACK_STAT_FEATURES)
        return self.read_track_stats_via_feast(ids) if fast is None else _decode_track_stats(ids, *fast)

    def read_track_rows(self, track_ids: Sequence[int], partitions: int) -> tuple[TrackStats, np.ndarray]:
        """`read_track_stats` and the rows' `source_marks` in one read (what the Kafka
        path's track worker restores a track from): int64 [K, partitions], -1 where a row
        has none (no row, or written off the Kafka path). A row marked for another
        partition count is an error: its marks would name other users' partitions (the
        topic was recreated with another count; `climber replay --into` rebuilds the
        store with the marks empty)."""
        ids = np.unique(np.asarray(track_ids, np.int64))
        fast = self._read_values("track_stats", "track_id", ids.tolist(), TRACK_STAT_FEATURES + ("source_marks",))
        if fast is None:
            stats = self.read_track_stats_via_feast(ids)
            rows = self._read("track_stats", "track_id", ids.tolist(), ("source_marks",))
            present = [i for i, row in enumerate(rows) if row is not None]
            lists = [list(rows[i]["source_marks"].int64_list_val.val) for i in present]
            flat = np.array([v for values in lists for v in values], np.int64)
            counts = np.array([len(values) for values in lists], np.int64)
        else:
            present, values = fast
            stats = _decode_track_stats(ids, present, values)
            flat, counts = decode_int64_lists(values["source_marks"])
        marks = np.full((len(ids), partitions), -1, np.int64)
        marked = counts > 0
        if np.any(counts[marked] != partitions):
            raise ValueError(f"stored track statistics are marked for {int(counts[marked][0])} events partitions, "
                             f"the stream has {partitions}: rebuild the store (`climber replay --into`)")
        marks[np.asarray(present, np.int64)[marked]] = flat.reshape(-1, partitions)
        return stats, marks

    def read_track_stats_via_feast(self, track_ids: Sequence[int]) -> TrackStats:
        """`read_track_stats` through the provider's `online_read`, one protobuf per value."""
        ids = np.unique(np.asarray(track_ids, np.int64))
        stats = TrackStats.zeros(ids)
        for i, row in enumerate(self._read("track_stats", "track_id", ids.tolist(), TRACK_STAT_FEATURES)):
            if row is None:
                continue
            stats.totals[i] = row["totals"].int64_list_val.val
            stats.recent[i] = row["recent"].double_list_val.val
            stats.as_of_ts[i] = row["as_of_ts"].int64_val
        return stats

    def get_track_stats(self, track_ids: Sequence[int], now_ts: int | None = None) -> dict[str, np.ndarray]:
        """Feature columns for `track_ids` (in the order given): "track_id", "<behaviour>_total" (int64),
        "<behaviour>_recent" (float64, decayed to `now_ts` when given, else as stored) and
        "as_of_ts". Tracks with no row have zero counts."""
        ids = np.asarray(track_ids, np.int64)
        stats = self.read_track_stats(ids).lookup(ids)
        recent = stats.recent if now_ts is None else stats.recent_at(now_ts)
        columns = {"track_id": stats.track_ids, "as_of_ts": stats.as_of_ts}
        columns.update({name: stats.totals[:, i] for i, name in enumerate(TOTAL_FEATURES)})
        columns.update({name: recent[:, i] for i, name in enumerate(RECENT_FEATURES)})
        return columns


def _decode_track_stats(ids: np.ndarray, present: list[int], values: dict[str, list[bytes]]) -> TrackStats:
    """TrackStats of `ids` from a fast read's bytes (`_read_values`); absent rows are zeros."""
    stats = TrackStats.zeros(ids)
    totals, total_counts = decode_int64_lists(values["totals"])
    recent, recent_counts = decode_float64_lists(values["recent"])
    if np.any(total_counts != N_BEHAVIOURS) or np.any(recent_counts != N_BEHAVIOURS):
        raise ValueError(f"stored track statistics do not have {N_BEHAVIOURS} behaviours")
    stats.totals[present] = totals.reshape(-1, N_BEHAVIOURS)
    stats.recent[present] = recent.reshape(-1, N_BEHAVIOURS)
    stats.as_of_ts[present] = decode_int64s(values["as_of_ts"])
    return stats


def wait_until_visible(store: FeatureStoreClient, last_event_ids: dict[int, int], timeout_s: float,
                       poll_s: float = 0.05, check=None) -> float:
    """Block until every user's sequence in Feast has reached its `last_event_id`; return
    the monotonic time it did. Raise TimeoutError naming how many users are behind.
    `check()`, if given, runs every poll and may raise (e.g. a process it watches died)."""
    users = list(last_event_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        seen = store.get_last_event_ids(users)
        behind = [u for u in users if seen[u] < last_event_ids[u]]
        if not behind:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(behind)} of {len(users)} users not up to date in Feast after {timeout_s} s")
        users = behind
        time.sleep(poll_s)
