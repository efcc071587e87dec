"""Kafka topics of the streaming path and how events are spread over their partitions.

- `events`: the simulator's events, partitioned by user so that one worker owns a user and
  sees that user's events in order (the sequences' high-water mark depends on it).
- `events.dlq`: rejected input, verbatim, with the reason (`streaming.framing.encode_dead_letter`).
- `events.by_track`: the valid events again, partitioned by track, so that one worker owns
  each track's statistics row (Faust's `group_by`, done once per batch instead of per event).

Partition of a user (or track) = id mod partitions. All producers must agree on it, so it is
computed here and passed to Kafka explicitly instead of leaving it to a client's key hash.
So the key is free: a message framed per user is keyed by the user id, for tools that read
the topic; one framed per partition holds many users and has none (`streaming.framing`).
"""

from __future__ import annotations

import numpy as np
from kafka.admin import KafkaAdminClient

from streaming.bus import DEAD_LETTER_TOPIC, EVENTS_TOPIC

TRACK_EVENTS_TOPIC = "events.by_track"


def topic_partitions(partitions: int) -> dict[str, int]:
    """Topic name -> partition count. The dead-letter topic needs no parallelism."""
    return {EVENTS_TOPIC: partitions, TRACK_EVENTS_TOPIC: partitions, DEAD_LETTER_TOPIC: 1}


def partition_of(ids: np.ndarray, partitions: int) -> np.ndarray:
    return np.asarray(ids, np.int64) % partitions


def create_topics(bootstrap: str | list[str], partitions: int = 4, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; return the names created.

    An existing topic with a different partition count is an error: adding partitions would
    move users to other partitions mid-stream (and Tansu cannot add partitions anyway).
    """
    wanted = topic_partitions(partitions)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = {t["name"]: len(t["partitions"]) for t in admin.describe_topics() if not t.get("error_code")}
        for name, count in wanted.items():
            if name in existing and existing[name] != count:
                raise ValueError(
                    f"topic {name!r} exists with {existing[name]} partitions, expected {count}; "
                    "delete it or set partitions to match"
                )
        missing = {name: {"num_partitions": count, "replication_factor": 1}
                   for name, count in wanted.items() if name not in existing}
        if missing:
            admin.create_topics(missing, timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
        return sorted(missing)
    finally:
        admin.close()
