"""The Faust app: `sequence_builder` and `track_stats` agents between Kafka and Feast.

sequence_builder, on `events` (partitioned by user), per micro-batch:
  1. decode each message's JSON lines; invalid lines, null values (tombstones) and events
     outside the plausibility bounds (`streaming.plausibility`) -> `events.dlq` with the reason;
  2. apply the valid events to the owned users' sequences and write them to Feast
     (`streaming.online_state.SequenceState`: the online store is the state);
  3. forward the valid events, packed, to `events.by_track` (partitioned by track);
  4. wait until 1 and 3 are acknowledged by the broker, then ack the batch's messages, so
     Faust commits their offsets only after everything they caused is stored.
track_stats, on `events.by_track`: applies batches to `TrackStatsState` in memory; a timer
  writes the changed rows every `track_flush_ms` and then acks the messages they came from.

Batches come from `stream.noack_take`, not `stream.take`: `take` acks a batch in a
`finally`, i.e. also when the body fails or the worker is stopping mid-write, which would
commit offsets whose effects were never stored. Here nothing is acked unless written.
The agents never crash on input: every bad message ends in `events.dlq`. A failing store
write is retried with backoff until it succeeds or the worker stops (unacked, so redone);
each outage is logged, and a store that lost its data stops the worker (`FeatureLane`).
Writes are fenced against a worker that lost its partitions without noticing (paused past
a rebalance): sequence rows by compare-and-set on their high-water mark
(`SequenceState`), track rows by a generation token per partition claimed on assignment.
Track counts are exactly-once: each row carries per `events` partition the highest event id
it counts, so an event forwarded or consumed again is skipped (`TrackStatsState`).

Feast calls block; they run on `FeatureLane` threads. A worker runs both agents or, for the
best sequence freshness, one of them (`role`, see `create_app`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Literal, TypeVar

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from features.redis_rows import StoreLostError
from features.store import FeatureStoreClient
from streaming.bus import DEAD_LETTER_TOPIC, EVENTS_TOPIC
from streaming.events import DeadLetter, EventBatch
from streaming.framing import (decode_event_messages, encode_dead_letter, pack_track_events,
                               unpack_track_events)
from streaming.online_state import SequenceState, TrackStatsState
from streaming.plausibility import PlausibilityGate, stored_reference
from streaming.settings import StreamSettings
from streaming.topics import TRACK_EVENTS_TOPIC

log = logging.getLogger("streaming.worker")
T = TypeVar("T")
Role = Literal["all", "sequences", "tracks"]
STORE_LOST_EXIT = 3  # a worker's exit code when the online store lost its data


class FeatureLane:
    """A Feast client and the one thread that uses it.

    Feast calls block, so they run off the event loop, which keeps fetching and
    heartbeating meanwhile; one thread per lane keeps a lane's calls in order. Sequences and
    track statistics get a lane each so a sequence write never queues behind a track flush
    (they still share the GIL: see `create_app` for running them in separate processes).
    """

    def __init__(self, settings: StreamSettings, name: str) -> None:
        self.name = name
        self.store = FeatureStoreClient(settings.feast_dir, settings.online_store, settings.redis_url)
        self.store.guard_store_loss = True  # refuse to write onto a store that lost its data
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"feast-{name}")

    async def call(self, fn: Callable[..., T], *args) -> T:
        """Run `fn` on the lane's thread, retrying failures with backoff (they are store
        outages: the events were validated) until it succeeds or the task is cancelled.

        Every outage is logged when it starts and when it ends. A store that lost its data
        (`StoreLostError`: the marker set when the store was prepared is gone) stops the
        worker with `STORE_LOST_EXIT`: nothing it has not written is acknowledged, and
        writing on would leave every user it does not touch again missing."""
        loop = asyncio.get_running_loop()
        delay, failures, since = 0.1, 0, 0.0
        while True:
            try:
                result = await loop.run_in_executor(self._thread, fn, *args)
            except StoreLostError as exc:
                log.critical("feature store lost its data: %s. Stopping this worker (exit %d); nothing "
                             "unwritten was acknowledged.", exc, STORE_LOST_EXIT)
                logging.shutdown()
                os._exit(STORE_LOST_EXIT)
            except Exception as exc:  # noqa: BLE001 - any store failure is retried
                if not failures:
                    since = time.monotonic()
                    log.error("feature store outage (%s lane): %s failed with %r; retrying", self.name,
                              fn.__name__, exc)
                else:
                    log.warning("feature store still failing (%s lane, %.1f s): %r; retrying in %.1f s",
                                self.name, time.monotonic() - since, exc, delay)
                failures += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            else:
                if failures:
                    log.warning("feature store back (%s lane) after %.1f s and %d failed calls", self.name,
                              time.monotonic() - since, failures)
                return result


def short_fetch_transport(app: faust.App, fetch_max_wait_ms: int) -> faust_aiokafka.Transport:
    """Faust's aiokafka transport with a shorter fetch wait than its hard-coded 1,500 ms.

    Apache Kafka answers a waiting fetch as soon as data arrives, so the wait only matters
    on an idle topic. Tansu holds the fetch for the whole wait (measured: a lone event took
    100-730 ms to arrive with 1,500, 1-10 ms with 50), which would dominate freshness.
    aiokafka reads the setting when the consumer starts, after this hook has set it.
    """

    class ShortFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport):
            consumer = super()._create_worker_consumer(transport)
            consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

    class ShortFetchConsumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self):
            return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    class ShortFetchTransport(faust_aiokafka.Transport):
        Consumer = ShortFetchConsumer

    return ShortFetchTransport(app.conf.broker_consumer, app)


def _source(event) -> str:
    return f"{event.message.tp.topic}[{event.message.tp.partition}]@{event.message.offset}"


def new_app(settings: StreamSettings, name: str) -> faust.App:
    """A Faust app (consumer group `name`) configured from `settings`, with no agents yet:
    what every worker role, and the drain benchmark's ack-only worker, is built on."""
    app = faust.App(
        name,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        store="memory://",  # no tables: the state lives in Feast
        datadir=str(settings.faust_dir),
        web_enabled=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=settings.commit_interval_ms / 1000,
        broker_session_timeout=settings.session_timeout_ms / 1000,
        broker_heartbeat_interval=max(0.2, settings.session_timeout_ms / 1000 / 5),
        broker_max_poll_records=max(settings.batch_messages, 500),
        stream_buffer_maxsize=4 * settings.batch_messages,
        producer_acks=-1,
        producer_linger_ms=1,
        value_serializer="raw",
        key_serializer="raw",
    )
    app.transport = short_fetch_transport(app, settings.fetch_max_wait_ms)
    return app


