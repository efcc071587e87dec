"""`climber scaling`, `scaling-seeds`, `growth-study` and `hop-window-study` (also `python -m studies.<name>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from sandbox.cli_options import (MultiValueCommand, choice_help, family as family_name, overrides_option,
                                 parse_family_override, parse_override, size as size_name)
from sandbox.cli_options import _registry

scaling_app = typer.Typer(add_completion=False)
scaling_seeds_app = typer.Typer(add_completion=False)
growth_study_app = typer.Typer(add_completion=False)
hop_window_app = typer.Typer(add_completion=False)


@scaling_app.command("scaling", cls=MultiValueCommand)
def scaling(
    db: Path = typer.Option(...),
    out: Path = typer.Option(...),
    families: Optional[list[str]] = typer.Option(
        None, parser=family_name, metavar="FAMILY...", callback=lambda v: list(v or _registry("family")),
        help=choice_help("family", "families to train, one or more (default: every family)")),
    sizes: list[str] = typer.Option(["xs", "s", "m", "l"], parser=size_name, metavar="SIZE...",
                                 help=choice_help("size", "ladder rungs, one or more")),
    epochs: float = typer.Option(1.0),
    steps: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    max_len: int = typer.Option(64),
    seed: int = typer.Option(0),
    eval_window_h: float = typer.Option(24.0),
    device: str = typer.Option("auto"),
    sizes_only: bool = typer.Option(False, "--sizes-only", help="print params and FLOPs per request, train nothing"),
    overrides: list[str] = typer.Option([], "--set", parser=parse_family_override, metavar="FAMILY:KEY=VALUE",
                                        help="model config override for one family, repeatable "
                                             "(e.g. --set astro:n_layers=1)"),
) -> Any:
    """The scaling ladder: several sizes per family, power-law fit, table, plot, HTML."""
    from studies.scaling import run_scaling

    return run_scaling(db, out, list(families), list(sizes), epochs=epochs, steps=steps,
                       batch_size=batch_size, lr=lr, max_len=max_len, seed=seed, eval_window_h=eval_window_h,
                       device=device, sizes_only=sizes_only, overrides=overrides)


@scaling_seeds_app.command("scaling-seeds", cls=MultiValueCommand)
def scaling_seeds(
    ladders: list[Path] = typer.Argument(..., help="`climber scaling` output folders, one per seed"),
    out: Path = typer.Option(...),
) -> Any:
    """Ladders that differ only in --seed, side by side: means, paired ASTRO-vs-baseline tests, fits."""
    from studies.scaling_seeds import write_reports

    return write_reports(ladders, out)


@growth_study_app.command("growth-study", cls=MultiValueCommand)
def growth_study(
    db: Path = typer.Option(...),
    out: Path = typer.Option(...),
    family: str = typer.Option("astro", parser=family_name, metavar="FAMILY", help=choice_help("family")),
    size: str = typer.Option("s", parser=size_name, metavar="SIZE", help=choice_help("size")),
    seeds: list[int] = typer.Option([0, 1, 2], help="seeds, one or more: each trains dense and grow-prune"),
    epochs: float = typer.Option(1.0),
    steps: Optional[int] = typer.Option(None),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    max_len: int = typer.Option(64),
    eval_window_h: float = typer.Option(24.0),
    device: str = typer.Option("auto"),
    growth: list[str] = typer.Option([], "--growth", parser=parse_override, metavar="KEY=VALUE",
                                     help="grow-and-prune setting, repeatable (density, update_every, swap_fraction, "
                                          "dense_from, grow_init, regrow, implementation)"),
    overrides: list[str] = overrides_option(),
    short_share: Optional[float] = typer.Option(None, help="dense-short's budget as a share of dense's (e.g. the "
                                                "wall-time ratio from `climber bench growth`); default: "
                                                "grow-prune's FLOPs share"),
    short: bool = typer.Option(True, help="also dense-short (--no-short: dense and grow-prune only, a schedule "
                                          "sweep's quality screen)"),
) -> Any:
    """Alternate growth and pruning against dense training, paired by seed: table, plot, HTML."""
    from ranker.training.growth import GrowthConfig
    from studies.growth_study import Budget, run_study

    budget = Budget(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, max_len=max_len)
    return run_study(db, out, family, size, seeds, budget, GrowthConfig.from_dict(dict(growth)),
                     int(eval_window_h * 3_600_000), device, overrides=dict(overrides), short_share=short_share, short=short)


@hop_window_app.command("hop-window-study", cls=MultiValueCommand)
def hop_window_study(
    run: Path = typer.Option(..., help="an experiment run's folder (warm_up.duckdb, sandbox.duckdb)"),
    hop: int = typer.Option(16),
    sizes: list[str] = typer.Option(["xs", "s", "m"], parser=size_name, metavar="SIZE...",
                                    help=choice_help("size", "ASTRO sizes, one or more")),
) -> Any:
    """The hop window's full-play GAUC cost against a training seed's, and with hop-window training."""
    from studies.hop_window import run_hop_window

    return run_hop_window(run, hop, list(sizes))
