"""`climber sandbox --transport kafka`: the same loop with features built by the real streaming path.

The simulator's events are produced to the Kafka topic `events` (keyed by user). Faust
workers, run here as subprocesses, build the sequences and track statistics and push them
to Feast's Redis online store. The ranker reads Feast exactly as on the embedded path.
The in-process bus still fans events out to the DuckDB recorder and the online learners in
this process; Kafka is the path features take.

What is missing is started here: a Tansu broker unless `kafka_bootstrap` names one, and a
persistent Valkey server (`streaming.valkey`: append-only file, fsync per write) unless
`redis_url` names one. `workers=0` leaves consuming to workers started elsewhere
(docker-compose does this). `workers=N` starts N sequence-building workers and one
track-statistics worker. Every child dies with this process (`streaming.lifetime`).

Faults stop the run loudly instead of letting it go on without its features
(`FeaturePathLost`, raised from `on_events` and `flush`): the local broker exiting (it
keeps events, offsets and dead letters in memory, so they are gone: the message names how
many users' newest events never reached Feast and how to rebuild them from the DuckDB
record), the broker refusing deliveries, or a worker exiting (e.g. because the online store
lost its data). docs/streaming.md has the runbook.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

from kafka import KafkaConsumer, TopicPartition

from features.sequence import sequence_tokens
from features.store import wait_until_visible
from streaming.broker import start_broker
from streaming.bus import DEAD_LETTER_TOPIC
from streaming.events import DeadLetter, EventBatch
from streaming.framing import decode_dead_letter
from streaming.faust_app import STORE_LOST_EXIT
from streaming.producer import DeliveryError, KafkaEventSink
from streaming.settings import StreamSettings
from streaming.valkey import start_valkey
from streaming.worker import SHUTDOWN_TIMEOUT_EXIT, prepare_stream, spawn_worker, stop_worker

log = logging.getLogger(__name__)
EXIT_MEANINGS = {STORE_LOST_EXIT: "the online store lost its data", SHUTDOWN_TIMEOUT_EXIT: "its shutdown timed out"}


class FeaturePathLost(RuntimeError):
    """The broker or a worker is gone: features stop arriving; the message says what was lost."""


class KafkaFeaturePath:
    """Stands where the embedded FeatureUpdater stands: takes events, makes features appear in Feast."""

    def __init__(self, run_dir: Path, kafka_bootstrap: str, partitions: int, redis_url: str, workers: int,
                 max_seq_len: int, drain_timeout_s: float = 300.0, n_users: int | None = None,
                 n_tracks: int | None = None) -> None:
        self._stoppers: list = []
        self.drain_timeout_s = drain_timeout_s
        self.broker = self.valkey = None  # the servers started here, if any
        self.workers: list = []
        self.produced_events = 0
        try:
            if not kafka_bootstrap:
                self.broker = start_broker(log_path=run_dir / "tansu.log")
                self._stoppers.append(self.broker.stop)
                kafka_bootstrap = self.broker.bootstrap
            if not redis_url:
                self.valkey = start_valkey(run_dir / "valkey")
                self._stoppers.append(self.valkey.stop)
                redis_url = self.valkey.connection_url
            self.redis_url = redis_url
            self.stream = StreamSettings(bootstrap=kafka_bootstrap, partitions=partitions,
                                         feast_dir=run_dir / "feast", online_store="redis", redis_url=redis_url,
                                         max_seq_len=max_seq_len, n_users=n_users, n_tracks=n_tracks)
            prepare_stream(self.stream)
            # N sequence workers and one track-statistics worker: track writes are CPU-heavy
            # in Feast and slow sequence writes sharing their process (docs/streaming.md).
            self.workers = [spawn_worker(self.stream, run_dir / f"worker-sequences-{i}.log", role="sequences")
                            for i in range(workers)]
            if workers:
                self.workers.append(spawn_worker(self.stream, run_dir / "worker-tracks.log", role="tracks"))
            self._stoppers.append(self._stop_workers)
            self.sink = KafkaEventSink(self.stream)
        except BaseException:
            self.close()
            raise
        self.last_token_ids: dict[int, int] = {}  # user -> newest sequence-token event id produced
        self.rows_written: int | None = None  # the Faust workers write the rows; they count them, not this process

    def on_events(self, events: EventBatch) -> None:
        self.check()
        try:
            self.sink(events)
        except DeliveryError as exc:
            raise FeaturePathLost(self._loss_report(f"the broker did not take events ({exc})")) from exc
        self.produced_events += len(events)
        tokens = sequence_tokens(events)  # sorted by (user, event id): the last id per user wins
        self.last_token_ids.update(zip(tokens.user_id.tolist(), tokens.event_id.tolist()))

    def check(self) -> None:
        """Raise `FeaturePathLost` if the local broker or a worker has exited."""
        if self.broker is not None and self.broker.process.poll() is not None:
            raise FeaturePathLost(self._loss_report(
                f"the local broker (Tansu, in-memory storage) exited with code {self.broker.process.returncode}"))
        for process in self.workers:
            code = process.poll()
            if code is not None:
                meaning = EXIT_MEANINGS.get(code, "see its log")
                raise FeaturePathLost(self._loss_report(f"worker {process.pid} exited with code {code} ({meaning})"))

    def _loss_report(self, cause: str) -> str:
        """`cause`, and what it cost: users whose newest produced events are not in Feast."""
        from features.store import FeatureStoreClient

        try:
            store = FeatureStoreClient(self.stream.feast_dir, online_store="redis", redis_url=self.redis_url)
            seen = store.get_last_event_ids(list(self.last_token_ids))
            behind = sum(1 for u, last in self.last_token_ids.items() if seen[u] < last)
            missing = f"{behind:,} of {len(self.last_token_ids):,} users' newest events are not in Feast"
        except Exception as exc:  # noqa: BLE001 - the report must not hide the cause
            missing = f"Feast could not be read ({exc!r})"
        held = ("the broker's events, committed offsets and dead letters (kept in memory) are lost; "
                if self.broker is not None and self.broker.process.poll() is not None else "")
        return (f"feature path lost: {cause}. {self.produced_events:,} events were produced; {missing}; {held}"
                f"the DuckDB record keeps every event: rebuild Feast with `climber replay <run>/sandbox.duckdb "
                f"--into {self.redis_url}` (docs/streaming.md, runbook)")

    def flush_users(self, user_ids: Iterable[int]) -> None:
        """Nothing to push: the ranker reads whatever the workers have written (real freshness)."""

    def flush(self) -> None:
        """Wait until every produced event is acknowledged and visible in Feast.

        Also with workers started elsewhere (`workers=0`, docker-compose): Feast is where
        their writes show, so the wait is the same and a missing worker fails it loudly."""
        from features.store import FeatureStoreClient

        self.check()
        try:
            self.sink.flush()
        except DeliveryError as exc:
            raise FeaturePathLost(self._loss_report(f"the broker did not take events ({exc})")) from exc
        if not self.last_token_ids:
            return
        store = FeatureStoreClient(self.stream.feast_dir, online_store="redis", redis_url=self.redis_url)
        try:
            wait_until_visible(store, self.last_token_ids, timeout_s=self.drain_timeout_s, check=self.check)
        except TimeoutError as exc:
            who = (f"{len(self.workers)} worker processes started here" if self.workers else
                   "no workers started here (workers=0): are the external Faust workers running "
                   "and consuming the `events` topic?")
            raise TimeoutError(f"{exc}; {who}") from exc

    def dead_letters(self, timeout_ms: int = 1000) -> list[DeadLetter]:
        """Everything on `events.dlq` (all partitions), to be kept in DuckDB."""
        consumer = KafkaConsumer(bootstrap_servers=self.stream.bootstrap_servers, enable_auto_commit=False,
                                 auto_offset_reset="earliest", consumer_timeout_ms=timeout_ms)
        try:
            partitions = consumer.partitions_for_topic(DEAD_LETTER_TOPIC) or {0}
            consumer.assign([TopicPartition(DEAD_LETTER_TOPIC, p) for p in sorted(partitions)])
            return [decode_dead_letter(record.value) for record in consumer]
        finally:
            consumer.close()

    def _stop_workers(self) -> None:
        for process in self.workers:
            code = stop_worker(process)
            if code not in (0, -15):
                log.warning("worker %s exited with %s", process.pid, code)

    def wait(self) -> None:
        """Part of the feature-path interface; producing is asynchronous until `flush`."""

    def close(self) -> None:
        sink = getattr(self, "sink", None)
        if sink is not None:
            sink.close()
            self.sink = None
        while self._stoppers:
            stop = self._stoppers.pop()
            try:
                stop()
            except Exception:  # keep stopping the rest
                log.exception("stopping %s failed", stop)

