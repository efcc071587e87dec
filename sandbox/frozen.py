"""Frozen, dated configs: the commands behind every reported figure, kept where they can be rerun.

A figure in `docs/results.md` is only as good as the means to get it again. Each file in
`configs/` is named `<date>-<name>.yaml` and holds when and where the figures were
measured, the commit of the code they came from, the `climber` commands that produced
them in order, and the resolved config of every model those commands train.

`check_frozen` keeps the files honest as the code moves on:
- every step must still parse with today's `climber` (a renamed flag breaks the file, not
  a reader following `results.md` months later);
- every model a step trains must resolve, from today's size table and defaults, to the
  config recorded when the figures were measured. A changed default therefore fails here,
  and the fix is to pin the old value in the frozen step (`--set key=value`) or to measure
  again under a new date, never to edit the recorded config.

`reproduce` runs the steps, each as its own `climber` process, so a step is exactly what
a user would type.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class FrozenModel(BaseModel):
    """One model a step trains: which rung, which `--set` overrides, and what they resolved to."""

    model_config = ConfigDict(extra="forbid")
    family: str
    size: str
    overrides: dict[str, Any] = Field(default_factory=dict)  # as the step passes them, max_len included
    config: dict[str, Any]  # the resolved model config, n_tracks included (the data decides it)


class FrozenConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(description="the file name without .yaml: <date>-<name>")
    date: dt.date = Field(description="when the figures were measured")
    reports: str = Field(description="where the figures are reported: a section of docs/results.md, or of a "
                         "journal in docs/history/ once they are superseded")
    machine: str = Field(description="where they were measured (docs/results.md names the boxes)")
    commit: str = Field(description="the commit of the code the figures came from")
    notes: str = ""
    steps: list[str] = Field(min_length=1, description="shell-quoted commands, run in order from the repository root")
    models: list[FrozenModel] = Field(default_factory=list)
    user_model: Literal[1, 2, 3] | None = Field(
        None, description="the simulator user model the figures were measured on; unset: 1 before "
                          "simulator.config.USER_MODEL_2_DATE, 2 from it, 3 from USER_MODEL_3_DATE "
                          "(name it where that is not so)")

    def measured_user_model(self) -> int:
        from simulator.config import USER_MODEL_2_DATE, USER_MODEL_3_DATE

        if self.user_model is not None:
            return self.user_model
        date = self.date.isoformat()
        return 1 if date < USER_MODEL_2_DATE else 2 if date < USER_MODEL_3_DATE else 3


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    family: str
    size: str
    overrides: dict[str, Any]

    def key(self) -> tuple:
        """Identity of the model; values as JSON, so a tuple override parsed from a step and
        the list YAML gives back for it (e.g. `behaviour_groups`) are the same model."""
        return self.family, self.size, tuple(sorted((k, json.dumps(v)) for k, v in self.overrides.items()))


def load_frozen(path: str | Path) -> FrozenConfig:
    """Read and validate one frozen config; a malformed file says which field is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return FrozenConfig.model_validate(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def frozen_paths(folder: Path = CONFIG_DIR) -> list[Path]:
    return sorted(folder.glob("*.yaml"))


# ----------------------------------------------------------------------------- steps

def climber_argv(step: str) -> list[str]:
    """The arguments after `climber` in a step (a wrapper such as `/usr/bin/time -v` may come first)."""
    words = shlex.split(step)
    if "climber" not in words:
        raise ValueError("not a climber command")
    return words[words.index("climber") + 1:]


@functools.cache
def _climber_command():
    """The `climber` command tree, built once (typer builds it anew on every call)."""
    from sandbox.cli import app

    return typer.main.get_command(app)  # a click command (typer's own copy of click since 0.2x)


def parse_step(argv: list[str]) -> tuple[str, argparse.Namespace]:
    """Parse a step as `climber` would, without running it: the command's name (e.g.
    "bench growth") and its parsed flags, by parameter name (`--set` as `overrides`)."""
    if "--help" in argv or "-h" in argv:  # click would print help and exit mid-check
        raise ValueError("asks for --help, which prints usage instead of running")
    command = _climber_command()
    ctx = typer.Context(command, info_name="climber")
    names: list[str] = []
    while hasattr(command, "get_command"):  # a group: the next word names a subcommand
        if not argv:
            raise ValueError(f"'climber {' '.join(names)}' needs a subcommand")
        sub = command.get_command(ctx, argv[0])
        if sub is None:
            raise ValueError(f"no command {' '.join([*names, argv[0]])!r}")
        names.append(argv[0])
        command, argv = sub, argv[1:]
        ctx = typer.Context(command, info_name=names[-1], parent=ctx)
    name = " ".join(names)
    try:
        leaf = command.make_context(names[-1], list(argv), parent=ctx.parent)
    except Exception as exc:  # click's usage errors, whichever copy of click raised them
        if not hasattr(exc, "format_message"):
            raise
        raise ValueError(exc.format_message()) from None
    return name, argparse.Namespace(**leaf.params)


def _trained_by_train(args: argparse.Namespace) -> list[TrainedModel]:
    from ranker.training.cli import DEFAULT_MAX_LEN
    from ranker.training.train import config_overrides

    if args.resume_from is not None:  # the model is the checkpoint's, trained by an earlier step
        return []
    return [TrainedModel(args.model, args.size, config_overrides(args.max_len or DEFAULT_MAX_LEN,
                                                                 dict(args.overrides)))]


def _trained_by_scaling(args: argparse.Namespace) -> list[TrainedModel]:
    from studies.scaling import family_overrides
    from ranker.training.train import config_overrides

    if args.sizes_only:
        return []
    extra = family_overrides(args.overrides)
    return [TrainedModel(family, size, config_overrides(args.max_len, extra.get(family)))
            for family in args.families for size in args.sizes]


def _trained_by_one_family(args: argparse.Namespace) -> list[TrainedModel]:
    from ranker.training.train import config_overrides

    return [TrainedModel(args.family, args.size, config_overrides(args.max_len, dict(args.overrides)))]


def _experiment_spec(args: argparse.Namespace):
    """The experiment file an `experiment run` step runs, with its `--set` overrides."""
    from experiments.spec import load_spec

    path = Path(args.file) if Path(args.file).is_absolute() else CONFIG_DIR.parent / args.file
    try:
        return load_spec(path, list(args.set_ or []))
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


def _trained_by_experiment(args: argparse.Namespace) -> list[TrainedModel]:
    from ranker.training.train import config_overrides

    spec = _experiment_spec(args)
    return [TrainedModel(arm.family, arm.size, config_overrides(spec.phases.train.max_len, dict(arm.overrides)))
            for arm in spec.trained_arms().values()]


TRAINS: dict[str, Callable[[argparse.Namespace], list[TrainedModel]]] = {
    "train": _trained_by_train, "scaling": _trained_by_scaling,
    "growth-study": _trained_by_one_family, "bench growth": _trained_by_one_family,
    "experiment run": _trained_by_experiment,
}


def trained_models(parsed: list[tuple[str, argparse.Namespace]]) -> Iterator[tuple[int, TrainedModel]]:
    """(step number, model) for every model the parsed steps train, each once."""
    seen: set[tuple] = set()
    for number, (name, args) in enumerate(parsed, 1):
        for model in TRAINS[name](args) if name in TRAINS else []:
            if model.key() not in seen:
                seen.add(model.key())
                yield number, model


# ----------------------------------------------------------------------------- checks

def check_frozen(config: FrozenConfig, path: Path | None = None) -> list[str]:
    """Everything that keeps this file from reproducing its figures with today's code."""
    from ranker.models.config import config_differences
    from ranker.models import resolve_config

    problems: list[str] = []
    if path is not None and path.stem != config.id:
        problems.append(f"id {config.id!r} is not the file name {path.stem!r}")
    if not config.id.startswith(config.date.isoformat()):
        problems.append(f"id {config.id!r} does not start with its date {config.date.isoformat()}")
    parsed, unparsed = [], []
    for number, step in enumerate(config.steps, 1):
        try:
            parsed.append(parse_step(climber_argv(step)))
        except ValueError as exc:
            unparsed.append(f"step {number} ({step}): {exc}")
    if unparsed:  # which models the steps train is unknown until they parse
        return problems + unparsed
    problems += _unpinned_simulator_steps(config, parsed)
    recorded = {TrainedModel(m.family, m.size, m.overrides).key(): m for m in config.models}
    for number, model in trained_models(parsed):
        frozen = recorded.pop(model.key(), None)
        label = f"step {number}: {model.family} {model.size} {model.overrides}"
        if frozen is None:
            problems.append(f"{label}: no recorded config (run `climber reproduce --freeze-models`)")
            continue
        try:
            now = resolve_config(model.family, model.size, frozen.config["n_tracks"], **model.overrides)
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"{label}: does not resolve today: {exc}")
            continue
        problems += [f"{label}: {line}" for line in config_differences(frozen.config, now.to_dict())]
    problems += [f"recorded model {m.family} {m.size} {m.overrides} is trained by no step" for m in recorded.values()]
    return problems


