"""Event logs from the simulator under a fixed reference policy, with no feature pipeline.

Training data for the model ladder wants logs that no trained ranker shaped: a uniformly
random policy gives unbiased exploration data, the oracle an upper bound, popularity the
usual production-like bias. Same DuckDB schema as a sandbox run, so `climber train` and
`climber scaling` read either. A policy log also keeps the oracle's true engagement of every
ranked impression (table `oracle_engagement`), the ceiling `climber train` reports beside a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from experiments.recorder import RunRecorder
from sandbox.settings import SandboxSettings
from simulator.platform import MusicPlatform
from simulator.policies import OracleRecommender, PopularityRecommender, RandomRecommender

POLICIES = ("random", "popularity", "oracle")


def simulate_policy_log(settings: SandboxSettings, policy: str) -> Path:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
    run_dir = settings.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(run_dir / "sandbox.duckdb")
    try:
        recorder.log_run(settings.resolved_run_id(), settings.sim.seed,
                         {**json.loads(settings.model_dump_json()), "policy": policy})
        platform = MusicPlatform(settings.sim, recommender=None, sink=recorder.log_events)
        oracle_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        platform.oracle_sink = lambda *part: oracle_parts.append(part)
        metadata = platform.catalog.metadata()
        recorder.log_tracks(metadata)
        if policy == "random":
            platform.recommender = RandomRecommender(metadata, seed=settings.sim.seed)
        elif policy == "popularity":
            recommender = PopularityRecommender(metadata, seed=settings.sim.seed)
            platform.sink = lambda batch: (recorder.log_events(batch), recommender.observe(batch))
            platform.recommender = recommender
        else:
            platform.recommender = OracleRecommender(platform, seed=settings.sim.seed)
        platform.run()
        if oracle_parts:
            recorder.log_oracle_engagement(*(np.concatenate(column) for column in zip(*oracle_parts)))
        recorder.flush()
        return recorder.path
    finally:
        recorder.close()
