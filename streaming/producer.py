"""The simulator's Kafka sink: EventBatch in, messages on `events`, nothing lost quietly.

kafka-python does the batching (linger, batch size), compression and idempotence (so its
own retries neither duplicate nor reorder a partition's messages). What it does not do in
version 3 is bound its buffer, so the sink does: past `max_pending_events` unacknowledged
events a call blocks until the broker catches up, which slows the simulator instead of
growing memory or dropping events. A message that still fails after the client's retries
(`delivery_timeout_ms`) is not dropped silently: the next call, `flush()` or `close()`
raises `DeliveryError` naming how many events failed and the first error.

Framing and coalescing: each message costs the producer and every Faust worker a fixed
amount of CPU (measured by `bench.stream_drain`: Faust alone takes about 200 µs to
consume and ack a message), so the sink frames a partition's events together by default
(`framing`, see `streaming.framing`), and holds batches for up to `coalesce_ms` (or
`coalesce_events`) so that consecutive simulator steps share messages. It holds only
while batches come faster than that: a batch that follows the previous one by
`coalesce_ms` or more is sent at once, since at that pace nothing would join it in time
and holding it would only delay it (a live simulator at 10,000 events/s hands over a
step every 40 ms). A timer thread
sends what has waited `coalesce_ms` when no new batch comes; the wait counts in the
stream benchmark's freshness, which is timed from the call. `coalesce_ms=0` sends each
batch at once. One lock covers framing and sending, so a user's events keep their order.
"""

from __future__ import annotations

import threading
import time

from kafka import KafkaProducer

from streaming.bus import EVENTS_TOPIC
from streaming.events import EventBatch
from streaming.framing import encode_event_messages
from streaming.settings import StreamSettings


class DeliveryError(RuntimeError):
    """Events the broker did not acknowledge within the delivery timeout."""


class KafkaEventSink:
    """`Callable[[EventBatch], None]` for `MusicPlatform(sink=...)`."""

    def __init__(self, settings: StreamSettings, topic: str = EVENTS_TOPIC) -> None:
        self.settings = settings
        self.topic = topic
        self._producer = KafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            enable_idempotence=True,
            acks="all",
            linger_ms=settings.linger_ms,
            batch_size=settings.producer_batch_bytes,
            compression_type=None if settings.compression == "none" else settings.compression,
            delivery_timeout_ms=settings.delivery_timeout_ms,
            request_timeout_ms=settings.request_timeout_ms,
            max_request_size=4 * 1024 * 1024,
        )
        self._progress = threading.Condition()
        self.sent_events = 0
        self.sent_messages = 0
        self.acked_events = 0
        self.failed_events = 0
        self._first_error: BaseException | None = None
        # Batches waiting to be framed, and when the oldest arrived.
        self._held: list[EventBatch] = []
        self._held_events = 0
        self._held_since = 0.0
        self._last_call = time.monotonic()  # when a batch last came (creation counts)
        self._send_lock = threading.Condition()
        self._closed = False
        self._timer = None
        if settings.coalesce_ms > 0:
            self._timer = threading.Thread(target=self._send_when_due, name="sink-coalesce", daemon=True)
            self._timer.start()

    def __call__(self, batch: EventBatch) -> None:
        self._raise_failures()
        if len(batch) == 0:
            return
        with self._send_lock:
            if self._closed:
                raise RuntimeError("KafkaEventSink is closed")
            now, window_s = time.monotonic(), self.settings.coalesce_ms / 1000
            after_a_pause, self._last_call = now - self._last_call >= window_s, now
            if not self._held:
                self._held_since = now
                self._send_lock.notify()  # the timer now has a deadline to keep
            self._held.append(batch)
            self._held_events += len(batch)
            # With no window every call comes "after a pause", so it sends at once.
            if (after_a_pause or self._held_events >= self.settings.coalesce_events
                    or now - self._held_since >= window_s):
                self._send_held()
        self._wait_until_pending_at_most(self.settings.max_pending_events)

    def _send_held(self) -> None:
        """Frame and send the held batches (caller holds `_send_lock`)."""
        if not self._held:
            return
        batch = self._held[0] if len(self._held) == 1 else EventBatch.concat(self._held)
        self._held, self._held_events = [], 0
        sent = 0
        try:
            messages = encode_event_messages(batch, self.settings.partitions, self.settings.events_per_message,
                                             self.settings.framing)
            for partition, key, value in messages:
                n_events = value.count(b"\n") + 1
                future = self._producer.send(self.topic, value=value, key=key, partition=partition)
                future.add_callback(self._on_delivered, n_events)
                future.add_errback(self._on_failed, n_events)
                self.sent_events += n_events  # written only under `_send_lock`
                sent += n_events
                self.sent_messages += 1
        except Exception as exc:
            self.sent_events += len(batch) - sent  # the rest were handed over and failed: say so
            self._on_failed(len(batch) - sent, exc)
            raise

    def _send_when_due(self) -> None:
        """Timer thread: send held batches once the oldest has waited `coalesce_ms`."""
        wait_s = self.settings.coalesce_ms / 1000
        with self._send_lock:
            while not self._closed:
                if not self._held:
                    self._send_lock.wait()
                    continue
                left = self._held_since + wait_s - time.monotonic()
                if left > 0:
                    self._send_lock.wait(left)
                    continue
                try:
                    self._send_held()
                except Exception:  # noqa: BLE001 - recorded: the next call, flush or close raises it
                    pass

    @property
    def pending_events(self) -> int:
        """Events handed to the sink and not yet acknowledged (held ones included)."""
        return self.sent_events + self._held_events - self.acked_events - self.failed_events

    def flush(self, timeout_s: float | None = None) -> None:
        """Block until every event handed over so far is acknowledged; raise if any failed."""
        with self._send_lock:
            self._send_held()
        self._producer.flush(timeout=timeout_s)
        self._wait_until_pending_at_most(0, timeout_s)
        self._raise_failures()

    def close(self, timeout_s: float | None = None) -> None:
        try:
            self.flush(timeout_s)
        finally:
            with self._send_lock:
                self._closed = True
                self._send_lock.notify_all()
            if self._timer is not None:
                self._timer.join()
            self._producer.close(timeout=timeout_s)

    def __enter__(self) -> "KafkaEventSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Callbacks run on the producer's I/O thread.
    def _on_delivered(self, n_events: int, _metadata) -> None:
        with self._progress:
            self.acked_events += n_events
            self._progress.notify_all()

    def _on_failed(self, n_events: int, error: BaseException) -> None:
        with self._progress:
            self.failed_events += n_events
            self._first_error = self._first_error or error
            self._progress.notify_all()

    def _wait_until_pending_at_most(self, limit: int, timeout_s: float | None = None) -> None:
        # Acknowledgements also stop when delivery fails for good; the client's delivery
        # timeout bounds that, so waiting a little longer than it cannot hang forever.
        timeout_s = timeout_s if timeout_s is not None else self.settings.delivery_timeout_ms / 1000 + 30
        deadline = time.monotonic() + timeout_s
        with self._progress:
            while self.pending_events > limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeliveryError(f"{self.pending_events} events still unacknowledged after {timeout_s:.0f} s")
                self._progress.wait(min(left, 1.0))

    def _raise_failures(self) -> None:
        if self.failed_events:
            raise DeliveryError(
                f"{self.failed_events} of {self.sent_events} events were not delivered to "
                f"{self.topic!r}: {self._first_error!r}"
            )
