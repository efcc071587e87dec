"""The embedded default's event bus: topics in one process, delivered synchronously.

Same topic names as Kafka so the wiring reads the same on both transports. Delivery is
synchronous and in publish order, which keeps the embedded loop deterministic (same seed,
same event log) and free of queues that could silently drop anything.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

EVENTS_TOPIC = "events"
DEAD_LETTER_TOPIC = "events.dlq"

Handler = Callable[[Any], None]


class InProcessBus:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self.published: dict[str, int] = defaultdict(int)  # messages (batches) per topic

    def subscribe(self, topic: str, handler: Handler) -> None:
        self._handlers[topic].append(handler)

    def publish(self, topic: str, message: Any) -> None:
        self.published[topic] += 1
        for handler in self._handlers[topic]:
            handler(message)