# Commands that run the simulator: their figures depend on its user model (simulator/config.py).
SIMULATING = {"simulate", "sandbox", "bench sim", "bench stream", "experiment run"}


def _step_user_model(step: str, name: str, args: argparse.Namespace | None) -> int:
    """The user model a simulating step runs on wherever it is run: the experiment file's
    `sim.user_model` (or its `--set`) first, then the step's `env` pin, else today's default."""
    from simulator.config import DEFAULT_USER_MODEL, USER_MODEL_ENV

    if name == "experiment run" and args is not None:
        pinned = _experiment_spec(args).sim.get("user_model")
        if pinned is not None:
            return int(pinned)
    words = shlex.split(step)
    for word in words[:words.index("climber")]:
        if word.startswith(f"{USER_MODEL_ENV}="):
            return int(word.split("=", 1)[1])
    return DEFAULT_USER_MODEL


def _unpinned_simulator_steps(config: FrozenConfig, parsed: list[tuple[str, argparse.Namespace | None]]) -> list[str]:
    """Every simulating step must run on the user model the figures were measured on: a config
    measured on model 1 pins it (`env CLIMBER_SIM__USER_MODEL=1`, or `sim.user_model: 1` in an
    experiment file), so neither today's default nor the reader's environment decides."""
    from simulator.config import USER_MODEL_ENV

    measured = config.measured_user_model()
    problems = []
    for number, (step, (name, args)) in enumerate(zip(config.steps, parsed), 1):
        if name not in SIMULATING or _step_user_model(step, name, args) == measured:
            continue
        fix = (f"`sim.user_model: {measured}` in its experiment file or `--set sim.user_model={measured}`"
               if name == "experiment run" else f"`env {USER_MODEL_ENV}={measured}`")
        problems.append(f"step {number} ({step}): measured on simulator user model {measured}; pin it with {fix}")
    return problems


