"""A lean HTTP load generator for the ranking service: closed loop and open loop (Poisson).

Why not httpx: on the 2-core machine the load generator shares the cores with the server,
and an httpx AsyncClient spent about 3.4 ms of CPU per request at 32 clients (building the
body from numpy, encoding JSON, its connection pool, decoding the reply), about as much as
the server's model time per request. This client keeps one HTTP/1.1 keep-alive connection
per client over asyncio streams, sends request bodies encoded once up front, and reads
only the reply's `timing_ms`: about 0.1 ms of CPU per request.

    bodies = request_bodies(users=200, n_candidates=200, seed=1)
    run = run_async(closed_loop("127.0.0.1", port, clients=32, seconds=15, bodies=bodies))
    run = run_async(open_loop("127.0.0.1", port, rate=100, connections=32, seconds=10, bodies=bodies))
    summary(run)  # requests/s, p50/p90/p99/max latency, the server's own total per request

Open loop: arrivals follow a Poisson process at `rate`, whatever the replies do. Each
latency runs from the request's scheduled arrival, so time spent waiting for a free
connection counts (no coordinated omission). Either loop holds this process's garbage
collector off while it runs (`gc_held`), so a pause of the generator is not read as the
server's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Iterator, TypeVar

import numpy as np
import orjson

from bench.common import process_cpu_seconds  # noqa: F401 - part of this module's interface
from ranker.serving.gc_pauses import GcPauses

T = TypeVar("T")


def request_bodies(users: int, n_candidates: int, seed: int, n_tracks: int = 50_000, count: int = 512,
                   scenario: str = "home_feed") -> list[bytes]:
    """`count` /rank bodies (random user of `users`, `n_candidates` random tracks), JSON-encoded once."""
    rng = np.random.default_rng(seed)
    return [orjson.dumps({"user_id": int(rng.integers(users)), "scenario": scenario,
                          "candidates": rng.integers(0, n_tracks, n_candidates).tolist()}) for _ in range(count)]


class HttpConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON to /rank, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> "HttpConnection":
        return cls(*await asyncio.open_connection(host, port))

    async def post(self, body: bytes, path: bytes = b"/rank") -> bytes:
        """The reply body; a RuntimeError for any status but 200."""
        self.writer.write(b"POST %s HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (path, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        reply = await self.reader.readexactly(length)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"/rank answered {status}: {reply[:300]!r}")
        return reply

    def close(self) -> None:
        self.writer.close()


@dataclass
class LoadRun:
    latencies: list[float] = field(default_factory=list)  # seconds, client side
    server_ms: list[float] = field(default_factory=list)  # the server's timing_ms.total_ms
    wall: float = 0.0
    offered_rate: float | None = None  # open loop only
    waited_for_connection: int = 0  # open loop: arrivals that found every connection busy
    # open loop with trace=True, one per request: perf_counter seconds when it was scheduled,
    # sent and answered, the client's GC pause seconds meanwhile, and the server's reply trace
    traces: list[dict] | None = None
    client_gc: dict | None = None  # the load generator's GC pauses over the run (GcPauses.summary)


@contextlib.contextmanager
def gc_held() -> Iterator[None]:
    """The load generator's cyclic GC held off for a run: everything alive is frozen (never
    scanned) and collection is disabled until the run ends, then both are undone.

    Why: the generator runs in the bench process, which holds torch and the in-process
    model, and an open loop keeps every arrival's task until the run ends, so a run can set
    off a full collection of that heap: 604 ms on the loaded box (one, at 75% of the
    ceiling), during which no request is sent or read, and each one's latency counts from
    its scheduled arrival. A pause of the measuring process is not the server's tail. A
    run's garbage is freed by reference counting; what only the cyclic GC frees waits for
    the end of the run."""
    enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()


def _record(run: LoadRun, reply: bytes, latency: float) -> dict:
    parsed = orjson.loads(reply)
    run.latencies.append(latency)
    run.server_ms.append(parsed["timing_ms"]["total_ms"])
    return parsed


async def closed_loop(host: str, port: int, clients: int, seconds: float, bodies: list[bytes],
                      hold_gc: bool = True) -> LoadRun:
    """`clients` connections, each sending its next request as soon as the last one answers;
    this process's GC held off meanwhile (`gc_held`) unless `hold_gc` is False."""
    connections = [await HttpConnection.open(host, port) for _ in range(clients)]
    run = LoadRun()
    deadline = time.perf_counter() + seconds

    async def client(index: int, connection: HttpConnection) -> None:
        k = index
        while time.perf_counter() < deadline:
            body = bodies[k % len(bodies)]
            k += clients
            start = time.perf_counter()
            reply = await connection.post(body)
            _record(run, reply, time.perf_counter() - start)

    start = time.perf_counter()
    try:
        with gc_held() if hold_gc else contextlib.nullcontext():
            await asyncio.gather(*(client(i, c) for i, c in enumerate(connections)))
    finally:
        for connection in connections:
            connection.close()
    run.wall = time.perf_counter() - start
    return run


