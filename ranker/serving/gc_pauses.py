"""Python's cyclic garbage collector's pauses, timed with `gc.callbacks`.

A collection stops every coroutine of the process, so in a server (and in a load generator)
it shows up as a latency spike for every request alive at that moment. This records each
collection's duration by generation, and keeps a running total, so a request can be told
how much of its life was spent in collections: read `total_s` when it starts and when it
ends (`GcPauses.total_s` only grows). Cheap: two clock reads and a few additions per
collection.

    pauses = GcPauses().install()
    ...
    pauses.summary()   # {"collections": {0: .., 1: .., 2: ..}, "seconds": {...}, "max_ms": ..}
    pauses.uninstall()
"""

from __future__ import annotations

import gc
import time


class GcPauses:
    """Collections and their pause times, per generation, from `install()` on."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_s = 0.0
        self.total_s = 0.0  # all generations; only grows, so two reads bracket a request
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.seconds[generation] += pause
        self.total_s += pause
        self.max_s = max(self.max_s, pause)

    def reset(self) -> None:
        """Forget what was recorded (e.g. the full collection a server runs before it freezes)."""
        self.collections, self.seconds, self.max_s, self.total_s = [0, 0, 0], [0.0, 0.0, 0.0], 0.0, 0.0

    def install(self) -> "GcPauses":
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {"collections": dict(enumerate(self.collections)), "seconds": dict(enumerate(self.seconds)),
                "total_s": self.total_s, "max_ms": 1e3 * self.max_s}
