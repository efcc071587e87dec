"""The scaling ladder: every family at several sizes, same data, same budget rule.

    python -m studies.scaling --db runs/<id>/sandbox.duckdb --out runs/<id>/scaling \\
        --families astro sasrec hstu --sizes xs s m l --epochs 1 [--set astro:n_layers=1 ...]

`--set FAMILY:KEY=VALUE` overrides a model-config field of one family at every rung (as
`climber train --set` does for one model); the overrides are part of a rung's key in
`ladder.jsonl`, so a rung trained under other overrides is never reused.

Training compute of a rung is C = 3 x (forward FLOPs per request) x (requests seen): the
forward pass plus a backward pass costing about two forwards. Per family we fit the
held-out loss L(C) = a * (C / C0)^(-b) + c with scipy's curve_fit, C0 being the family's
smallest compute (it keeps the fit well conditioned; a is the loss above the floor c at
C0), and report R^2. With four or five rungs and three parameters the fit describes the
trend; it is not evidence of a law.

Outputs in `out_dir`: `ladder.jsonl` (one line per trained rung; rungs already there are
reused, so an interrupted ladder picks up where it stopped), `scaling.csv`, `scaling.md`,
`scaling.png` (all families, log compute vs val loss, with fitted curves), `scaling.html`.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy.optimize import OptimizeWarning, curve_fit

from ranker.batch import TASKS
from ranker.training.ceiling import ORACLE_KEY, POPULARITY_KEY, ceiling_metrics, gap_closed
from ranker.training.data import DAY_MS, load_request_log, split_by_time
from ranker.models import FAMILIES, build_model, resolve_config
from ranker.models.config import config_differences
from studies.reports import display_frame, markdown_table, write_html_report
from ranker.training.train import TrainConfig, config_overrides, parse_override, train

console = Console()
LADDER_FILE = "ladder.jsonl"


@dataclass(frozen=True)
class Budget:
    """The same rule for every rung: `steps` optimizer steps if set, else `epochs` passes."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    max_len: int = 64
    seed: int = 0


@dataclass(frozen=True)
class PowerLawFit:
    family: str
    a: float
    b: float
    c: float
    c0: float  # compute the fit is normalised by
    r2: float
    n_points: int

    def predict(self, compute: np.ndarray) -> np.ndarray:
        return power_law(np.asarray(compute, dtype=np.float64) / self.c0, self.a, self.b, self.c)


def power_law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a * np.power(x, -b) + c


def fit_power_law(family: str, compute: np.ndarray, loss: np.ndarray) -> PowerLawFit:
    """Least-squares fit of loss = a (C/C0)^-b + c with a, b, c >= 0; NaN if it cannot."""
    compute, loss = np.asarray(compute, np.float64), np.asarray(loss, np.float64)
    keep = np.isfinite(compute) & np.isfinite(loss) & (compute > 0)
    compute, loss = compute[keep], loss[keep]
    c0 = float(compute.min()) if len(compute) else float("nan")
    if len(compute) < 3:
        return PowerLawFit(family, math.nan, math.nan, math.nan, c0, math.nan, len(compute))
    x = compute / c0
    guess = (max(float(loss.max() - loss.min()), 1e-3), 0.3, max(float(loss.min()) * 0.9, 0.0))
    try:
        with warnings.catch_warnings():  # three rungs fit exactly: no covariance, which we don't use
            warnings.simplefilter("ignore", OptimizeWarning)
            (a, b, c), _ = curve_fit(power_law, x, loss, p0=guess, bounds=([0, 0, 0], [np.inf, 5.0, np.inf]),
                                     maxfev=20_000)
    except (RuntimeError, ValueError):
        return PowerLawFit(family, math.nan, math.nan, math.nan, c0, math.nan, len(compute))
    residual = float(np.sum((loss - power_law(x, a, b, c)) ** 2))
    total = float(np.sum((loss - loss.mean()) ** 2))
    r2 = 1.0 - residual / total if total > 0 else math.nan
    return PowerLawFit(family, float(a), float(b), float(c), c0, r2, len(compute))