def create_app(settings: StreamSettings, role: Role = "all") -> faust.App:
    """A Faust app running both agents ("all") or one of them.

    A track flush rewrites every track touched since the last one (16,000+ rows at 10,000+
    events/s) and holds the GIL meanwhile, delaying the sequence writes that share the
    process. A "sequences" worker plus a separate "tracks" worker keep them
    apart. Each role is its own consumer group; do not mix "all" with the others.
    """
    app = new_app(settings, settings.app_id if role == "all" else f"{settings.app_id}-{role}")
    dlq_topic = app.topic(DEAD_LETTER_TOPIC, partitions=1)

    async def send_dead_letters(letters: list[DeadLetter]) -> list:
        return [await dlq_topic.send(value=encode_dead_letter(letter)) for letter in letters]

    forgets = []  # drop the sequence cache after a rebalance (track_stats handles its own)
    if role in ("all", "sequences"):
        forgets.append(_add_sequence_builder(app, settings, send_dead_letters))
    if role in ("all", "tracks"):
        _add_track_stats(app, settings, send_dead_letters)
    input_topic = TRACK_EVENTS_TOPIC if role == "tracks" else EVENTS_TOPIC

    # The caches are valid only while this worker is the rows' single writer.
    @app.on_partitions_revoked.connect
    async def on_revoked(app, revoked, **kwargs) -> None:
        for forget in forgets:
            await forget()

    @app.on_partitions_assigned.connect
    async def on_assigned(app, assigned, **kwargs) -> None:
        for forget in forgets:
            await forget()
        mine = sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned if tp.topic == input_topic)
        log.info("climber worker (%s) assigned %s", role, ", ".join(mine) or "nothing")
        if settings.ready_file is not None:
            settings.ready_file.parent.mkdir(parents=True, exist_ok=True)
            settings.ready_file.write_text(f"{role}: {', '.join(mine) or 'nothing'}\n")

    return app


def _add_sequence_builder(app: faust.App, settings: StreamSettings, send_dead_letters) -> Callable:
    lane = FeatureLane(settings, "sequences")
    sequences = SequenceState(lane.store, settings.max_seq_len)
    gate = PlausibilityGate(settings.event_bounds())
    track_topic = app.topic(TRACK_EVENTS_TOPIC, partitions=settings.partitions)

    @app.agent(app.topic(EVENTS_TOPIC, partitions=settings.partitions), name="sequence_builder")
    async def sequence_builder(stream):
        async for events in stream.noack_take(settings.batch_messages, within=settings.batch_ms / 1000):
            received = int(time.time() * 1000)
            batch, dead = decode_event_messages([e.value for e in events], map(_source, events), received)
            if gate.needs_reference and len(batch):  # a fresh worker: judge its first batch by the store
                gate.seed(*await lane.call(stored_reference, lane.store, batch))
            batch, implausible = gate.check(batch, f"{_source(events[0])}..{_source(events[-1])}", received,
                                            remember=False)
            dead += implausible
            pending = await send_dead_letters(dead)
            if len(batch):
                await lane.call(sequences.apply, batch)
                for partition, packed in pack_track_events(batch, settings.partitions):
                    pending.append(await track_topic.send(value=packed, partition=partition))
            await asyncio.gather(*pending)  # delivered (raises if not: nothing gets acked)
            gate.remember(batch)
            for event in events:
                await stream.ack(event)

    async def forget() -> None:
        gate.forget_repeats()  # the partitions, and so the ids to compare with, may have changed
        await lane.call(sequences.forget)  # queued behind any write in flight

    return forget


