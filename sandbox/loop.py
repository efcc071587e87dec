"""The closed loop: simulator -> bus -> features in Feast -> ranker -> simulator.

Everything runs in one process on one seeded generator with synchronous delivery, so a
seed fixes the event log bit for bit. Time spent in each component is kept (`timings`)
because the loop's throughput goal is only met if no single stage dominates.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from experiments.analysis import ab_report
from experiments.assignment import assign_arms
from experiments.metrics import engagement_by_arm
from experiments.recorder import RunRecorder
from features.store import FeatureStoreClient
from features.updater import FeatureUpdater
from ranker.baselines import BASELINE_RANKERS
from ranker.candidates.generator import CandidateGenerator
from ranker.recommender import ArmRecommender
from sandbox.settings import SandboxSettings
from simulator.facts import stylised_facts
from simulator.platform import MusicPlatform
from streaming.bus import DEAD_LETTER_TOPIC, EVENTS_TOPIC, InProcessBus
from streaming.events import EventBatch, decode_events, validate_batch
from streaming.plausibility import EventBounds, PlausibilityGate

log = logging.getLogger(__name__)


def build_ranker(spec: str, metadata, sequences):
    """A ranker from its settings name: a baseline, `checkpoint:<dir>` for a trained model,
    or `http://host:port` for the ranking service (which reads history from Feast itself)."""
    if spec in BASELINE_RANKERS:
        return BASELINE_RANKERS[spec](metadata, sequences)
    from ranker.serving.client import HttpRanker, is_http_ranker

    if is_http_ranker(spec):
        return HttpRanker(spec)
    from ranker.serving.ranker import NeuralRanker

    ranker = NeuralRanker.from_checkpoint(spec.removeprefix("checkpoint:"), sequences)
    if ranker.model.config.n_tracks < metadata.n_tracks:
        raise ValueError(f"{spec}: the model knows {ranker.model.config.n_tracks} tracks but the catalog has "
                         f"{metadata.n_tracks}; train it on a run with the same --tracks and --seed")
    return ranker


class Stopwatch:
    """Wall seconds per component, accumulated across calls, each counted once.

    Components nest (the serving path logs responses to DuckDB from inside ranking), and a
    nested component's time is taken out of the one around it, so the figures add up to
    no more than the wall time and what is left over is the simulator's.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open component: seconds spent in the ones nested in it

    @contextmanager
    def time(self, component: str):
        start = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[component] += elapsed - self._inner.pop()
            if self._inner:
                self._inner[-1] += elapsed


@dataclass
class SandboxResult:
    settings: SandboxSettings
    run_dir: Path
    db_path: Path
    wall_seconds: float
    events: int
    requests: int
    sessions: int
    dead_letters: int
    feature_rows_written: int | None  # None: written by Faust workers, counted in their logs
    event_log_hash: str
    facts: list
    arm_metrics: object  # pandas DataFrame
    behaviour_counts: object  # pandas DataFrame: scenario x behaviour
    lift: object = None  # pandas DataFrame: each arm against control, with CI and p-value
    sample_ratio: object = None  # experiments.analysis.SampleRatio
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def events_per_second(self) -> float:
        return self.events / self.wall_seconds if self.wall_seconds else 0.0


class EventPipeline:
    """What happens to events on the bus: validation, the DuckDB record, features, online learners.

    The live loop and replay of an event log both feed it, so both treat bad input alike:
    rejected events go to the dead-letter topic (and table) with the reason, the rest goes on.
    """

    def __init__(self, bus: InProcessBus, recorder: RunRecorder, features: "FeatureUpdater | KafkaFeaturePath",
                 learners: list, watch: Stopwatch, gate: PlausibilityGate | None = None) -> None:
        self.bus, self.recorder, self.features, self.learners, self.watch = bus, recorder, features, learners, watch
        self.gate = gate or PlausibilityGate(EventBounds())  # without a catalogue: watermarks and repeats
        bus.subscribe(EVENTS_TOPIC, self.on_events)
        bus.subscribe(DEAD_LETTER_TOPIC, recorder.log_dead_letters)

    def on_events(self, batch: EventBatch, source: str = "simulator") -> None:
        good, dead = validate_batch(batch, source=source)
        good, implausible = self.gate.check(good, source=source)
        if dead or implausible:
            self.bus.publish(DEAD_LETTER_TOPIC, dead + implausible)
        with self.watch.time("duckdb"):
            self.recorder.log_events(good)
        with self.watch.time("features"):
            self.features.on_events(good)
        with self.watch.time("learners"):
            for learner in self.learners:
                learner.observe(good)

    def on_json(self, raws, source: str) -> None:
        """Raw JSON events (replayed logs, files): decode, dead-letter the bad, publish the good."""
        good, dead = decode_events(raws, source=source)
        if dead:
            self.bus.publish(DEAD_LETTER_TOPIC, dead)
        if len(good):
            self.bus.publish(EVENTS_TOPIC, good)

    def finish(self) -> None:
        with self.watch.time("features"):
            self.features.flush()
        with self.watch.time("duckdb"):
            self.recorder.flush()


