"""The ranking service: requests from many clients micro-batched into one `rank` call.

    service = ScoringService(NeuralRanker.from_checkpoint(path, feature_store), ServingSettings())
    await service.start()                           # the batching task, on the running event loop
    scored = await service.rank_one(request)        # from any coroutine (the HTTP handlers)
    responses = service.rank(requests)              # or in-process, already batched (the sandbox)

Why batch: a `NeuralRanker.rank` call has a fixed cost (one feature-store read, one stacked
cache, one model pass) that a batch shares, so requests that arrive together are served
together. The batching task takes the first waiting request, lets the event loop run what
is ready (requests already read join the batch), then waits up to `max_wait_ms` for more
(up to `max_batch`) and ranks them in one call.

How long it waits is `batching`: "fixed" waits the whole `max_wait_ms` after the first
request, so a lone request pays the timer (1 ms, and more when the cores are busy and the
timer wakes late); "adaptive" (the default) waits only while other requests are on their
way in (`arriving()`: a front end, the HTTP handler, has begun reading one and not yet
queued or refused it), and ends the wait as soon as none is. A lone request then never
waits, while requests that arrive together still share a batch.

Why on the event loop, not a worker thread: the model is Python-heavy (hundreds of small
torch ops per batch), and a scoring thread beside the HTTP loop fights it for the GIL on
every op; on 2 cores that convoy cost more than the scoring itself (an earlier version). So
the batching task ranks on the loop: while a batch scores, new requests wait in socket
buffers and form the next batch. `scoring="thread"` is the other way, kept as an option to
measure: one worker thread ranks each batch while the loop reads the next requests (the
batching task still waits for it, so batches never overlap). One task owns the model and
the KV cache, so neither needs a lock. Requests
are validated before they are queued, so one bad request never fails a batch.

Metrics (Prometheus text, `metrics_text()`): request latency, batch sizes, seconds per
stage, and the KV cache's lookups by outcome, evictions, bytes and hit rate.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from ranker.interface import RankRequest, RankResponse
from ranker.serving.cache import DEFAULT_BUDGET_BYTES
from ranker.serving.gc_pauses import GcPauses
from ranker.serving.ranker import DEFAULT_CANDIDATE_CHUNK, DEFAULT_MAX_CANDIDATES, NeuralRanker, check_request

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingSettings(BaseSettings):
    """Service settings: defaults, then `CLIMBER_SERVE_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CLIMBER_SERVE_")

    checkpoint: Path | None = None  # a ranker.training.checkpoint folder
    feast_dir: Path | None = None  # the run's Feast data folder (runs/<id>/feast)
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = ""
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"  # auto: CUDA when present
    # A hard limit per request (a 422 states it); past `candidate_chunk` a request is scored
    # in chunks over its one cached history, with the same scores as one pass.
    max_candidates: int = Field(DEFAULT_MAX_CANDIDATES, ge=1)
    candidate_chunk: int = Field(DEFAULT_CANDIDATE_CHUNK, ge=1)
    # 16: measured in-process (astro-s, M = 200, n = 256, 1 CPU thread, warm cache), a
    # request costs least in batches of 8 to 16 (3.4-3.6 ms) and about 25% more at 32
    # (4.5 ms), likely because the activations outgrow the core's cache; at 1, 5.5 ms.
    max_batch: int = Field(16, ge=1)
    max_wait_ms: float = Field(1.0, ge=0)
    batching: Literal["adaptive", "fixed"] = "adaptive"  # see the module docstring
    # POST /rank by a bare ASGI handler ("lean") or FastAPI's route ("fastapi", the reference
    # path); the same checks and replies either way (ranker.serving.http).
    rank_route: Literal["lean", "fastapi"] = "lean"
    # Where a batch is ranked: "loop" (the default, see the module docstring) or "thread", one
    # worker thread, so the loop reads and checks request bodies while a batch scores (torch
    # releases the GIL inside its ops); batches still run one at a time, in the same order.
    scoring: Literal["loop", "thread"] = "loop"
    # The serving process's glibc malloc: "keep" fixes its mmap and trim thresholds at start so
    # the pages a batch frees are reused by the next batch, not unmapped and faulted in again
    # (ranker.serving.malloc); "glibc" leaves glibc's dynamic thresholds (the reference).
    malloc: Literal["keep", "glibc"] = "keep"
    # Stage two (candidates against the cached history): "fast" (ranker.serving.stage_two: the
    # same scores with a smaller fixed cost per batch) or "reference" (the model's own).
    stage_two: Literal["fast", "reference"] = "fast"
    cache_bytes: int = Field(DEFAULT_BUDGET_BYTES, ge=0)
    kv_storage: Literal["fp32", "bf16", "int8"] = "fp32"  # K/V at rest (ranker.serving.kv_storage)
    # The served history window's hop (ranker.window): 1 slides it with every event past
    # max_len, so a full history's cache is rebuilt on every event; h > 1 moves its start in
    # steps of h, so the cache extends between hops.
    window_hop: int = Field(1, ge=1)
    # torch intra-op threads of the serving process (0: torch's default, one per core). 1 by
    # default: a batch is hundreds of small ops, each a parallel region whose barrier waits
    # for every thread, and when another process holds a core (the load generator, other
    # jobs) each barrier waits for the scheduler. Measured on 2 cores shared with other jobs
    # (load average 3.5): a batch of one took 637 ms with 2 threads, 5.5 ms with 1.
    torch_threads: int = Field(1, ge=0)
    # HTTP limits (ranker.serving.http_limits): a body past max_body_bytes gets a 413 before it is
    # parsed (1 MiB: 100,000 candidate ids under 100,000 are about 0.7 MB of JSON); a body not
    # received within body_timeout_s gets a 408 and the connection is closed, so slow
    # senders cannot hold connections; "reject" refuses a repeated candidate with a 422,
    # "score" scores every occurrence (equal scores, kept in request order).
    max_body_bytes: int = Field(1 << 20, ge=1)
    body_timeout_s: float = Field(5.0, gt=0)
    duplicate_candidates: Literal["score", "reject"] = "score"
    # Per-request timestamps in every /rank reply (`trace`: perf_counter seconds at each step,
    # which on Linux is CLOCK_MONOTONIC, shared by the processes of one machine) and the
    # process's garbage-collection pauses in /metrics: what `climber bench load --breakdown`
    # reads to tell where a slow request spent its time. Off: a few dict entries per reply.
    trace: bool = False


@dataclass
class ScoredResponse:
    response: RankResponse
    timing_ms: dict[str, float] = field(default_factory=dict)  # queue, batch stages, total
    # with settings.trace: perf_counter seconds when it was queued and its batch started and ended
    stamps: dict[str, float] | None = None


@dataclass
class _Pending:
    request: RankRequest
    future: asyncio.Future
    enqueued: float


class _Histogram:
    """Bucketed observations held by this object.

    Not prometheus_client's Histogram: importing Feast switches prometheus_client into
    multiprocess mode (it sets PROMETHEUS_MULTIPROCESS_DIR), where every metric of the same
    name in a process shares one value, so two services (tests, benchmarks) would mix counts.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:  # a few per request: bisect, not numpy's per-call overhead
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: upper bound inclusive
        self.sum += value

    def buckets(self) -> list[tuple[str, int]]:
        cumulative = list(itertools.accumulate(self.counts))
        return [(repr(b), c) for b, c in zip(self.bounds, cumulative)] + [("+Inf", cumulative[-1])]


class ServiceMetrics:
    """Request latency, batch sizes, stage times, outcomes, and the KV cache read at scrape
    time (so cache counters are never counted twice); a prometheus_client collector."""

    def __init__(self, ranker: NeuralRanker) -> None:
        self.ranker = ranker
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.batch_size = _Histogram(BATCH_BUCKETS)
        self.stages: dict[str, _Histogram] = {}
        self.requests = {"ok": 0, "error": 0}
        self.gc_pauses: GcPauses | None = None  # set by the service when tracing

    def record(self, n: int, stages: dict[str, float], latencies: Sequence[float]) -> None:
        self.batch_size.observe(n)
        self.requests["ok"] += n
        for name, seconds in stages.items():
            self.stages.setdefault(name, _Histogram(LATENCY_BUCKETS)).observe(seconds)
        for seconds in latencies:
            self.latency.observe(seconds)

    def collect(self):
        for name, doc, histogram in (("climber_rank_latency_seconds", "Time from submit to response", self.latency),
                                     ("climber_rank_batch_size", "Requests per ranked batch", self.batch_size)):
            yield HistogramMetricFamily(name, doc, buckets=histogram.buckets(), sum_value=histogram.sum)
        stage = HistogramMetricFamily("climber_rank_stage_seconds", "Seconds per batch stage", labels=["stage"])
        for name, histogram in self.stages.items():
            stage.add_metric([name], histogram.buckets(), histogram.sum)
        yield stage
        requests = CounterMetricFamily("climber_rank_requests", "Ranked requests by outcome", labels=["outcome"])
        for outcome, count in self.requests.items():
            requests.add_metric([outcome], count)
        yield requests
        if self.gc_pauses is not None:
            pauses = CounterMetricFamily("climber_gc_pause_seconds", "Seconds in cyclic GC collections",
                                         labels=["generation"])
            collections = CounterMetricFamily("climber_gc_collections", "Cyclic GC collections", labels=["generation"])
            for generation in range(3):
                pauses.add_metric([str(generation)], self.gc_pauses.seconds[generation])
                collections.add_metric([str(generation)], self.gc_pauses.collections[generation])
            yield pauses
            yield collections
            yield GaugeMetricFamily("climber_gc_pause_max_seconds", "Longest GC collection", value=self.gc_pauses.max_s)
        info = GaugeMetricFamily("climber_model_info", "Model served", labels=["name", "version"])
        info.add_metric([self.ranker.name, self.ranker.version], 1)
        yield info
        cache = self.ranker.cache
        lookups = CounterMetricFamily("climber_kv_cache_lookups", "KV cache lookups by outcome", labels=["outcome"])
        for outcome in ("hits", "incremental", "rebuilds", "cold"):
            lookups.add_metric([outcome], getattr(cache.stats, outcome))
        yield lookups
        yield CounterMetricFamily("climber_kv_cache_evictions", "Entries evicted to stay under the budget",
                                  value=cache.stats.evictions)
        for name, doc, value in (
            ("climber_kv_cache_bytes", "Bytes held by cache entries", cache.stats.bytes),
            ("climber_kv_cache_budget_bytes", "Byte budget of the cache", cache.budget_bytes),
            ("climber_kv_cache_entries", "Users cached", cache.stats.entries),
            ("climber_kv_cache_hit_rate", "Hits / lookups of users with history", cache.stats.hit_rate),
            ("climber_kv_cache_reuse_rate", "(Hits + incremental) / lookups", cache.stats.reuse_rate),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ScoringService:
    """Micro-batching front of a NeuralRanker, with Prometheus metrics."""

    def __init__(self, ranker: NeuralRanker, settings: ServingSettings | None = None) -> None:
        self.ranker = ranker
        self.settings = settings or ServingSettings()
        self.metrics = ServiceMetrics(ranker)
        self.registry = CollectorRegistry()
        self.registry.register(self.metrics)
        self._queue: asyncio.Queue[_Pending | None] | None = None
        # Seconds the event loop has spent blocked in ranking: a body timeout must not count
        # them against a client whose bytes arrived while the loop was busy.
        self.busy_seconds = 0.0
        self._task: asyncio.Task | None = None
        # Requests a front end has begun reading and not yet queued or refused (`arriving`);
        # the adaptive batching wait lasts while there are any. `_news` wakes the batching
        # task when one is queued or the count drops.
        self._arriving = 0
        self._news: asyncio.Event | None = None
        self.gc_pauses = GcPauses() if self.settings.trace else None
        self.metrics.gc_pauses = self.gc_pauses
        self._executor: ThreadPoolExecutor | None = None  # scoring "thread"

    # -- lifecycle (on the event loop that will call rank_one)

    async def start(self) -> "ScoringService":
        if self._task is None:
            self.ranker.warm_up()
            if self.gc_pauses is not None:
                self.gc_pauses.install()
            if self.settings.scoring == "thread":  # torch's thread count is per calling thread: carry it over
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="climber-ranker",
                                                    initializer=torch.set_num_threads,
                                                    initargs=(torch.get_num_threads(),))
            self._queue = asyncio.Queue()
            self._news = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._serve(), name="climber-ranker")
        return self

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
            self._task = None
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None
            if self.gc_pauses is not None:
                self.gc_pauses.uninstall()

    async def __aenter__(self) -> "ScoringService":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- requests

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request on its way in (body being read or checked) until it is queued with
        `rank_one` or refused: the adaptive batching wait lasts while any is."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if self._news is not None:
                self._news.set()

    async def rank_one(self, request: RankRequest) -> ScoredResponse:
        """Rank one request in the next batch. Raises ValueError at once (before queueing)
        for a request that could never be ranked."""
        if not self.running:
            raise RuntimeError("the scoring service is not running; await start() first")
        check_request(request, self.ranker.model.config.n_tracks, self.settings.max_candidates)
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(request, future, time.perf_counter()))
        self._news.set()
        return await future

    def rank(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        """In-process, already batched (the embedded sandbox): rank now, in the caller's thread.
        Not while the batching task runs: both would touch the cache."""
        if self.running:
            raise RuntimeError("rank() bypasses the batching task; use rank_one() while the service is running")
        for request in requests:
            check_request(request, self.ranker.model.config.n_tracks, self.settings.max_candidates)
        started = time.perf_counter()
        responses, stages = self.ranker.rank_timed(requests)
        self._record(len(requests), stages, [started] * len(requests))
        return responses

    def metrics_text(self) -> bytes:
        return generate_latest(self.registry)

    # -- the batching task

    async def _next_batch(self) -> list[_Pending] | None:
        first = await self._queue.get()
        if first is None:
            return None
        batch = [first]
        await asyncio.sleep(0)  # one pass of the loop: requests already read join this batch
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
        adaptive = self.settings.batching == "adaptive"
        while len(batch) < self.settings.max_batch:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or (adaptive and self._arriving == 0):
                    break
                if adaptive:  # until one is queued or none is on its way
                    self._news.clear()
                    try:
                        await asyncio.wait_for(self._news.wait(), remaining)
                    except TimeoutError:
                        break
                    continue
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = self._queue.get_nowait()
            if item is None:
                self._queue.put_nowait(None)  # stop after this batch
                break
            batch.append(item)
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            if self._executor is None:  # blocking on purpose: see the module docstring
                started = time.perf_counter()
                self._rank_batch(batch)
                self.busy_seconds += time.perf_counter() - started
            else:  # the loop reads and checks new requests meanwhile; the next batch waits for this one
                self._deliver(await loop.run_in_executor(self._executor, self._score, batch))

    def _rank_batch(self, batch: list[_Pending]) -> None:
        self._deliver(self._score(batch))

    def _score(self, batch: list[_Pending]) -> list[tuple]:
        """Rank a batch: [(batch, responses, stages, started, done)]; if the batch fails, its
        requests one by one, so an error reaches only the request that causes it, as
        (batch of one, error, None, started, done) (validation before queueing should leave
        none: this is the guard for what it cannot foresee). Touches the model and the cache
        only, never the loop's objects, so it may run in the scoring thread."""
        started = time.perf_counter()
        try:
            responses, stages = self.ranker.rank_timed([p.request for p in batch])
        except Exception as error:  # noqa: BLE001 - delivered to the failing caller only
            if len(batch) > 1:
                return [outcome for pending in batch for outcome in self._score([pending])]
            return [(batch, error, None, started, time.perf_counter())]
        return [(batch, responses, stages, started, time.perf_counter())]

    def _deliver(self, outcomes: list[tuple]) -> None:
        """On the loop: each reply (or error) to its caller, and the metrics."""
        trace = self.settings.trace
        for batch, responses, stages, started, done in outcomes:
            if stages is None:  # `responses` is the error of a request that failed alone
                self.metrics.requests["error"] += 1
                if not batch[0].future.done():
                    batch[0].future.set_exception(responses)
                continue
            self._record(len(batch), stages, [p.enqueued for p in batch])
            batch_ms = {f"{name}_ms": seconds * 1000 for name, seconds in stages.items()}
            for pending, response in zip(batch, responses):
                if pending.future.done():  # the caller went away (e.g. a dropped connection)
                    continue
                timing = {"queue_ms": (started - pending.enqueued) * 1000, **batch_ms,
                          "total_ms": (done - pending.enqueued) * 1000, "batch_size": len(batch)}
                stamps = {"queued": pending.enqueued, "batch_start": started, "batch_end": done} if trace else None
                pending.future.set_result(ScoredResponse(response, timing, stamps))

    def _record(self, n: int, stages: dict[str, float], enqueued: Sequence[float]) -> None:
        now = time.perf_counter()
        self.metrics.record(n, stages, [now - t for t in enqueued])
