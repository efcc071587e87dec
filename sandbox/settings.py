"""Sandbox settings: one pydantic model, filled from defaults, `CLIMBER_*` environment
variables and command-line flags (in that order of precedence, lowest first).

Nested simulator settings come from the simulator's own `SimConfig`, so the sandbox never
restates the simulator's parameters; environment variables reach them with a double
underscore, e.g. `CLIMBER_SIM__N_USERS=500`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ranker.baselines import BASELINE_RANKERS
from simulator.config import SimConfig


class ExperimentSettings(BaseSettings):
    name: str = "ranker-ab"
    salt: str = "climber-2026"
    # arm -> traffic share; the default compares the popularity ranker (control) with
    # popularity + co-occurrence (treatment). A ranker is "popularity", "cooccurrence", or
    # "checkpoint:<dir>" for a model trained by `climber train` on a run with the same
    # catalog (same --tracks and --seed): an A/B test of model sizes names two checkpoints.
    # "http://host:port" ranks through a ranking service (`climber serve`) over HTTP.
    arms: dict[str, float] = Field(default_factory=lambda: {"control": 0.5, "treatment": 0.5})
    rankers: dict[str, str] = Field(default_factory=lambda: {"control": "popularity", "treatment": "cooccurrence"})

    @model_validator(mode="after")
    def _arms_have_rankers(self) -> "ExperimentSettings":
        if not self.arms or any(share <= 0 for share in self.arms.values()):
            raise ValueError("experiment.arms: every arm needs a positive traffic share")
        missing = set(self.arms) - set(self.rankers)
        if missing:
            raise ValueError(f"experiment.rankers: no ranker named for arm(s) {sorted(missing)}")
        for arm, spec in self.rankers.items():
            if spec in BASELINE_RANKERS or spec.startswith(("http://", "https://")):
                continue  # a ranking service is checked when the run connects to it
            if not spec.startswith("checkpoint:"):
                raise ValueError(f"experiment.rankers[{arm!r}]: unknown ranker {spec!r}; expected one of "
                                 f"{sorted(BASELINE_RANKERS)}, checkpoint:<dir> or http://host:port")
            from ranker.training.checkpoint import META_FILE  # only when a checkpoint is named: torch is heavy

            if not (Path(spec.removeprefix("checkpoint:")) / META_FILE).exists():
                raise ValueError(f"experiment.rankers[{arm!r}]: {spec!r} is not a checkpoint folder "
                                 f"(no {META_FILE} in it)")
        return self


class SandboxSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIMBER_", env_nested_delimiter="__")

    sim: SimConfig = Field(default_factory=SimConfig)
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings)
    out: Path = Path("runs")
    run_id: str = ""  # empty: derived from the seed and the wall clock at start
    transport: Literal["embedded", "kafka"] = "embedded"
    kafka_bootstrap: str = ""  # empty with transport=kafka: start a local Tansu broker
    kafka_partitions: int = Field(4, ge=1)
    workers: int = Field(1, ge=0)  # Faust worker subprocesses with --transport kafka; 0: started elsewhere
    online_store: Literal["sqlite", "redis"] = "sqlite"
    redis_url: str = ""  # empty with online_store=redis: start a local Valkey server
    max_seq_len: int = Field(256, ge=1, le=4096)
    # How often (simulated ms) pending updates are pushed to Feast. A user's own pending
    # sequence is also pushed just before that user is ranked, so rankers read their writes;
    # the periodic push only keeps Feast fresh for other readers, so the interval trades
    # their staleness for rows written (a listener's tracks within one interval go in one row).
    feature_flush_ms: int = Field(900_000, ge=0)
    track_stats_flush_ms: int = Field(3_600_000, ge=0)
    # Feast writes on a background thread (SQLite works without the GIL, so on the second
    # core); rankers still read their own writes (see features.updater).
    background_feature_writes: bool = True
    # Where candidates come from: "heuristic" (the quota-merged sources of
    # ranker.candidates.generator) or "model:<dir>", a next-item checkpoint's top K of the
    # catalogue (ranker.candidates.learned); cold users take the heuristic sources.
    candidates: str = "heuristic"

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_folder_name(cls, value: str) -> str:
        if value and (not value.replace("-", "").replace("_", "").isalnum()):
            raise ValueError("run_id may hold letters, digits, '-' and '_' only")
        return value

    @field_validator("candidates")
    @classmethod
    def _candidate_source(cls, value: str) -> str:
        if value == "heuristic":
            return value
        if not value.startswith("model:"):
            raise ValueError(f"candidates must be 'heuristic' or 'model:<checkpoint dir>', got {value!r}")
        from ranker.training.checkpoint import read_checkpoint_meta  # only when a model is named: torch is heavy

        try:
            meta = read_checkpoint_meta(value.removeprefix("model:"))
        except FileNotFoundError as exc:
            raise ValueError(f"candidates: {exc}") from None
        if meta.get("objective") != "next_item":
            raise ValueError(f"candidates: {value} was trained with the {meta.get('objective', 'impression')} "
                             "objective; a candidate source needs the next-item objective "
                             "(climber train --split loo --objective next-item)")
        return value

    def resolved_run_id(self) -> str:
        return self.run_id or f"sim-s{self.sim.seed}-{time.strftime('%Y%m%d-%H%M%S')}"

    def run_dir(self) -> Path:
        return self.out / self.resolved_run_id()