def build_feature_path(settings: SandboxSettings, run_dir: Path, n_users: int | None = None,
                       n_tracks: int | None = None) -> tuple["FeatureUpdater | KafkaFeaturePath", FeatureStoreClient]:
    """How events become features in Feast under `settings.transport`, and the store to read
    them from: the in-process updater on the configured online store (embedded), or Kafka +
    Faust workers writing Redis (kafka). The live loop and replay build it alike; the live
    loop names its id spaces, which the workers then enforce (replay's source may differ)."""
    if settings.transport == "kafka":
        from sandbox.kafka_transport import KafkaFeaturePath

        features = KafkaFeaturePath(run_dir, settings.kafka_bootstrap, settings.kafka_partitions,
                                    settings.redis_url, settings.workers, settings.max_seq_len,
                                    n_users=n_users, n_tracks=n_tracks)
        return features, FeatureStoreClient(run_dir / "feast", online_store="redis", redis_url=features.redis_url)
    store = FeatureStoreClient(run_dir / "feast", online_store=settings.online_store, redis_url=settings.redis_url)
    store.apply()
    features = FeatureUpdater(store, settings.max_seq_len, settings.feature_flush_ms, settings.track_stats_flush_ms,
                              background=settings.background_feature_writes)
    return features, store


class Sandbox:
    """All parts of one run, built from settings; `run()` simulates, `result()` summarises.

    The transport decides only how events become features in Feast: the in-process
    FeatureUpdater (embedded) or Kafka + Faust workers (kafka). Everything else is shared.
    """

    def __init__(self, settings: SandboxSettings) -> None:
        try:
            self._build(settings)
        except BaseException:  # a half-built run must not leave a broker or workers behind
            self.close()
            raise

    def _build(self, settings: SandboxSettings) -> None:
        self.settings = settings
        self.run_dir = settings.run_dir()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.watch = Stopwatch()
        self.started = time.perf_counter()

        self.recorder = RunRecorder(self.run_dir / "sandbox.duckdb")
        self.recorder.log_run(settings.resolved_run_id(), settings.sim.seed, json.loads(settings.model_dump_json()))
        self.features, self.store = build_feature_path(settings, self.run_dir, settings.sim.n_users,
                                                       settings.sim.n_tracks)
        self.bus = InProcessBus()

        experiment = settings.experiment
        user_ids = np.arange(settings.sim.n_users)
        self.arms = assign_arms(user_ids, experiment.name, experiment.salt, experiment.arms)
        self.recorder.log_assignments(user_ids, self.arms, experiment.name, experiment.salt)

        self.platform = MusicPlatform(settings.sim, recommender=None,
                                      sink=lambda batch: self.bus.publish(EVENTS_TOPIC, batch), arms=self.arms)
        self.metadata = self.platform.catalog.metadata()
        self.recorder.log_tracks(self.metadata)
        sequences = BatchSequences(self.store)
        self.candidates = CandidateGenerator(self.metadata, seed=settings.sim.seed, sequences=sequences)
        if settings.candidates != "heuristic":  # a learned source; the heuristics serve its cold users
            from ranker.candidates.learned import ModelCandidates

            self.candidates = ModelCandidates.from_spec(settings.candidates, self.metadata, sequences, self.candidates)
        self.rankers = {arm: build_ranker(spec, self.metadata, sequences) for arm, spec in experiment.rankers.items()}
        self.recommender = ArmRecommender(self.candidates, self.rankers, self.arms, on_response=self._log_response,
                                          watch=self.watch)
        self.platform.recommender = ServingPath(self.recommender, self.features, sequences, self.watch)
        learners = [self.candidates, *{id(r): r for r in self.rankers.values() if hasattr(r, "observe")}.values()]
        # The run's own stream: ids from 0, time from the simulation's start, this catalogue.
        bounds = EventBounds(n_users=settings.sim.n_users, n_tracks=self.metadata.n_tracks,
                             track_duration_ms=self.metadata.duration_ms)
        gate = PlausibilityGate(bounds, id_watermark=-1, ts_watermark=settings.sim.start_ts)
        self.pipeline = EventPipeline(self.bus, self.recorder, self.features, learners, self.watch, gate)
        self.summary = None

    def _log_response(self, *args) -> None:
        with self.watch.time("duckdb"):
            self.recorder.log_response(*args)

    def run(self, show_progress: bool = False) -> None:
        self.summary = _run_with_progress(self.platform, show_progress)
        self.pipeline.finish()

    def result(self) -> SandboxResult:
        self.pipeline.finish()
        if self.settings.transport == "kafka":  # the workers' rejects, kept with the run
            self.recorder.log_dead_letters(self.features.dead_letters())
            self.recorder.flush()
        wall = time.perf_counter() - self.started
        timings = {**self.watch.seconds, "simulator": max(0.0, wall - sum(self.watch.seconds.values()))}
        events = self.recorder.read_events()
        return SandboxResult(
            settings=self.settings, run_dir=self.run_dir, db_path=self.recorder.path, wall_seconds=wall,
            events=len(events), requests=self.summary.requests if self.summary else 0,
            sessions=self.summary.sessions if self.summary else 0,
            dead_letters=self.recorder.count("dead_letters"), feature_rows_written=self.features.rows_written,
            event_log_hash=self.recorder.event_log_hash(), facts=stylised_facts(events, self.metadata),
            arm_metrics=engagement_by_arm(self.recorder.connection),
            behaviour_counts=self.recorder.behaviour_counts(), timings=timings,
            **self._ab_analysis(),
        )

    def _ab_analysis(self) -> dict:
        """Lift of every arm against the control arm; needs at least one user exposed in each."""
        arms = self.settings.experiment.arms
        control = "control" if "control" in arms else next(iter(arms))
        total = sum(arms.values())
        try:
            lift, sample_ratio = ab_report(self.recorder.connection, {a: w / total for a, w in arms.items()}, control)
        except ValueError as exc:  # e.g. a run too small to expose anyone in control
            log.warning("no A/B analysis: %s", exc)
            return {}
        return {"lift": lift, "sample_ratio": sample_ratio}

    def close(self) -> None:
        """Stops what this run started (Kafka transport: workers, broker, Valkey) and closes the record."""
        for part in (getattr(self, "features", None), getattr(self, "recorder", None)):
            if part is not None:
                part.close()


