"""Settings shared by the Kafka producer sink, the Faust workers and the stream benchmark.

One pydantic model so that a worker subprocess gets exactly the settings its parent used
(`StreamSettings.model_dump_json()` on its command line). The broker address also comes
from the `KAFKA_BOOTSTRAP` environment variable, so the same code runs against the local
Tansu broker and any Apache Kafka cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streaming.framing import Framing

Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]


class StreamSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIMBER_STREAM_", populate_by_name=True)

    bootstrap: str = Field("127.0.0.1:9092", validation_alias=AliasChoices("bootstrap", "KAFKA_BOOTSTRAP"))
    partitions: int = Field(4, ge=1)  # of `events` and `events.by_track`; fixed once created
    app_id: str = "climber-features"  # Faust app id = consumer group

    # Feature store the workers write to. Several worker processes need "redis": SQLite
    # takes no concurrent writers.
    feast_dir: Path = Path("runs/stream/feast")
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = ""
    max_seq_len: int = Field(256, ge=1, le=4096)

    # Worker micro-batches: a batch ends at `batch_messages` messages or after `batch_ms`.
    batch_messages: int = Field(500, ge=1)
    batch_ms: int = Field(20, ge=1)
    fetch_max_wait_ms: int = Field(20, ge=1)  # how long an idle fetch waits at the broker
    track_flush_ms: int = Field(1000, ge=10)  # track statistics reach Feast this often
    commit_interval_ms: int = Field(500, ge=10)  # how much a crash may have to redo
    # A worker that dies without leaving the group hands its partitions over after this.
    session_timeout_ms: int = Field(6000, ge=1000)
    # Written (with the partitions taken) whenever the worker gets an assignment: what a
    # container healthcheck tests to know the worker joined its group. None: not written.
    ready_file: Path | None = None
    # A worker told to stop (SIGTERM) exits after this long even if its clean shutdown is
    # stuck (e.g. waiting for acks from a broker that restarted): nothing unacked is committed.
    shutdown_timeout_s: float = Field(15.0, gt=0)

    # Plausibility bounds the sequence workers apply (streaming.plausibility): the catalogue's
    # id spaces and longest track when known (None: unchecked), and how far ahead of the
    # stream's watermarks an event id or timestamp may run.
    n_users: int | None = Field(None, ge=1)
    n_tracks: int | None = Field(None, ge=1)
    max_play_ms: int | None = Field(None, ge=0)
    max_event_id_lead: int = Field(10_000_000, ge=1)
    max_ts_lead_ms: int = Field(86_400_000, ge=0)

    # Producer. One Kafka message carries up to `events_per_message` events (JSON lines)
    # of one partition ("partition") or of one user, keyed by it ("user"); see
    # streaming.framing for why.
    framing: Framing = "partition"
    events_per_message: int = Field(512, ge=1)
    # While batches come faster than `coalesce_ms`, the sink frames those it got within
    # `coalesce_ms` (up to `coalesce_events`) together, so consecutive simulator steps
    # share messages; 0 frames each batch on its own. See streaming.producer.
    coalesce_ms: int = Field(25, ge=0)
    coalesce_events: int = Field(4096, ge=1)
    linger_ms: int = Field(5, ge=0)
    producer_batch_bytes: int = Field(256 * 1024, ge=1024)
    compression: Compression = "lz4"
    max_pending_events: int = Field(200_000, ge=1)  # unacknowledged events before the sink blocks
    delivery_timeout_ms: int = Field(120_000, ge=1000)

    @model_validator(mode="after")
    def _redis_needs_an_address(self) -> "StreamSettings":
        if self.online_store == "redis" and not self.redis_url:
            raise ValueError("online_store='redis' needs redis_url, e.g. redis://127.0.0.1:6379")
        return self

    @model_validator(mode="after")
    def _delivery_outlasts_linger(self) -> "StreamSettings":
        if self.delivery_timeout_ms <= 2 * self.linger_ms:
            raise ValueError(f"delivery_timeout_ms ({self.delivery_timeout_ms}) must be more than twice "
                             f"linger_ms ({self.linger_ms})")
        return self

    @property
    def request_timeout_ms(self) -> int:
        """The producer's per-request timeout: kafka-python's 30 s, or less so that a
        shorter `delivery_timeout_ms` is allowed (the client wants delivery > linger + request)."""
        return min(30_000, (self.delivery_timeout_ms - self.linger_ms) // 2)

    def event_bounds(self) -> "EventBounds":
        """The workers' plausibility bounds. Exact repeats are refused too: redelivery only
        follows a rebalance, which clears the worker's remembered ids."""
        from streaming.plausibility import EventBounds

        return EventBounds(n_users=self.n_users, n_tracks=self.n_tracks, max_play_ms=self.max_play_ms,
                           max_id_lead=self.max_event_id_lead, max_ts_lead_ms=self.max_ts_lead_ms)

    @property
    def bootstrap_servers(self) -> list[str]:
        return [server.strip() for server in self.bootstrap.split(",") if server.strip()]

    @property
    def faust_dir(self) -> Path:
        """Faust's data directory (it writes one even with in-memory tables)."""
        return self.feast_dir.parent / f"faust-{self.app_id}"
