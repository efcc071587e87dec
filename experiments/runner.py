"""Running an experiment file: warm-up -> train -> A/B in one closed loop, into runs/<name>/.

One simulated world runs from the first warm-up day to the last A/B day; the clock pauses
once, at the end of the warm-up, to train the neural arms (simulator.platform `pauses`).

- warm-up: every user, whatever their arm, is served by the logging policy (popularity
  with exploration); the requests are still logged under each user's arm, so each user's
  warm-up behaviour is the CUPED covariate of their A/B metrics.
- train: the warm-up log so far is copied to `warm_up.duckdb` and each neural arm is
  trained on it with the same budget (experiments.training), into `checkpoints/<arm>/`.
- retrain (optional, `phases.retrain_every` days): the clock pauses again, the log so far
  is copied, each trained arm is fine-tuned on it from its current checkpoint
  (`climber train --resume-from`, experiments.training.retrain_arm) and its ranker
  hot-reloads the new weights (NeuralRanker.reload drops the old version's cached K/V;
  every logged request carries the model version that scored it). Table `retrains`.
- A/B: each arm's users get their arm's ranker. Neural arms serve through the TURBO path
  (ranker.serving: per-user KV cache, incremental extends); its hits, extends and rebuilds
  are kept per arm. For every A/B request the simulator's oracle scores the served slate
  and its own best slate of the same candidates (the `regret` table).

The run record is the sandbox's DuckDB file plus tables `experiment` (the spec and the
phase boundaries), `arm_models`, `kv_cache` and `regret` (docs/schema.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from experiments.rankers import ExploringRanker, Handover, OracleRanker
from experiments.spec import BASELINES, ExperimentSpec, FixedArm
from experiments.training import TrainedModel, retrain_arm, train_arm
from simulator.config import DAY_MS
from streaming.events import SCENARIO_CODE, SCENARIOS

log = logging.getLogger(__name__)
MARKER = "experiment.json"  # a run folder holding this was made by `climber experiment run`


def sandbox_settings(spec: ExperimentSpec, out: Path):
    """The sandbox under the experiment: its world, arms and salt. Baseline arms get their
    ranker from the sandbox (so they learn from the events from the first day); the others
    get a popularity placeholder, replaced when the A/B phase starts."""
    from sandbox.settings import ExperimentSettings, SandboxSettings

    rankers = {arm: a.ranker if isinstance(a, FixedArm) and a.ranker in BASELINES else "popularity"
               for arm, a in spec.arms.items()}
    experiment = ExperimentSettings(name=spec.name, salt=spec.salt, arms=spec.shares(), rankers=rankers)
    return SandboxSettings(sim=spec.sim_config(), experiment=experiment, out=out, run_id=spec.name)


def prepare_run_dir(run_dir: Path) -> None:
    """A fresh run folder; an earlier run of the same experiment is replaced, anything else kept."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / MARKER).exists():
            raise FileExistsError(f"{run_dir} exists and is not an experiment run folder; choose another name or --out")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