async def open_loop(host: str, port: int, rate: float, connections: int, seconds: float, bodies: list[bytes],
                    seed: int = 0, trace: bool = False, hold_gc: bool = True) -> LoadRun:
    """Poisson arrivals at `rate` per second for `seconds`, over a pool of `connections`; this
    process's GC held off meanwhile (`gc_held`) unless `hold_gc` is False.

    `trace`: also keep each request's timestamps and the server's reply trace (a server
    started with `trace`), and time this process's GC pauses (`LoadRun.traces`)."""
    pool: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(connections):
        pool.put_nowait(await HttpConnection.open(host, port))
    run = LoadRun(offered_rate=rate, traces=[] if trace else None)
    pauses = GcPauses() if trace else None
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=int(rate * seconds * 2) + 16)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]

    async def one(k: int, scheduled: float) -> None:
        if pool.empty():
            run.waited_for_connection += 1
        gc_at_start = pauses.total_s if pauses else 0.0
        connection = await pool.get()
        try:
            sent = time.perf_counter()
            reply = await connection.post(bodies[k % len(bodies)])
            done = time.perf_counter()
            parsed = _record(run, reply, done - scheduled)  # from the scheduled time: no coordinated omission
            if pauses:
                run.traces.append({"scheduled": scheduled, "sent": sent, "done": done,
                                   "client_gc_s": pauses.total_s - gc_at_start, "server": parsed.get("trace"),
                                   "batch_size": parsed["timing_ms"]["batch_size"]})
        finally:
            pool.put_nowait(connection)

    with gc_held() if hold_gc else contextlib.nullcontext():
        if pauses:  # the timed window only
            pauses.install()
        start = time.perf_counter()
        tasks = []
        for k, at in enumerate(arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(k, start + at)))
        await asyncio.gather(*tasks)
        run.wall = time.perf_counter() - start
    if pauses:
        pauses.uninstall()
        run.client_gc = pauses.summary()
    while not pool.empty():
        pool.get_nowait().close()
    return run


def run_async(coroutine: Awaitable[T]) -> T:
    """Run on uvloop when it is installed (less client CPU per request), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def summary(run: LoadRun) -> dict:
    ms, server_ms = np.asarray(run.latencies) * 1e3, np.asarray(run.server_ms)
    out = {"requests": len(ms), "requests_per_s": len(ms) / run.wall,
           "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
           "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
           "server_p50_ms": float(np.percentile(server_ms, 50)), "server_p99_ms": float(np.percentile(server_ms, 99))}
    if run.offered_rate is not None:
        out.update(offered_per_s=run.offered_rate, waited_for_connection=run.waited_for_connection)
    return out


def own_cpu_seconds() -> float:
    """User + system CPU seconds of this process (the load generator)."""
    times = os.times()
    return times.user + times.system