def run_sandbox(settings: SandboxSettings, show_progress: bool = False) -> SandboxResult:
    sandbox = Sandbox(settings)
    try:
        sandbox.run(show_progress)
        return sandbox.result()
    finally:
        sandbox.close()


class BatchSequences:
    """A SequenceSource that reads Feast once per recommendation batch.

    Candidate generation and ranking both need the batch's sequences; without this each
    would read the online store separately.
    """

    def __init__(self, store: FeatureStoreClient) -> None:
        self.store = store
        self._batch: dict = {}

    def load(self, user_ids) -> None:
        self._batch = self.store.get_sequences(sorted(set(user_ids)))

    def get_sequences(self, user_ids):
        missing = [u for u in user_ids if u not in self._batch]
        if missing:
            self._batch.update(self.store.get_sequences(missing))
        return {u: self._batch[u] for u in user_ids}


class ServingPath:
    """What the simulator calls: push the batch's pending features, read them once, rank."""

    def __init__(self, recommender: ArmRecommender, features: "FeatureUpdater | KafkaFeaturePath",
                 sequences: BatchSequences, watch: Stopwatch) -> None:
        self.recommender, self.features, self.sequences, self.watch = recommender, features, sequences, watch

    def recommend(self, requests):
        users = [r.user_id for r in requests]
        with self.watch.time("features"):
            self.features.flush_users(users)
        with self.watch.time("feature reads"):
            self.sequences.load(users)
        with self.watch.time("routing"):  # what is left of ranking: arms, requests, checks
            return self.recommender.recommend(requests)


def _run_with_progress(platform: MusicPlatform, show_progress: bool):
    if not show_progress:
        return platform.run()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("simulating"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("sim", total=1.0)
        summary = platform.run(progress=lambda fraction: bar.update(task, completed=fraction))
        bar.update(task, completed=1.0)
    return summary
