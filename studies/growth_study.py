"""Does alternate growth and pruning pay? The same model and data trained three ways, per seed:

- `dense`: the full model for the whole budget;
- `grow-prune`: sparse for most of the budget, full-size at the end (ranker.training.growth);
- `dense-short`: the full model for as many steps as give the grow-prune run's Linear FLOPs
  (its measured share of the dense run's, times the budget), so grow-and-prune is compared
  with simply training less for the same work as well as with training dense. With
  `short_share` (`--short-share`), that share of the budget instead: the wall-time ratio
  `climber bench growth` measured, for "the same wall time" (the study's own runs count
  FLOPs, so their train_s is no timing).

    python -m studies.growth_study --db runs/<id>/sandbox.duckdb --out runs/<id>/growth \\
        --family astro --size s --seeds 0 1 2 3 4 --epochs 1 [--growth density=0.5 ...]

Differences are paired by seed (same initialisation and data order) and tested with scipy's
paired t-test. Outputs in `out_dir`: `study.jsonl` (one line per run; runs already there are
reused), `growth.csv`, `growth.md`, `growth.png`, `growth.html`, and a table on the terminal.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table
from scipy import stats

from ranker.batch import TASKS
from ranker.training.data import DAY_MS, load_request_log, split_by_time
from ranker.training.growth import GrowthConfig
from ranker.models import resolve_config
from studies.reports import display_frame, markdown_table, write_html_report
from studies.scaling import Budget, check_reusable, read_done, run_key
from ranker.training.train import TrainConfig, config_overrides, train

console = Console()
STUDY_FILE = "study.jsonl"
VARIANTS = ("dense", "grow-prune", "dense-short")
COMPARED = ("val_loss", "gauc_full_play", "auc_full_play", "ndcg@10")


def _key(variant: str, family: str, size: str, seed: int, budget: Budget, growth: GrowthConfig,
         overrides: dict[str, Any] | None = None, short_share: float | None = None) -> str:
    fields = {"variant": variant, "family": family, "size": size, "seed": seed, "budget": asdict(budget),
              "growth": growth.to_dict() if variant != "dense" else None}
    if variant == "dense-short" and short_share is not None:
        fields["short_share"] = short_share
    return run_key(fields, overrides)


def run_study(db_path: str | Path, out_dir: str | Path, family: str = "astro", size: str = "s",
              seeds: Sequence[int] = (0, 1, 2), budget: Budget = Budget(), growth: GrowthConfig = GrowthConfig(),
              eval_window_ms: int = DAY_MS, device: str = "auto", progress: bool = True,
              overrides: dict[str, Any] | None = None, short_share: float | None = None,
              short: bool = True) -> pd.DataFrame:
    """Train the three variants at every seed (reusing finished runs), each with the model
    config `overrides` (as `climber train --set`); write the reports. `short_share`: the
    dense-short budget as a share of the dense one (default: grow-prune's FLOPs share).
    `short=False` trains dense and grow-prune only (a schedule sweep's quality screen)."""
    if short_share is not None and not 0 < short_share <= 1:
        raise ValueError(f"short_share must be in (0, 1], got {short_share}")
    if budget.steps is None and budget.epochs <= 0:
        raise ValueError("the budget needs steps or epochs > 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = split_by_time(load_request_log(db_path), eval_window_ms)
    console.print(f"growth study on {db_path}: {family}-{size}, seeds {list(seeds)}, budget "
                  f"{budget.steps or budget.epochs} {'steps' if budget.steps else 'epochs'} of {budget.batch_size}; "
                  f"grow-and-prune {growth.to_dict()}")
    path = out_dir / STUDY_FILE
    done = read_done(path)
    config = resolve_config(family, size, data.train.n_tracks, **config_overrides(budget.max_len, overrides)).to_dict()

    def run(variant: str, seed: int, steps: int | None, with_growth: bool) -> dict:
        """One run; `steps=None` is the budget itself (the trainer's rule for epochs)."""
        key = _key(variant, family, size, seed, budget, growth, overrides, short_share)
        if key in done:
            check_reusable(done[key], config, path)
            return done[key]
        result = train(TrainConfig(family, size, None, out_dir / f"{variant}-seed{seed}", epochs=budget.epochs,
                                   steps=budget.steps if steps is None else steps, batch_size=budget.batch_size,
                                   lr=budget.lr, seed=seed, max_len=budget.max_len, device=device,
                                   checkpoint_every=0, count_linear_flops=True,
                                   growth=growth if with_growth else None,
                                   model_overrides=overrides), progress=progress, data=data)
        row = {"key": key, "variant": variant, "seed": seed,
               **{k: v for k, v in result.to_dict().items() if k != "loss_history"}, "config": config}
        with path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")
        done[key] = row
        return row

    rows = []
    for seed in seeds:
        dense = run("dense", seed, None, with_growth=False)
        sparse = run("grow-prune", seed, None, with_growth=True)
        share = short_share or sparse["linear_flops"]["linear_flops_done"] / dense["linear_flops"]["linear_flops_done"]
        rows += [dense, sparse]
        if short:
            rows.append(run("dense-short", seed, max(1, round(share * dense["steps"])), with_growth=False))
    table = study_table(rows)
    write_reports(table, out_dir, budget, growth, f"{family}-{size}"
                  + (f", dense-short at {short_share} of the budget" if short_share else ""))
    return table


def study_table(rows: Sequence[dict]) -> pd.DataFrame:
    records = []
    for row in rows:
        m, counted = row["metrics"], row["linear_flops"]
        record = {"variant": row["variant"], "seed": row["seed"], "steps": row["steps"],
                  "linear_flops": counted["linear_flops_done"], "train_s": row["train_seconds"],
                  "val_loss": m["loss"], "ndcg@10": m["ndcg@10"]}
        for task in TASKS:
            record[f"auc_{task}"] = m[f"auc/{task}"]
            record[f"gauc_{task}"] = m[f"gauc/{task}"]
        records.append(record)
    table = pd.DataFrame.from_records(records)
    dense_flops = table[table.variant == "dense"].set_index("seed")["linear_flops"]
    table["flops_vs_dense"] = table["linear_flops"] / table["seed"].map(dense_flops)
    return table


def paired_differences(table: pd.DataFrame) -> pd.DataFrame:
    """grow-prune minus each other variant, per metric, paired by seed: mean, sd, t-test p."""
    wide = table.pivot(index="seed", columns="variant")
    records = []
    for other in [v for v in ("dense", "dense-short") if v in set(table.variant)]:
        for metric in COMPARED:
            diff = (wide[metric]["grow-prune"] - wide[metric][other]).to_numpy()
            p = float(stats.ttest_rel(wide[metric]["grow-prune"], wide[metric][other]).pvalue) if len(diff) > 1 else float("nan")
            records.append({"against": other, "metric": metric, "mean_diff": float(diff.mean()),
                            "sd_diff": float(diff.std(ddof=1)) if len(diff) > 1 else float("nan"),
                            "grow_prune_ahead": f"{int((diff < 0).sum() if metric == 'val_loss' else (diff > 0).sum())} of {len(diff)}",
                            "p_paired_t": p})
    return pd.DataFrame.from_records(records)


def plot_study(table: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("gauc_full_play", "val_loss")):
        for i, variant in enumerate(VARIANTS):
            group = table[table.variant == variant]
            if group.empty:
                continue
            ax.scatter(group["flops_vs_dense"], group[metric], color=f"C{i}", label=variant, alpha=0.8)
            ax.errorbar(group["flops_vs_dense"].mean(), group[metric].mean(), yerr=group[metric].std(ddof=1) if len(group) > 1 else None,
                        color=f"C{i}", marker="D", markersize=8, capsize=4)
        ax.set_xlabel("training Linear FLOPs, share of the dense run's")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Alternate growth and pruning: {title} (points: seeds; diamonds: mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(table: pd.DataFrame, out_dir: Path, budget: Budget, growth: GrowthConfig, title: str) -> None:
    table.to_csv(out_dir / "growth.csv", index=False)
    diffs = paired_differences(table)
    means = table.groupby("variant", sort=False)[["steps", "flops_vs_dense", *COMPARED, "train_s"]].mean().reset_index()
    shared = {k: v for k, v in asdict(budget).items() if k != "seed"}  # each run has its own seed
    setup = f"{title}; budget {json.dumps(shared)}; grow-and-prune {json.dumps(growth.to_dict())}"
    (out_dir / "growth.md").write_text(
        f"# Alternate growth and pruning\n\n{setup}\n\n## Means over seeds\n\n{markdown_table(display_frame(means))}\n\n"
        f"## grow-prune minus the others, paired by seed\n\n{markdown_table(display_frame(diffs))}\n\n"
        f"## Runs\n\n{markdown_table(display_frame(table))}\n")
    plot_study(table, out_dir / "growth.png", title)
    write_html_report(out_dir / "growth.html", "Alternate growth and pruning", setup, out_dir / "growth.png",
                      "Linear FLOPs against GAUC and loss",
                      [("Means over seeds", means), ("grow-prune minus the others, paired by seed", diffs), ("Runs", table)])
    out = console if console.is_terminal else Console(width=200)
    for frame, name in ((means, f"Growth study {title}: means over seeds"), (diffs, "grow-prune minus the others")):
        rich_table = Table(title=name)
        for column in frame.columns:
            rich_table.add_column(str(column), justify="right", no_wrap=True)
        for _, row in display_frame(frame).iterrows():
            rich_table.add_row(*row.tolist())
        out.print(rich_table)
    out.print(f"reports in {out_dir}: growth.md, growth.csv, growth.png, growth.html")


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """`python -m studies.growth_study`: the `climber` command of the same name."""
    from sandbox.cli_options import run_command
    from studies.cli import growth_study_app

    return run_command(growth_study_app, argv, "python -m studies.growth_study")


if __name__ == "__main__":
    main()
