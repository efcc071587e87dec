"""Feast's Redis online layout, written and read with the value bytes as they are.

Feast's `RedisOnlineStore` keeps one hash per entity: the key is the serialised entity key
followed by the project name; each feature is a field named by the murmur3 hash of
"<view>:<feature>" holding the `ValueProto` bytes, and the field "_ts:<view>" holds the
row's event time as a protobuf `Timestamp`. Its `online_write_batch` takes a protobuf per
value, serialises the entity key again for every row and re-serialises every value, and its
`online_read` parses one protobuf per value: in a Faust worker writing 256-long sequences
that was most of the worker's time (the embedded path on Valkey ran at about a fifth of its
SQLite speed). This module writes the same hashes from the bytes `features.feast_codec`
already made, with the keys and field names computed once, and reads the bytes back for
the column decoders. The tests hold it to Feast's own write and read.

Rows go in server-side Lua scripts, a thousand rows per call, rather than one pipelined
command per row: redis-py spends about 20 µs of client CPU building, sending and parsing each
pipelined HSET, the script about 4 µs per row (writing 8,000 track-statistics rows to a local
Valkey), and the track worker writes every touched track each second.

Only the single-round-trip layout is handled: `skip_dedup` (what `features.store` configures,
see there why) and no key TTL. Anything else goes through Feast's own code.

Two guards for the streaming workers, checked inside the script (atomic with the write):
- **Fence** (`fence`, `expected`): a row is replaced only if its stored fence field (a
  sequence's `last_event_id`) still holds the bytes the writer based its update on; rows
  that changed meanwhile are skipped and returned, for the writer to re-read and redo. A
  worker paused past a rebalance therefore cannot overwrite its successor's newer rows.
- **Marker** (`guard`): `mark()` sets a key when the store is prepared; a guarded write
  fails with `StoreLostError` once the key is gone (a server restarted without persistence,
  a FLUSHALL), instead of writing rows on top of an emptied store.
- **Owner** (`owner`): `claim(name)` increments a counter and returns it as a token; a write
  naming (name, token) fails with `NotOwnerError`, writing nothing, once a later claim has
  replaced the token: a generation number per partition of the track-statistics topic.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

from feast import FeatureStore, FeatureView
from feast.infra.online_stores.helpers import _mmh3
from feast.infra.online_stores.redis import RedisOnlineStore, RedisType, _versioned_fv_name
from google.protobuf.timestamp_pb2 import Timestamp
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.retry import Retry

MARKER_PREFIX = b"climber:store-marker:"


class StoreLostError(RuntimeError):
    """The online store no longer holds the marker `RedisRows.mark` set: it lost its data."""


class NotOwnerError(RuntimeError):
    """A write named an owner token that another writer has since replaced (`RedisRows.claim`)."""


@functools.lru_cache(maxsize=1 << 16)
def _timestamp_bytes(ms: int) -> bytes:
    """The `Timestamp` Feast stores for a row stamped `ms` (simulated epoch ms)."""
    seconds, millis = divmod(ms, 1000)
    return Timestamp(seconds=seconds, nanos=millis * 1_000_000).SerializeToString()


# KEYS: the marker key, an owner key, then the hash keys. ARGV: guard ("1": fail if the
# marker is gone), n, fence (0, or the 1-based index among the n fields), owner token (""
# or the value the owner key must hold, else nothing is written), the n field names, then
# per row its n values followed, when fenced, by the fence bytes expected in the store
# ("" = no field). Returns the 1-based positions of the rows left alone by the fence.
_WRITE_ROWS = """
if ARGV[1] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('CLIMBER_STORE_LOST: marker ' .. KEYS[1] .. ' is gone')
end
if ARGV[4] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[4] then
  return redis.error_reply('CLIMBER_NOT_OWNER: ' .. KEYS[2] .. ' was claimed by another writer')
