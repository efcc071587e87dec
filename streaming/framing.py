"""How events are framed into Kafka messages, and back.

`events` messages: JSON lines, each line one wire event exactly as
`streaming.events.encode_event` writes it. Every event goes to its user's partition
(`streaming.topics.partition_of`), and a user's events keep their order, whatever the framing:
- "partition" (the default): one message holds the events of many users of one partition,
  in the order they were handed over, up to `events_per_message`; it has no key, because
  it belongs to no single user;
- "user": one message holds one user's events, keyed by the user id, for tools that want
  a key per user. A producer that sends one JSON event per message is understood too.
Why several events per message: Faust handles each message through several event-loop
steps (about 200 µs of CPU to consume and ack one, `bench.stream_drain`), so one event
per message caps a worker near 5,000 events/s, and the kafka-python producer near 25,000
messages/s. A simulator step emits a few events per user (impressions and reactions to
one slate), so framing per user leaves about 4.5 events per message when the sink sends
every step on its own; framing per partition, a few hundred.
Each line is validated on its own: a bad line becomes a dead letter, its neighbours go on.

`events.by_track` messages: many events packed as a numpy record array (the columns that
track statistics need), one message per destination partition and worker batch. They never
leave the pipeline, so no JSON.

`events.dlq` messages: a JSON object {payload, reason, source, received_ts}.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Iterable, Literal

import msgspec
import numpy as np

from streaming.events import DeadLetter, EventBatch, decode_events
from streaming.topics import partition_of

# -- events -------------------------------------------------------------------------------

Framing = Literal["partition", "user"]


def encode_event_messages(batch: EventBatch, partitions: int, events_per_message: int,
                          framing: Framing = "partition") -> list[tuple[int, bytes | None, bytes]]:
    """(partition, key, value) messages for a batch, framed as `framing` says."""
    if framing == "user":
        return encode_user_messages(batch, partitions, events_per_message)
    if framing == "partition":
        return encode_partition_messages(batch, partitions, events_per_message)
    raise ValueError(f"unknown framing {framing!r}: expected 'partition' or 'user'")


def encode_partition_messages(batch: EventBatch, partitions: int, events_per_message: int
                              ) -> list[tuple[int, None, bytes]]:
    """(partition, None, value) messages for a batch: each partition's events in batch
    order, cut every `events_per_message`. A user's events stay in order because they all
    go to one partition and a partition's messages are read in order."""
    if len(batch) == 0:
        return []
    lines = batch.encode_json()
    destination = partition_of(batch.user_id, partitions)
    order = np.argsort(destination, kind="stable").tolist()
    counts = np.bincount(destination, minlength=partitions).tolist()
    messages, start = [], 0
    for partition, count in enumerate(counts):
        for cut in range(start, start + count, events_per_message):
            end = min(cut + events_per_message, start + count)
            messages.append((partition, None, b"\n".join(lines[j] for j in order[cut:end])))
        start += count
    return messages


def encode_user_messages(batch: EventBatch, partitions: int, events_per_message: int
                         ) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) messages for a batch: events grouped by user, in batch order
    within a user, at most `events_per_message` per message."""
    if len(batch) == 0:
        return []
    lines = batch.encode_json()
    order = np.argsort(batch.user_id, kind="stable")
    users = batch.user_id[order]
    # A new message starts where the user changes or a message is full.
    run_start = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    position_in_run = np.arange(len(users)) - np.repeat(run_start, np.diff(np.r_[run_start, len(users)]))
    starts = np.flatnonzero(position_in_run % events_per_message == 0)
    ends = np.r_[starts[1:], len(users)]
    order_list = order.tolist()
    partition = partition_of(users[starts], partitions).tolist()
    messages = []
    for i, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        value = b"\n".join(lines[j] for j in order_list[start:end])
        messages.append((partition[i], str(int(users[start])).encode(), value))
    return messages


NULL_VALUE = "null value: a message on events must hold JSON event lines (a tombstone holds none)"


def decode_event_messages(values: Iterable[bytes | None], sources: Iterable[str], received_ts: int = 0
                         ) -> tuple[EventBatch, list[DeadLetter]]:
    """Valid events of many messages as one batch (in message order), and the dead letters.
    `sources` names each message (e.g. "events[2]@1234") for the dead letters. A message
    with no value (a tombstone) is a dead letter of its own; the others go on."""
    values, sources = list(values), list(sources)
    nulls = [DeadLetter("", NULL_VALUE, source, received_ts) for value, source in zip(values, sources)
             if value is None]
    if nulls:
        kept = [(value, source) for value, source in zip(values, sources) if value is not None]
        values, sources = [value for value, _ in kept], [source for _, source in kept]
    good, dead = decode_events([line for value in values for line in value.split(b"\n")], received_ts=received_ts)
    if dead:  # rare: decode again per message to say which message each came from
        dead = [letter for value, source in zip(values, sources)
                for letter in decode_events(value.split(b"\n"), source, received_ts)[1]]
    return good, nulls + dead


# -- dead letters -------------------------------------------------------------------------

_json = msgspec.json.Encoder()


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return _json.encode(asdict(letter))


def decode_dead_letter(value: bytes | None) -> DeadLetter:
    if value is None:  # a tombstone on the dead-letter topic: kept, and says what it was
        return DeadLetter("", "null value on events.dlq")
    return DeadLetter(**msgspec.json.decode(value))


# -- events.by_track ----------------------------------------------------------------------

TRACK_EVENT_DTYPE = np.dtype([
    ("event_id", "<i8"), ("ts", "<i8"), ("user_id", "<i8"), ("track_id", "<i8"),
    ("scenario", "i1"), ("behaviour", "i1"),
])


def pack_track_events(batch: EventBatch, partitions: int) -> list[tuple[int, bytes]]:
    """(partition, packed events) per destination partition of `events.by_track`."""
    records = np.empty(len(batch), TRACK_EVENT_DTYPE)
    for name in TRACK_EVENT_DTYPE.names:
        records[name] = getattr(batch, name)
    destination = partition_of(batch.track_id, partitions)
    return [(p, records[destination == p].tobytes()) for p in np.unique(destination).tolist()]


def unpack_track_events(values: Iterable[bytes]) -> EventBatch:
    values = list(values)
    if not values:
        return EventBatch.empty()
    for value in values:
        if value is None:
            raise ValueError("null value: a message on events.by_track must hold packed events")
        if len(value) % TRACK_EVENT_DTYPE.itemsize:
            raise ValueError(f"events.by_track message of {len(value)} bytes is not a whole number "
                             f"of {TRACK_EVENT_DTYPE.itemsize}-byte records")
    records = np.frombuffer(b"".join(values), TRACK_EVENT_DTYPE)
    return EventBatch.from_columns(**{name: records[name] for name in TRACK_EVENT_DTYPE.names})