class ExperimentLoop:
    """The sandbox's closed loop, driven through the experiment's phases."""

    def __init__(self, spec: ExperimentSpec, out: Path = Path("runs"), progress: bool = True) -> None:
        from sandbox.loop import Sandbox

        self.spec, self.progress = spec, progress
        self.run_dir = out / spec.name
        prepare_run_dir(self.run_dir)
        (self.run_dir / MARKER).write_text(spec.model_dump_json(indent=2))
        self.sandbox = Sandbox(sandbox_settings(spec, out))
        sb = self.sandbox
        self.sequences = sb.platform.recommender.sequences
        self.ab_start_ts = spec.sim_config().start_ts + spec.phases.warm_up.days * DAY_MS
        self.end_ts = spec.sim_config().start_ts + spec.days * DAY_MS
        self.models: dict[str, TrainedModel] = {}  # as trained on the warm-up log (table arm_models)
        self.current: dict[str, TrainedModel] = {}  # what each arm serves now (after retrains)
        self.arm_rankers: dict = {}  # each arm's A/B ranker, set at the pause
        self.regret_rows: list[tuple] = []
        self.retrain_rows: list[dict] = []
        self.phase_seconds: dict[str, float] = {}
        self.oracle = OracleRanker(sb.platform.oracle)
        self.examine = np.array([[sb.settings.sim.scenario(s).examine_first * sb.settings.sim.scenario(s).examine_decay**k
                                  for k in range(200)] for s in SCENARIOS])
        warm = spec.phases.warm_up
        from ranker.baselines import BASELINE_RANKERS

        base = BASELINE_RANKERS[warm.policy](sb.metadata, self.sequences)
        slate_sizes = {s: sb.settings.sim.scenario(s).slate_size for s in SCENARIOS}
        self.logger = ExploringRanker(base, warm.exploration, slate_sizes, seed=spec.seed)
        sb.pipeline.learners.append(self.logger)
        self.ab_rankers = dict(sb.rankers)
        sb.recommender.rankers = {arm: self.logger for arm in spec.arms}
        self._log_response = sb.recommender.on_response
        # The oracle's P(full play | examined) of every warm-up impression: the ceiling that
        # training prints beside each arm's offline GAUC (ranker/training/ceiling.py).
        self.oracle_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        sb.platform.oracle_sink = lambda *part: self.oracle_parts.append(part)
        sb.recommender.on_response = self._on_response

    # -- phases -----------------------------------------------------------------------------

    def run(self) -> Path:
        sb, started = self.sandbox, time.perf_counter()
        self._phase_started = started
        pause = self.ab_start_ts - self.spec.sim_config().start_ts
        pauses = [(pause, lambda: self._start_ab(task))]
        every = self.spec.phases.retrain_every
        if every and self.spec.trained_arms():
            horizon = self.end_ts - self.spec.sim_config().start_ts
            for at in range(pause + every * DAY_MS, horizon, every * DAY_MS):
                pauses.append((at, lambda at=at: self._retrain(at, task)))
        task = None
        if self.progress:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                                TimeElapsedColumn())
            task = self.bar.add_task(f"warm-up ({self.spec.phases.warm_up.days} d)", total=1.0)
            with self.bar:
                summary = sb.platform.run(progress=lambda f: self.bar.update(task, completed=f), pauses=pauses)
        else:
            self.bar = None
            summary = sb.platform.run(pauses=pauses)
        sb.summary = summary
        sb.pipeline.finish()
        self.phase_seconds["ab"] = time.perf_counter() - self._phase_started
        self._write_tables(time.perf_counter() - started)
        return self.run_dir

    def _start_ab(self, task) -> None:
        """At the end of the warm-up: train the neural arms on the log so far, then switch."""
        sb = self.sandbox
        now = time.perf_counter()
        self.phase_seconds["warm_up"] = now - self._phase_started
        sb.pipeline.finish()
        sb.platform.oracle_sink, sb.platform.reactions.record_engagement = None, False
        if self.oracle_parts:
            sb.recorder.log_oracle_engagement(*(np.concatenate(column) for column in zip(*self.oracle_parts)))
            self.oracle_parts = []
        log_path = self._copy_log("warm_up.duckdb")
        if self.bar is not None:
            self.bar.stop()
        for arm, arm_spec in self.spec.trained_arms().items():
            if self.progress:
                print(f"training {arm} ({arm_spec.family} {arm_spec.size}) on the warm-up log")
            self.models[arm] = train_arm(arm, arm_spec, self.spec.phases.train, log_path,
                                         self.run_dir / "checkpoints" / arm, progress=self.progress)
        from ranker.serving.ranker import NeuralRanker

        self.current = dict(self.models)
        rankers = {}
        for arm, arm_spec in self.spec.arms.items():
            if arm in self.models:
                rankers[arm] = NeuralRanker.from_checkpoint(self.models[arm].checkpoint, self.sequences, name=arm,
                                                            window_hop=self.spec.serving.window_hop)
            elif arm_spec.ranker == "oracle":
                rankers[arm] = self.oracle
            elif arm_spec.ranker.startswith("checkpoint:"):
                from sandbox.loop import build_ranker

                rankers[arm] = build_ranker(arm_spec.ranker, sb.metadata, self.sequences)
            else:
                rankers[arm] = self.ab_rankers[arm]
        for ranker in rankers.values():
            if hasattr(ranker, "warm_up"):
                ranker.warm_up()
            if getattr(ranker, "cache", None) is not None:  # every lookup, for the kv_cache_lookups table
                ranker.cache.lookup_log = []
        self.arm_rankers = rankers
        sb.recommender.rankers = {arm: Handover(self.logger, ranker, self.ab_start_ts) for arm, ranker in rankers.items()}
        self.phase_seconds["train"] = time.perf_counter() - now
        self._phase_started = time.perf_counter()
        if self.bar is not None:
            self.bar.update(task, description=f"A/B ({self.spec.phases.ab.days} d)")
            self.bar.start()

    def _copy_log(self, name: str) -> Path:
        """The log so far, as a DuckDB file the trainer reads."""
        log_path = self.run_dir / name
        con = self.sandbox.recorder.connection
        con.execute(f"ATTACH '{log_path}' AS logcopy")
        for table in ("runs", "tracks", "events", "requests", "impressions", "oracle_engagement"):
            con.execute(f"CREATE TABLE logcopy.{table} AS SELECT * FROM {table}")
        con.execute("DETACH logcopy")
        return log_path

    def _retrain(self, at_ms: int, task) -> None:
        """A retrain pause: fine-tune every trained arm on the log so far, then hot-reload it."""
        from ranker.training.checkpoint import load_checkpoint

        sb, now = self.sandbox, time.perf_counter()
        day = at_ms // DAY_MS
        sb.pipeline.finish()
        log_path = self._copy_log(f"log-day{day}.duckdb")
        if self.bar is not None:
            self.bar.stop()
        for arm, model in list(self.current.items()):
            if self.progress:
                print(f"day {day}: fine-tuning {arm} ({model.model_version}) on the log so far")
            new = retrain_arm(arm, model, self.spec.phases.train, self.spec.phases.retrain, log_path,
                              self.run_dir / "checkpoints" / f"{arm}-day{day}", progress=self.progress)
            weights, meta = load_checkpoint(new.checkpoint)
            self.arm_rankers[arm].reload(weights, meta["model_version"])
            self.retrain_rows.append({"arm": arm, "day": day, "ts": self.spec.sim_config().start_ts + at_ms,
                                      "model_version": new.model_version, "resumed_from": model.model_version,
                                      "steps": new.steps, "train_seconds": new.train_seconds,
                                      "val_loss": new.val_loss, "gauc_full_play": new.gauc_full_play})
            self.current[arm] = new
        log_path.unlink()  # the run's own DuckDB file holds the same rows
        self.phase_seconds["retrain"] = self.phase_seconds.get("retrain", 0.0) + time.perf_counter() - now
        if self.bar is not None:
            self.bar.start()

    def _on_response(self, request, response, arm: str) -> None:
        self._log_response(request, response, arm)
        if request.ts < self.ab_start_ts:
            return
        k = request.slate_size
        engagement = self.oracle.engagement(response_request(request, response))
        weights = self.examine[SCENARIO_CODE[request.scenario], :k]
        served = engagement[response.order[:k]]
        best = np.sort(engagement)[::-1][:k]
        self.regret_rows.append((request.request_id, request.ts, request.user_id, arm,
                                 float(weights[:len(served)] @ served), float(weights[:len(best)] @ best)))

    # -- the record -------------------------------------------------------------------------

    def _write_tables(self, wall_seconds: float) -> None:
        sb = self.sandbox
        con = sb.recorder.connection
        rankers = self.arm_rankers
        cache, lookups = [], []
        for arm, ranker in rankers.items():
            stats = getattr(getattr(ranker, "cache", None), "stats", None)
            if stats is not None:
                cache.append({"arm": arm, "hits": stats.hits, "incremental": stats.incremental,
                              "rebuilds": stats.rebuilds, "cold": stats.cold, "evictions": stats.evictions,
                              "entries": stats.entries, "bytes": stats.bytes, "budget_bytes": ranker.cache.budget_bytes})
                lookups += [(arm, i, user, outcome, nbytes)
                            for i, (user, outcome, nbytes) in enumerate(ranker.cache.lookup_log or [])]
        models = [{**asdict(m), "checkpoint": str(m.checkpoint)} for m in self.models.values()]
        meta = pd.DataFrame([{
            "name": self.spec.name, "spec": self.spec.model_dump_json(), "start_ts": sb.settings.sim.start_ts,
            "ab_start_ts": self.ab_start_ts, "end_ts": self.end_ts, "control": self.spec.control,
            "event_log_hash": sb.recorder.event_log_hash(), "wall_seconds": wall_seconds,
            "phase_seconds": json.dumps(self.phase_seconds), "timings": json.dumps(dict(sb.watch.seconds)),
            "rankers": json.dumps({arm: r.name for arm, r in rankers.items()}),
        }])
        regret = pd.DataFrame(self.regret_rows, columns=["request_id", "ts", "user_id", "arm", "served", "best"])
        retrains = pd.DataFrame(self.retrain_rows, columns=["arm", "day", "ts", "model_version", "resumed_from", "steps",
                                                            "train_seconds", "val_loss", "gauc_full_play"])
        frames = {"experiment": meta, "regret": regret, "retrains": retrains,
                  "arm_models": pd.DataFrame(models, columns=list(TrainedModel.__dataclass_fields__)),
                  "kv_cache": pd.DataFrame(cache, columns=["arm", "hits", "incremental", "rebuilds", "cold",
                                                           "evictions", "entries", "bytes", "budget_bytes"]),
                  "kv_cache_lookups": pd.DataFrame(lookups, columns=["arm", "seq", "user_id", "outcome", "bytes"])}
        for name, frame in frames.items():
            con.register("_frame", frame)
            con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _frame")
            con.unregister("_frame")

    def close(self) -> None:
        self.sandbox.close()


def response_request(request, response):
    """The RankRequest the oracle scores: the request's context with the served candidates."""
    from ranker.interface import RankRequest

    return RankRequest(request.request_id, request.user_id, request.scenario, response.candidates,
                       request.context, request.ts)


TORCH_THREADS = 1


def run_experiment(spec: ExperimentSpec, out: Path = Path("runs"), progress: bool = True) -> Path:
    """Run every phase; returns the run folder (its DuckDB file is sandbox.duckdb).

    Torch runs on one thread throughout. Serving calls are small (one tick's requests of
    one arm), and with a second intra-op thread they spin against the simulator and the
    Feast writer thread for the same cores: on a loaded 2-core box a call took ten times
    the CPU. One thread also keeps float reductions, and so the event log, the same on
    every machine."""
    import torch

    # The record names the simulator's user model even where the file leaves it to the default.
    spec = spec.model_copy(update={"sim": {**spec.sim, "user_model": spec.sim_config().user_model}})
    threads = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    loop = ExperimentLoop(spec, out, progress)
    try:
        return loop.run()
    finally:
        loop.close()
        torch.set_num_threads(threads)