def freeze_models(config: FrozenConfig, n_tracks: int) -> FrozenConfig:
    """The config with `models` resolved from today's code, for a new frozen file."""
    from ranker.models import resolve_config

    models = [FrozenModel(family=m.family, size=m.size, overrides=m.overrides,
                          config=resolve_config(m.family, m.size, n_tracks, **m.overrides).to_dict())
              for _, m in trained_models([parse_step(climber_argv(step)) for step in config.steps])]
    return config.model_copy(update={"models": models})


class _Dumper(yaml.SafeDumper):
    """Steps on one line each, lists of plain values inline: a file people read in review."""


def _represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
    inline = all(isinstance(v, (str, int, float, bool)) for v in value) or all(
        isinstance(v, list) and all(isinstance(x, (str, int, float, bool)) for x in v) for v in value)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=inline and bool(value))


_Dumper.add_representer(list, _represent_list)


def write_frozen(config: FrozenConfig, path: Path) -> None:
    data = config.model_dump(mode="json")
    if data["user_model"] is None:  # the date says it
        del data["user_model"]
    steps = data.pop("steps")
    text = yaml.dump({k: v for k, v in data.items() if k != "models"}, Dumper=_Dumper, sort_keys=False,
                     width=10_000, allow_unicode=True)
    text += yaml.safe_dump({"steps": steps}, sort_keys=False, width=10_000, allow_unicode=True)  # one per line
    text += yaml.dump({"models": data["models"]}, Dumper=_Dumper, sort_keys=False, width=10_000, allow_unicode=True)
    path.write_text(text)


# ----------------------------------------------------------------------------- running

def reproduce(config: FrozenConfig, say: Callable[[str], None] = print, climber: list[str] | None = None) -> None:
    """Run the steps in order from the repository root; the first failing step stops the run."""
    climber = climber or [sys.executable, "-m", "sandbox.cli"]
    root = CONFIG_DIR.parent
    for number, step in enumerate(config.steps, 1):
        words = shlex.split(step)
        at = words.index("climber")
        say(f"[{number}/{len(config.steps)}] {step}")
        completed = subprocess.run([*words[:at], *climber, *words[at + 1:]], cwd=root)
        if completed.returncode != 0:
            raise RuntimeError(f"step {number} exited with {completed.returncode}: {step}")
