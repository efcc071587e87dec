"""Rows of Feast's SQLite online store, written the fast way: a batch's feature values
encoded in one numpy pass (`FeatureColumns`) and upserted in a few multi-row statements
(`SqliteWriter`), in exactly the rows `SqliteOnlineStore.online_write_batch` writes, so
Feast's own reads (the reference path) see them. `features.redis_rows` is the same for
Redis; `features.store.FeatureStoreClient` picks one."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from datetime import datetime, timezone
from typing import Sequence

import numpy as np

from features.feast_codec import encode_float64_lists, encode_float64s, encode_int64_lists, encode_int64s


def naive_utc(ms: int) -> datetime:
    """A row timestamp as Feast's SQLite store receives it (naive UTC)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).replace(tzinfo=None)


def sqlite_ts(ms: int) -> object:
    """What Feast's SQLite store puts in `event_ts` for a row stamped `ms`: its registered
    datetime adapter applied to the naive UTC time. Applied once per distinct stamp, so
    `executemany` binds a plain value instead of calling the adapter per row."""
    stamp = naive_utc(ms)
    adapter = sqlite3.adapters.get((datetime, sqlite3.PrepareProtocol))
    return adapter(stamp) if adapter is not None else stamp


class FeatureColumns:
    """Encoded feature values of a batch of n entities: feature name -> ValueProto bytes per
    entity, plus the `value_text` Feast stores beside scalars (None for lists). Features of
    one type are encoded in one pass: per-call numpy overhead dominates small batches."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.values: dict[str, list[bytes]] = {}
        self.texts: dict[str, list[str] | list[None]] = {}

    def _add(self, names: Sequence[str], blobs: list[bytes], texts: list) -> None:
        for i, name in enumerate(names):
            self.values[name] = blobs[i * self.n:(i + 1) * self.n]
            self.texts[name] = texts[i * self.n:(i + 1) * self.n]

    def int64s(self, names: Sequence[str], columns: Sequence[np.ndarray]) -> None:
        values = np.concatenate([np.asarray(c, np.int64) for c in columns])
        self._add(names, encode_int64s(values), [str(v) for v in values.tolist()])

    def float64s(self, names: Sequence[str], columns: Sequence[np.ndarray]) -> None:
        values = np.concatenate([np.asarray(c, np.float64) for c in columns])
        self._add(names, encode_float64s(values), [str(v) for v in values.tolist()])

    def int64_lists(self, names: Sequence[str], flats: Sequence[np.ndarray], lengths: np.ndarray) -> None:
        """`flats[i]`: feature i's lists back to back, `lengths[j]` values for entity j.
        One feature at a time: each then has one varint width (timestamps 6 bytes, codes
        1), which the encoder handles without per-value lengths."""
        for name, flat in zip(names, flats):
            self._add((name,), encode_int64_lists(flat, lengths), [None] * self.n)

    def float64_lists(self, names: Sequence[str], flats: Sequence[np.ndarray], lengths: np.ndarray) -> None:
        blobs = encode_float64_lists(np.concatenate(flats), np.tile(lengths, len(names)))
        self._add(names, blobs, [None] * len(blobs))


class SqliteWriter:
    """Upserts into the tables Feast's SQLite online store created, in the rows
    `SqliteOnlineStore.online_write_batch` writes, one transaction per batch.

    Rows go in multi-row statements (`INSERT ... VALUES (...), (...), ...`), not
    `executemany`: Python's sqlite3 releases the GIL around each `sqlite3_step` and must
    win it back afterwards, once per row with `executemany`. On a background thread beside
    a busy main thread each win-back can wait a whole switch interval (5 ms), which made
    the sandbox's writes slow and its main thread stall. A statement per chunk of rows has
    a handful of steps per batch. Chunks are powers of two (at most `MAX_CHUNK_ROWS`
    rows, within SQLite's bound-variable limit) so a few statement texts cover every batch
    size and stay in the connection's statement cache.

    Connection settings, each measured on the sandbox's write batches (SQLite time of a
    3-day run's sequence writes, 2 shared cores): WAL so Feast's connection reads while
    this one writes; `synchronous=OFF`, `secure_delete=OFF` (this SQLite build zeroes
    every freed byte by default) and a 64 MiB page cache together cut the time ~2.4x.
    Durability: with synchronous=OFF a committed write survives a crash of this process
    but not necessarily of the operating system or a power cut, which may lose the last
    transactions or corrupt the file. The online store is a per-run copy derived from the
    event log (DuckDB / Kafka), rebuilt by replaying it, so that trade is taken here."""

    PRAGMAS = ("journal_mode=WAL", "synchronous=OFF", "secure_delete=OFF", "cache_size=-65536")
    COLUMNS = 5  # bound per row: entity_key, feature_name, value, value_text, event_ts
    MAX_CHUNK_ROWS = 1024

    def __init__(self, db_path: str) -> None:
        # check_same_thread=False: the writer may live on a background thread (one at a
        # time; the updater serialises writes). No type detection: this connection only writes.
        self.connection = sqlite3.connect(db_path, check_same_thread=False)
        for pragma in self.PRAGMAS:
            self.connection.execute(f"PRAGMA {pragma}")
        limit = self.connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // self.COLUMNS
        self.max_chunk = 1 << (min(limit, self.MAX_CHUNK_ROWS).bit_length() - 1)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _sql(table: str, n_rows: int) -> str:
        values = ", ".join(["(?, ?, ?, ?, ?, NULL)"] * n_rows)
        return (f'INSERT INTO "{table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
                f"VALUES {values} ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
                "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
                "created_ts = excluded.created_ts")

    def _chunks(self, n_rows: int) -> list[int]:
        """Row counts of the statements for `n_rows`: full chunks, then powers of two."""
        sizes = [self.max_chunk] * (n_rows // self.max_chunk)
        rest = n_rows % self.max_chunk
        return sizes + [1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1]

    def upsert(self, table: str, keys: list[bytes], columns: FeatureColumns, event_ts: list) -> None:
        params = list(itertools.chain.from_iterable(itertools.chain.from_iterable(
            zip(keys, itertools.repeat(name), values, columns.texts[name], event_ts)
            for name, values in columns.values.items()
        )))
        start = 0
        with self.connection:
            for rows in self._chunks(len(params) // self.COLUMNS):
                end = start + rows * self.COLUMNS
                self.connection.execute(self._sql(table, rows), params[start:end])
                start = end

    def upsert_reference(self, table: str, keys: list[bytes], columns: FeatureColumns, event_ts: list) -> None:
        """`upsert` with one `executemany`: the plain version the tests compare it with."""
        rows = itertools.chain.from_iterable(
            zip(keys, itertools.repeat(name), values, columns.texts[name], event_ts)
            for name, values in columns.values.items()
        )
        with self.connection:
            self.connection.executemany(self._sql(table, 1), rows)