end
local n, fence = tonumber(ARGV[2]), tonumber(ARGV[3])
local width = n
if fence > 0 then width = n + 1 end
local row, stale = {}, {}
for i = 3, #KEYS do
  local base = 4 + n + (i - 3) * width
  local write = true
  if fence > 0 then
    write = (redis.call('HGET', KEYS[i], ARGV[4 + fence]) or '') == ARGV[base + width]
  end
  if write then
    for j = 1, n do
      row[2 * j - 1] = ARGV[4 + j]
      row[2 * j] = ARGV[base + j]
    end
    redis.call('HSET', KEYS[i], unpack(row))
  else
    stale[#stale + 1] = i - 2
  end
end
return stale
"""

# KEYS: hash keys. ARGV: field names. One HMGET reply per key.
_READ_ROWS = """
local rows = {}
for i, key in ipairs(KEYS) do
  rows[i] = redis.call('HMGET', key, unpack(ARGV))
end
return rows
"""


class RedisRows:
    """The hashes of one Feast project on a Redis-protocol server: one HSET per entity, no
    reads first, run by a server-side script per `ROWS_PER_CALL` rows."""

    ROWS_PER_CALL = 1000  # bounds one call's arguments and how long it holds the server

    def __init__(self, store: FeatureStore) -> None:
        config = store.config
        online = store.provider.online_store
        self.client = online._get_client(config.online_store)
        self.config = config
        self.project = config.project.encode("utf-8")
        # No silent reconnect-and-retry inside redis-py: an outage reaches the caller, which
        # logs it (streaming.faust_app.FeatureLane) and retries with the guards above.
        self.client.set_retry(Retry(NoBackoff(), 0))
        self.marker_key = MARKER_PREFIX + self.project
        self._write_rows = self.client.register_script(_WRITE_ROWS)
        self._read_rows = self.client.register_script(_READ_ROWS)

    def mark(self) -> None:
        """Set the marker guarded writes require (when the store is prepared or rebuilt)."""
        self.client.set(self.marker_key, b"1")

    def marked(self) -> bool:
        return bool(self.client.exists(self.marker_key))

    def owner_key(self, name: str) -> bytes:
        return b"climber:owner:" + self.project + b":" + name.encode()

    def claim(self, name: str) -> bytes:
        """A new owner token for `name`; writes naming any older token now fail."""
        return str(self.client.incr(self.owner_key(name))).encode()

    @staticmethod
    def handles(store: FeatureStore) -> bool:
        """Whether this store is one whose rows this class writes exactly as Feast would."""
        options = store.config.online_store
        return (isinstance(store.provider.online_store, RedisOnlineStore) and bool(options.skip_dedup)
                and not options.key_ttl_seconds and options.redis_type != RedisType.redis_cluster)

    def key(self, entity_key: bytes) -> bytes:
        """The hash key of an entity, from its serialised Feast entity key."""
        return entity_key + self.project

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _fields(view_name: str, features: tuple[str, ...]) -> tuple[bytes, ...]:
        return tuple(_mmh3(f"{view_name}:{name}") for name in features)

    def write(self, view: FeatureView, keys: Sequence[bytes], values: dict[str, list[bytes]],
              timestamps_ms: Sequence[int], guard: bool = False, fence: str | None = None,
              expected: Sequence[bytes] = (), owner: tuple[str, bytes] | None = None) -> list[int]:
        """Row i: `values[feature][i]` for every feature, stamped `timestamps_ms[i]`;
        `keys` are hash keys (`key`). With `fence` (a feature name), row i is written only
        if that field stores `expected[i]` (b"": absent); returns the positions not written.
        With `guard`, raises `StoreLostError` if the marker is gone; with `owner` (name,
        token), `NotOwnerError` if the token was replaced. Either way nothing is written."""
        names, view_name = tuple(values), _versioned_fv_name(view, self.config)
        fields = (f"_ts:{view_name}".encode(), *self._fields(view_name, names))
        fence_index = 2 + names.index(fence) if fence else 0  # 1-based among `fields`
        columns = [[_timestamp_bytes(int(ms)) for ms in timestamps_ms], *(values[n] for n in names)]
        if fence:
            columns.append(list(expected))
        owner_key, token = (self.owner_key(owner[0]), owner[1]) if owner else (self.marker_key, b"")
        head = [b"1" if guard else b"0", len(fields), fence_index, token, *fields]
        stale: list[int] = []
        for start in range(0, len(keys), self.ROWS_PER_CALL):
            end = start + self.ROWS_PER_CALL
            rows = zip(*(column[start:end] for column in columns))
            try:
                skipped = self._write_rows(keys=[self.marker_key, owner_key, *keys[start:end]],
                                           args=[*head, *itertools.chain.from_iterable(rows)])
            except ResponseError as exc:
                if "CLIMBER_STORE_LOST" in str(exc):
                    raise StoreLostError(f"the online store lost its data ({exc}); rebuild it with "
                                         "`climber replay --into` (docs/streaming.md, runbook)") from None
                if "CLIMBER_NOT_OWNER" in str(exc):
                    raise NotOwnerError(str(exc)) from None
                raise
            stale += [start + int(i) - 1 for i in skipped]
        return stale

    def read(self, view: FeatureView, keys: Sequence[bytes], features: Sequence[str]) -> list[dict[str, bytes] | None]:
        """The stored bytes of `features` per key; None where no feature is set (a
        missing hash or field reads as unset, as in Feast's `online_read`)."""
        fields = self._fields(_versioned_fv_name(view, self.config), tuple(features))
        replies = []
        for start in range(0, len(keys), self.ROWS_PER_CALL):
            replies += self._read_rows(keys=keys[start:start + self.ROWS_PER_CALL], args=fields)
        return [dict(zip(features, (v or b"" for v in reply))) if any(reply) else None for reply in replies]