# ----------------------------------------------------------------------------- running the ladder

def run_key(fields: dict[str, Any], overrides: dict[str, Any] | None = None) -> str:
    """Identity of a finished run (a ladder rung, a growth-study run) in its results file;
    overrides enter only when given, so keys written before `--set` existed still match."""
    return json.dumps({**fields, **({"overrides": overrides} if overrides else {})}, sort_keys=True)


def _rung_key(family: str, size: str, budget: Budget, overrides: dict[str, Any] | None = None) -> str:
    return run_key({"family": family, "size": size, **asdict(budget)}, overrides)


def parse_family_override(text: str) -> tuple[str, str, Any]:
    """`FAMILY:KEY=VALUE` -> (family, key, value); VALUE is read as `climber train --set` reads it."""
    family, sep, rest = text.partition(":")
    if not sep or not family.strip():
        raise ValueError(f"--set expects FAMILY:KEY=VALUE (e.g. astro:n_layers=1), got {text!r}")
    key, value = parse_override(rest)
    return family.strip(), key, value


def family_overrides(items: Sequence[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    overrides: dict[str, dict[str, Any]] = {}
    for family, key, value in items:
        overrides.setdefault(family, {})[key] = value
    return overrides


def read_done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["key"]: row for row in rows}


def run_ladder(db_path: str | Path, out_dir: str | Path, families: Sequence[str] = FAMILIES,
               sizes: Sequence[str] = ("xs", "s", "m", "l"), budget: Budget = Budget(),
               eval_window_ms: int = DAY_MS, device: str = "auto", progress: bool = True,
               overrides: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Train every (family, size) on one loaded split under `budget`, with `overrides[family]`
    applied to that family's config at every rung; write the reports; return the table."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(families))
    if unknown:
        raise ValueError(f"--set names families {unknown} that are not on the ladder {list(families)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = split_by_time(load_request_log(db_path), eval_window_ms)
    console.print(f"ladder on {db_path}: {len(data.train):,} train requests ({data.train.n_impressions:,} impressions), "
                  f"{len(data.eval):,} eval requests; budget {asdict(budget)}")
    ladder_path = out_dir / LADDER_FILE
    done = read_done(ladder_path)
    for family in families:
        for size in sizes:
            key = _rung_key(family, size, budget, overrides.get(family))
            config = resolve_config(family, size, data.train.n_tracks,
                                    **config_overrides(budget.max_len, overrides.get(family))).to_dict()
            if key in done:
                check_reusable(done[key], config, ladder_path)
                console.print(f"{family}-{size}: reusing the result in {ladder_path}")
                continue
            result = train(TrainConfig(family, size, None, out_dir / f"{family}-{size}", epochs=budget.epochs,
                                       steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr,
                                       seed=budget.seed, max_len=budget.max_len, device=device, checkpoint_every=0,
                                       model_overrides=overrides.get(family)), progress=progress, data=data)
            row = {"key": key, **{k: v for k, v in result.to_dict().items() if k != "loss_history"}, "config": config}
            with ladder_path.open("a") as f:
                f.write(json.dumps(row, default=float) + "\n")
            done[key] = row
    rows = [done[_rung_key(f, s, budget, overrides.get(f))] for f in families for s in sizes]
    table = ladder_table(rows)
    ceiling = ceiling_metrics(db_path, data.train, data.eval)  # the same evaluation impressions for every rung
    table["gap_closed"] = [gap_closed(g, ceiling[POPULARITY_KEY], ceiling[ORACLE_KEY]) for g in table["gauc_full_play"]]
    console.print(f"full-play GAUC on the same evaluation: popularity {ceiling[POPULARITY_KEY]:.4f}, oracle "
                  f"{ceiling[ORACLE_KEY]:.4f}; gap_closed = (model - popularity) / (oracle - popularity)")
    write_reports(table, out_dir, budget, overrides)
    return table


def check_reusable(row: dict, config: dict[str, Any], results_path: Path) -> None:
    """A finished run's key (a ladder rung, a growth-study run) names its family, size,
    budget and overrides, not the defaults, so a result trained before a default changed
    would be reused silently; rows keep the model config they trained, and one that differs
    from today's is refused. (Rows written before configs were kept cannot be checked.)"""
    recorded = row.get("config")
    if recorded is None:
        return
    changed = config_differences(recorded, config)
    if changed:
        raise ValueError(f"{row['family']}-{row['size']} in {results_path} was trained with another config "
                         f"({'; '.join(changed)}): the defaults changed since; write the results into a new --out")


def ladder_table(rows: Sequence[dict]) -> pd.DataFrame:
    records = []
    for row in rows:
        m = row["metrics"]
        record = {"family": row["family"], "size": row["size"], "params": row["n_params"],
                  "flops_per_request": row["flops_per_request"], "compute": row["train_compute"],
                  "steps": row["steps"], "train_s": row["train_seconds"], "val_loss": m["loss"],
                  "ndcg@10": m["ndcg@10"]}
        for task in TASKS:
            record[f"auc_{task}"] = m[f"auc/{task}"]
            record[f"gauc_{task}"] = m[f"gauc/{task}"]
        records.append(record)
    return pd.DataFrame.from_records(records)


def fit_families(table: pd.DataFrame) -> list[PowerLawFit]:
    return [fit_power_law(family, group["compute"].to_numpy(), group["val_loss"].to_numpy())
            for family, group in table.groupby("family", sort=False)]


# ----------------------------------------------------------------------------- reports

def _fits_frame(fits: Sequence[PowerLawFit]) -> pd.DataFrame:
    return pd.DataFrame([{"family": f.family, "a": f.a, "b": f.b, "c": f.c, "C0": f.c0, "R2": f.r2, "points": f.n_points}
                         for f in fits])


def plot_ladder(table: pd.DataFrame, fits: Sequence[PowerLawFit], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_family = {f.family: f for f in fits}
    for i, (family, group) in enumerate(table.groupby("family", sort=False)):
        colour = f"C{i}"
        ax.scatter(group["compute"], group["val_loss"], color=colour, label=family, zorder=3)
        for _, row in group.iterrows():
            ax.annotate(row["size"], (row["compute"], row["val_loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        fit = by_family.get(family)
        if fit is not None and np.isfinite(fit.a):
            grid = np.geomspace(group["compute"].min(), group["compute"].max(), 100)
            ax.plot(grid, fit.predict(grid), color=colour, linestyle="--",
                    label=f"{family}: {fit.a:.3g}(C/C0)^-{fit.b:.3g} + {fit.c:.3g}, R²={fit.r2:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs = 3 x forward FLOPs/request x requests seen)")
    ax.set_ylabel("held-out loss (sum of per-task BCE)")
    ax.set_title("Scaling ladder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(table: pd.DataFrame, out_dir: Path, budget: Budget,
                  overrides: dict[str, dict[str, Any]] | None = None) -> list[PowerLawFit]:
    """CSV, markdown, PNG and HTML of the ladder, and the rich table on the terminal."""
    fits = fit_families(table)
    table.to_csv(out_dir / "scaling.csv", index=False)
    fits_frame = _fits_frame(fits)
    setup = json.dumps(asdict(budget)) + (f"; overrides {json.dumps(overrides)}" if overrides else "")
    markdown = (f"# Scaling ladder\n\nBudget: {setup}\n\n"
                f"{markdown_table(display_frame(table))}\n\n## Fits: val_loss = a (C/C0)^-b + c\n\n"
                f"{markdown_table(display_frame(fits_frame))}\n")
    (out_dir / "scaling.md").write_text(markdown)
    plot_ladder(table, fits, out_dir / "scaling.png")
    write_html_report(out_dir / "scaling.html", "Scaling ladder",
                      f"Budget: {setup}. Compute C = 3 x forward FLOPs per request x requests seen.",
                      out_dir / "scaling.png", "compute vs held-out loss",
                      [("Rungs", table), ("Fits: val_loss = a (C/C0)<sup>-b</sup> + c", fits_frame)])
    print_table(table, fits)
    return fits


def print_table(table: pd.DataFrame, fits: Sequence[PowerLawFit]) -> None:
    """The headline columns on the terminal (every task's AUC/GAUC is in the CSV/markdown)."""
    columns = ["family", "size", "params", "flops_per_request", "compute", "val_loss", "ndcg@10",
               "auc_full_play", "gauc_full_play", "gap_closed", "auc_like", "auc_skip", "train_s"]
    rich_table = Table(title="Scaling ladder")
    for column in columns:
        rich_table.add_column(column, justify="left" if column in ("family", "size") else "right", no_wrap=True)
    for _, row in display_frame(table[columns]).iterrows():
        rich_table.add_row(*row.tolist())
    # Redirected output has no terminal width; don't squeeze the table into 80 columns.
    out = console if console.is_terminal else Console(width=200)
    out.print(rich_table)
    for fit in fits:
        out.print(describe_fit(fit))


def describe_fit(fit: PowerLawFit) -> str:
    """One line per family; says why there is no fit instead of printing NaNs."""
    if fit.n_points < 3:
        return f"{fit.family}: no power-law fit: {fit.n_points} size(s), the fit needs at least 3"
    if not math.isfinite(fit.a):
        return f"{fit.family}: no power-law fit: least squares did not converge over {fit.n_points} sizes"
    return (f"{fit.family}: val_loss = {fit.a:.4g} (C/{fit.c0:.3g})^-{fit.b:.4g} + {fit.c:.4g}, "
            f"R² = {fit.r2:.4f} over {fit.n_points} sizes")


def size_table(n_tracks: int, families: Sequence[str], sizes: Sequence[str], history_len: int, n_candidates: int,
               overrides: dict[str, dict[str, Any]] | None = None) -> pd.DataFrame:
    """Parameters and forward FLOPs per request of every rung, without training."""
    rows = []
    for family in families:
        for size in sizes:
            extra = (overrides or {}).get(family, {})
            model = build_model(family, size, n_tracks, **{"max_len": max(history_len, 1), **extra})
            rows.append({"family": family, "size": size, "params": model.n_params(),
                         "params_no_embeddings": model.n_params(include_embeddings=False),
                         "flops_per_request": model.flops_per_request(history_len, n_candidates)})
    return pd.DataFrame(rows)


def run_scaling(db: Path, out: Path, families: Sequence[str], sizes: Sequence[str], *, epochs: float = 1.0,
                steps: int | None = None, batch_size: int = 64, lr: float = 1e-3, max_len: int = 64, seed: int = 0,
                eval_window_h: float = 24.0, device: str = "auto", sizes_only: bool = False,
                overrides: Sequence[tuple[str, str, Any]] = ()) -> pd.DataFrame:
    """`climber scaling`: the ladder, or with `sizes_only` its params and FLOPs per request."""
    by_family = family_overrides(overrides)
    if sizes_only:
        log = load_request_log(db)
        m = max(1, round(float(np.mean(log.candidate_count))))
        table = size_table(log.n_tracks, families, sizes, max_len, m, by_family)
        console.print(table.to_string(index=False))
        return table
    budget = Budget(epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, max_len=max_len, seed=seed)
    return run_ladder(db, out, families, sizes, budget, eval_window_ms=int(eval_window_h * 3_600_000), device=device,
                      overrides=by_family)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """`python -m studies.scaling`: the `climber` command of the same name."""
    from sandbox.cli_options import run_command
    from studies.cli import scaling_app

    return run_command(scaling_app, argv, "python -m studies.scaling")


if __name__ == "__main__":
    main()
