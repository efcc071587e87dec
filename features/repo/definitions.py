"""Feast objects of the Climber feature repository: the single source of truth for the schema.

`feast apply` imports every .py file in this folder, and `FeatureStoreClient.apply()` applies
every Feast object defined here, so keep other code out of this folder.

Streaming writers (the embedded updater, the Faust agents) push rows into the online store;
Feast runs no ingestion itself. The parquet batch sources are where an offline export or a
backfill would land; paths are relative to the run's data directory and may not exist.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float64, Int64

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64,
              description="A listener of the simulated platform.")
track = Entity(name="track", join_keys=["track_id"], value_type=ValueType.INT64,
               description="A track of the simulated catalog.")

user_sequence_parquet = FileSource(
    name="user_sequence_parquet",
    path="offline/user_sequence.parquet",
    timestamp_field="event_timestamp",
)
user_sequence_push = PushSource(name="user_sequence_push", batch_source=user_sequence_parquet)

user_sequence = FeatureView(
    name="user_sequence",
    entities=[user],
    ttl=timedelta(0),  # a listening history never expires
    schema=[
        Field(name="user_id", dtype=Int64),
        # The last N behaviour tokens, oldest first; codes as in streaming.events.
        Field(name="track_ids", dtype=Array(Int64)),
        Field(name="behaviours", dtype=Array(Int64)),
        Field(name="scenarios", dtype=Array(Int64)),
        Field(name="timestamps", dtype=Array(Int64)),  # simulated epoch ms
        Field(name="length", dtype=Int64),
        Field(name="last_event_id", dtype=Int64),  # idempotence high-water mark
    ],
    source=user_sequence_push,
    online=True,
    description="Per-user behaviour sequence (features.sequence.UserSequence).",
)

track_stats_parquet = FileSource(
    name="track_stats_parquet",
    path="offline/track_stats.parquet",
    timestamp_field="event_timestamp",
)
track_stats_push = PushSource(name="track_stats_push", batch_source=track_stats_parquet)

track_stats = FeatureView(
    name="track_stats",
    entities=[track],
    ttl=timedelta(0),
    schema=[
        Field(name="track_id", dtype=Int64),
        # One value per behaviour, indexed by behaviour code (streaming.events.BEHAVIOURS):
        # three features per row instead of 2 x 8 scalars, so a flush writes 3 online-store
        # rows per track, not 17 (names of the scalar columns: features.track_stats).
        Field(name="totals", dtype=Array(Int64)),  # all-time counts
        Field(name="recent", dtype=Array(Float64)),  # decayed counts (time constant 24 h) as of as_of_ts
        Field(name="as_of_ts", dtype=Int64),
        # Exactly-once marks of the Kafka path (streaming.online_state.TrackStatsState): per
        # `events` partition, the highest event id these counts include; empty elsewhere.
        Field(name="source_marks", dtype=Array(Int64)),
    ],
    source=track_stats_push,
    online=True,
    description="Per-track behaviour counts, all-time and recent (features.track_stats.TrackStats).",
)
