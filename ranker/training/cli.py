"""`climber train` (also `python -m ranker.training.train` and torchrun): flags -> TrainConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from sandbox.cli_options import choice_help, family as family_name, size as size_name, MultiValueCommand, overrides_option, parse_override

train_app = typer.Typer(add_completion=False)
DEFAULT_MAX_LEN = 256  # without --resume-from (which takes the checkpoint's)


@train_app.command("train", cls=MultiValueCommand)
def train(
    model: Optional[str] = typer.Option(None, parser=family_name, metavar="FAMILY",
                                        help=choice_help("family") + "; with --resume-from, the checkpoint's"),
    size: Optional[str] = typer.Option(None, parser=size_name, metavar="SIZE",
                                       help=choice_help("size") + "; with --resume-from, the checkpoint's"),
    db: Path = typer.Option(..., help="DuckDB event log (runs/<id>/sandbox.duckdb)"),
    out: Path = typer.Option(..., help="checkpoint folder"),
    epochs: float = typer.Option(1.0),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (overrides --epochs)"),
    batch_size: int = typer.Option(64, help="global batch, in requests"),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    max_len: Optional[int] = typer.Option(None, help="history length [default: 256; with --resume-from, the "
                                          "checkpoint's]"),
    eval_window_h: float = typer.Option(24.0, help="hours at the end of the log held out"),
    checkpoint_every: int = typer.Option(500),
    resume: bool = typer.Option(False, "--resume"),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", metavar="CHECKPOINT",
                                               help="recurring training: continue this trained model (weights and "
                                                    "optimizer state) on --db, a newer log; no grow-and-prune"),
    overrides: list[str] = overrides_option(),
    grow_prune: bool = typer.Option(False, "--grow-prune", help="alternate growth and pruning (arXiv 2105.01064): "
                                    "sparse, then full-size at the end"),
    growth: list[str] = typer.Option([], "--growth", parser=parse_override, metavar="KEY=VALUE",
                                     help="grow-and-prune setting, repeatable (density, update_every, swap_fraction, "
                                          "dense_from, grow_init, regrow=init|restore, implementation=sliced|masked); "
                                          "implies --grow-prune"),
) -> Any:
    """Train a ranker: --model astro|sasrec|hstu --size xs|s|m|l|xl --db RUN.duckdb."""
    from ranker.training.checkpoint import read_checkpoint_meta
    from ranker.training.growth import GrowthConfig
    from ranker.training.train import TrainConfig, run_from_flags

    if resume_from is not None:
        meta = read_checkpoint_meta(resume_from)
        model, size = model or meta["family"], size or meta["size"]
        max_len = max_len or meta["config"]["max_len"]
    if model is None or size is None:
        raise typer.BadParameter("--model and --size are required (or --resume-from CHECKPOINT)")
    max_len = max_len or DEFAULT_MAX_LEN
    config = TrainConfig(model, size, db, out, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         device=device, resume=resume, max_len=max_len,
                         eval_window_ms=int(eval_window_h * 3_600_000), checkpoint_every=checkpoint_every,
                         model_overrides=dict(overrides),
                         growth=GrowthConfig.from_dict(dict(growth)) if grow_prune or growth else None,
                         resume_from=resume_from)
    return run_from_flags(config)