def _add_track_stats(app: faust.App, settings: StreamSettings, send_dead_letters) -> None:
    """track_stats applies each batch in memory and writes on a timer; a message is acked
    once a flush has written what it changed.

    The cache is dropped on every rebalance (another worker may have written its rows) and
    the partitions' tokens claimed anew, both before any batch of the new assignment is
    applied (`claimed`): a batch applied first would be dropped with the cache while its
    messages stay queued for the next flush, which would ack them unwritten."""
    lane = FeatureLane(settings, "tracks")
    tracks = TrackStatsState(lane.store, source_partitions=settings.partitions)  # exactly-once counts
    unflushed: list = []  # (stream, event) applied but not yet written
    flush_lock = asyncio.Lock()
    claimed = asyncio.Event()  # set once the cache is fresh and `owners` holds this assignment's claims

    @app.agent(app.topic(TRACK_EVENTS_TOPIC, partitions=settings.partitions), name="track_stats")
    async def track_stats(stream):
        async for events in stream.noack_take(settings.batch_messages, within=settings.batch_ms / 1000):
            batches, dead = [], []
            for event in events:
                try:
                    batches.append(unpack_track_events([event.value]))
                except ValueError as exc:
                    dead.append(DeadLetter(repr((event.value or b"")[:256]), str(exc), _source(event),
                                           int(time.time() * 1000)))
            pending = await send_dead_letters(dead)
            batch = EventBatch.concat(batches)
            await claimed.wait()
            if len(batch):
                await lane.call(tracks.add, batch)
            await asyncio.gather(*pending)
            unflushed.extend((stream, event) for event in events)

    # Generation tokens of the owned `events.by_track` partitions (Redis): a flush writes a
    # partition's rows only while its token is the newest claim, so a worker paused past a
    # rebalance cannot overwrite the counts of the partition's new owner.
    owners: dict[int, bytes | None] = {}

    # Faust sends the revoke signal after every message in flight was acked (its
    # `wait_empty`), so nothing applied is unflushed here, and the assignment's first batch
    # waits for `claim`.
    @app.on_partitions_revoked.connect
    async def release(app, revoked, **kwargs) -> None:
        claimed.clear()
        owners.clear()
        await forget()

    @app.on_partitions_assigned.connect
    async def claim(app, assigned, **kwargs) -> None:
        claimed.clear()
        owners.clear()
        await forget()
        for partition in sorted(tp.partition for tp in assigned if tp.topic == TRACK_EVENTS_TOPIC):
            owners[partition] = await lane.call(lane.store.claim_owner, f"tracks:{partition}")
        claimed.set()

    async def forget() -> None:
        """Drop the cache. Anything applied but unflushed would be dropped with it and
        must not be acked as written: left unacked, it is consumed again after the next
        rebalance or restart (the marks skip what was counted), and this is logged."""
        async with flush_lock:
            await lane.call(tracks.forget)
            if unflushed:
                log.error("track cache dropped with %d applied but unflushed messages (%s); they are not acked "
                          "and will be consumed again after the next rebalance or restart", len(unflushed),
                          _source(unflushed[0][1]))
                unflushed.clear()

    @app.timer(interval=settings.track_flush_ms / 1000)
    async def flush_track_stats() -> None:
        async with flush_lock:
            if not unflushed:
                return
            written = list(unflushed)  # everything applied so far is in this flush
            unflushed.clear()
            refused = []
            if settings.online_store == "redis":
                refused = await lane.call(tracks.flush_owned, dict(owners), settings.partitions)
            else:  # SQLite: one writer process, nothing to fence
                await lane.call(tracks.flush)
            if refused:
                log.warning("track flush refused for partitions %s: another worker owns them now (this one was "
                            "paused or cut off past a rebalance); their events are left to it", refused)
            # Refused events are acked too: Faust hands partitions over only once every event
            # in flight is acked. The new owner consumes them from the last commit (this
            # worker never committed them), and the group refuses this stale member's commits.
            for stream, event in written:
                await stream.ack(event)
