"""The experiment file: one YAML document that describes a whole simulated A/B test.

    name, salt, seed           -> the run folder runs/<name>/, the assignment hash, the world
    sim                        -> simulator.config.SimConfig fields (not seed or days: those
                                  come from `seed` and the phases)
    phases.warm_up             -> days served by the logging policy (popularity + exploration)
    phases.train               -> the one budget rule every neural arm is trained with
    phases.ab                  -> days of the closed-loop A/B test
    arms                       -> arm -> a baseline name, checkpoint:DIR, oracle, or
                                  {family, size, overrides} trained in the run
    metrics                    -> the primary metrics and the test settings

Validation is pydantic's, so an error names the field (e.g. `phases.ab.days: Input should be
greater than or equal to 1`). `--set key=value` edits the document before validation with
dotted keys (`--set sim.n_users=3000 --set phases.ab.days=3`); values are read as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from simulator.config import SimConfig

BASELINES = ("popularity", "cooccurrence")
REFERENCE_ARMS = ("oracle",)  # ranks the candidates by the simulator's true engagement
PER_USER_METRICS = ("listening_minutes", "plays", "full_plays", "skips", "likes", "shares", "playlist_adds",
                    "sessions", "active_days", "distinct_artists")
RATIO_METRICS = {"full_play_rate": ("full_played_impressions", "impressions"),
                 "skip_rate": ("skipped_impressions", "impressions")}
METRICS = PER_USER_METRICS + tuple(RATIO_METRICS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WarmUp(Strict):
    days: int = Field(2, ge=1, le=60, description="whole days, so every day in the report is a full one")
    policy: Literal["popularity", "cooccurrence"] = "popularity"
    exploration: float = Field(0.2, ge=0, le=1, description="P(a slate position shows a random candidate instead)")


class Train(Strict):
    """The budget rule: every size sees the same requests (same epochs, batch, history length,
    learning rate and seed), so a lift between sizes is the model's, not its budget's."""

    epochs: float = Field(1.0, gt=0, le=100)
    steps: int | None = Field(None, ge=1, description="optimizer steps; given, it replaces epochs")
    batch_size: int = Field(64, ge=1)
    max_len: int = Field(64, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0)
    seed: int = Field(0, ge=0)
    eval_days: float = Field(0.25, gt=0, description="last part of the warm-up log held out for offline metrics")


class AB(Strict):
    days: int = Field(2, ge=1, le=60, description="whole days of A/B traffic")


class Retrain(Strict):
    """The budget of each recurring fine-tune (`climber train --resume-from`): the same for every arm."""

    steps: int = Field(50, ge=1, description="optimizer steps per fine-tune, on the log so far")
    lr: float = Field(3e-4, gt=0)


class Serving(Strict):
    """How the trained arms serve (ranker.serving): the same for every arm."""

    window_hop: int = Field(1, ge=1, description="the served history window's start moves in steps of this many "
                            "events (ranker.window); 1 slides it with every event past max_len")


class Phases(Strict):
    warm_up: WarmUp = Field(default_factory=WarmUp)
    train: Train = Field(default_factory=Train)
    ab: AB = Field(default_factory=AB)
    retrain_every: int | None = Field(None, ge=1, description="days between fine-tunes of every trained arm during "
                                      "the A/B phase (\"1d\" or 1); none by default")
    retrain: Retrain = Field(default_factory=Retrain)

    @field_validator("retrain_every", mode="before")
    @classmethod
    def _days(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().endswith("d") and value.strip()[:-1].strip().isdigit():
            return int(value.strip()[:-1])
        return value


class TrainedArm(Strict):
    family: Literal["astro", "sasrec", "hstu"]
    size: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    share: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _known_size(self) -> "TrainedArm":
        from ranker.models import model_class

        sizes = model_class(self.family).SIZES
        if self.size not in sizes:
            raise ValueError(f"size {self.size!r} is not a {self.family} size; known: {list(sizes)}")
        return self


class FixedArm(Strict):
    ranker: str
    share: float = Field(1.0, gt=0)

    @field_validator("ranker")
    @classmethod
    def _known_ranker(cls, value: str) -> str:
        if value in BASELINES or value in REFERENCE_ARMS:
            return value
        if not value.startswith("checkpoint:"):
            raise ValueError(f"unknown ranker {value!r}; expected one of {[*BASELINES, *REFERENCE_ARMS]}, "
                             "checkpoint:DIR or {family, size}")
        from ranker.training.checkpoint import META_FILE

        if not (Path(value.removeprefix("checkpoint:")) / META_FILE).exists():
            raise ValueError(f"{value!r} is not a checkpoint folder (no {META_FILE} in it)")
        return value


def _arm_kind(value: Any) -> str:
    """A trained arm names a family; anything else names a ranker (errors then name its fields)."""
    if isinstance(value, dict):
        return "trained" if "family" in value else "fixed"
    return "trained" if isinstance(value, TrainedArm) else "fixed"


Arm = Annotated[Union[Annotated[TrainedArm, Tag("trained")], Annotated[FixedArm, Tag("fixed")]],
                Discriminator(_arm_kind)]


class Metrics(Strict):
    primary: list[Literal[METRICS]] = Field(default_factory=lambda: ["full_plays", "listening_minutes"])  # type: ignore[valid-type]
    confidence: float = Field(0.95, gt=0.5, lt=1)
    cuped: bool = True
    # Mixing scale of the always-valid (mSPRT) interval, in relative lift: the size of
    # effect the daily peeks are tuned to find. Any value keeps the interval valid.
    sequential_tau: float = Field(0.1, gt=0)


class ExperimentSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    salt: str = Field(min_length=1)
    seed: int = Field(42, ge=0)
    sim: dict[str, Any] = Field(default_factory=dict)
    phases: Phases = Field(default_factory=Phases)
    arms: dict[str, Arm]
    control: str = "control"
    metrics: Metrics = Field(default_factory=Metrics)
    serving: Serving = Field(default_factory=Serving)

    @field_validator("arms", mode="before")
    @classmethod
    def _short_arms(cls, arms: Any) -> Any:
        """`arm: popularity` is short for `arm: {ranker: popularity}`."""
        if isinstance(arms, dict):
            return {arm: {"ranker": value} if isinstance(value, str) else value for arm, value in arms.items()}
        return arms

    @field_validator("sim")
    @classmethod
    def _sim_fields(cls, sim: dict[str, Any]) -> dict[str, Any]:
        for owned in ("seed", "days"):
            if owned in sim:
                raise ValueError(f"{owned} is set by the experiment ({'seed' if owned == 'seed' else 'phases'}), "
                                 "not under sim")
        SimConfig(**sim)  # its errors name the simulator field
        return sim

    @model_validator(mode="after")
    def _arms(self) -> "ExperimentSpec":
        if len(self.arms) < 2:
            raise ValueError("arms: an A/B test needs at least two arms")
        for arm in self.arms:
            if not 0 < len(arm) <= 64 or not arm.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"arms: arm name {arm!r} must be 1-64 letters, digits, '-' or '_'")
        if self.control not in self.arms:
            raise ValueError(f"control: {self.control!r} is not one of the arms {list(self.arms)}")
        if self.serving.window_hop > self.phases.train.max_len:
            raise ValueError(f"serving.window_hop {self.serving.window_hop} exceeds phases.train.max_len "
                             f"{self.phases.train.max_len}: the window would hold fewer than one token after a hop")
        return self

    # -- derived ----------------------------------------------------------------------------

    @property
    def days(self) -> int:
        return self.phases.warm_up.days + self.phases.ab.days

    def sim_config(self) -> SimConfig:
        return SimConfig(**{**self.sim, "seed": self.seed, "days": float(self.days)})

    def shares(self) -> dict[str, float]:
        total = sum(a.share for a in self.arms.values())
        return {arm: a.share / total for arm, a in self.arms.items()}

    def trained_arms(self) -> dict[str, TrainedArm]:
        return {arm: a for arm, a in self.arms.items() if isinstance(a, TrainedArm)}


def apply_overrides(document: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` edits of a parsed experiment file (values read as YAML)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE with a dotted key (e.g. sim.n_users=3000), got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = document
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {key}: {part!r} is not a section of the experiment file")
            node = child
        node[leaf] = yaml.safe_load(text)
    return document


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    """The validated experiment; a ValueError names the file and every bad field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no experiment file at {path}")
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{path}: an experiment file is a YAML mapping (name, salt, sim, phases, arms, metrics)")
    document = apply_overrides(document, overrides or [])
    try:
        return ExperimentSpec.model_validate(document)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in error['loc'] if p not in ('trained', 'fixed'))}: {error['msg']}"
                 for error in exc.errors()]
        raise ValueError(f"{path}: invalid experiment\n  " + "\n  ".join(lines)) from None
