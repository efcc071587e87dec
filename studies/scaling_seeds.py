"""Several seeds of one scaling ladder, side by side: what a single seed cannot say.

    python -m studies.scaling_seeds runs/ladder-seed0 runs/ladder-seed1 runs/ladder-seed2 --out runs/ladder-seeds

On our simulator logs one seed's standard deviation of full-play GAUC is about 0.002, the
size of most gaps between families at a rung, so one ladder can put ASTRO ahead or behind
by chance. This reads ladders (`climber scaling` output folders) that differ only in
`--seed` and reports:
- per family and rung: mean and standard deviation over seeds of the held-out loss and
  full-play GAUC, and the FLOPs per request (the same at every seed);
- per rung, ASTRO against each baseline at the same seed: the mean paired GAUC difference,
  on how many seeds ASTRO is ahead, a paired t-test (scipy), and the ratio of FLOPs. The
  issue-3 goal holds at a rung when ASTRO's FLOPs are at or below each baseline's and its
  mean difference is positive; the p-value says how much that rests on;
- per rung, whether that holds against every baseline;
- per family: whether the mean loss falls at every rung, and the power-law fit of the
  mean loss against compute (compute is the same at every seed).

Outputs in `--out`: `seeds.csv`, `versus.csv`, `seeds.md`, `seeds.png`, `seeds.html`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from rich.console import Console
from scipy import stats

from ranker.models.config import SIZE_NAMES
from studies.reports import display_frame, markdown_table, write_html_report
from studies.scaling import LADDER_FILE, PowerLawFit, fit_power_law

console = Console()
GOAL_METRIC = "gauc_full_play"


def read_ladder(folder: Path) -> tuple[int, dict, pd.DataFrame]:
    """(seed, what else the ladder was trained under, its scaling.csv) of one ladder folder."""
    folder = Path(folder)
    table_path, ladder_path = folder / "scaling.csv", folder / LADDER_FILE
    if not table_path.exists() or not ladder_path.exists():
        raise FileNotFoundError(f"{folder}: not a finished ladder (needs scaling.csv and {LADDER_FILE})")
    keys = [json.loads(json.loads(line)["key"]) for line in ladder_path.read_text().splitlines() if line.strip()]
    budgets = {json.dumps({k: v for k, v in key.items() if k not in ("family", "size", "seed", "overrides")},
                          sort_keys=True) for key in keys}
    # `--set FAMILY:KEY=VALUE` gives one family's rungs overrides: one value per family.
    overrides: dict[str, set[str]] = {}
    for key in keys:
        overrides.setdefault(key["family"], set()).add(json.dumps(key.get("overrides"), sort_keys=True))
    seeds = {key["seed"] for key in keys}
    if len(seeds) != 1 or len(budgets) != 1 or any(len(v) != 1 for v in overrides.values()):
        raise ValueError(f"{folder}: its rungs were trained under {len(seeds)} seeds and {len(budgets)} budgets, "
                         f"with --set overrides {sorted(set.union(*overrides.values()))}")
    setup = json.loads(budgets.pop())
    family_overrides = {family: json.loads(v.pop()) for family, v in overrides.items()}
    if any(family_overrides.values()):
        setup["overrides"] = {family: v for family, v in family_overrides.items() if v}
    return seeds.pop(), setup, pd.read_csv(table_path)


def combine(folders: Sequence[Path]) -> pd.DataFrame:
    """Every rung of every ladder, with its seed; refuses ladders that differ in more than the seed."""
    if len(folders) < 2:
        raise ValueError("give at least two ladders (one per seed)")
    frames, setup0, seen = [], None, set()
    for folder in folders:
        seed, setup, table = read_ladder(folder)
        if setup0 is None:
            setup0 = setup
        elif setup != setup0:
            differ = sorted(k for k in set(setup) | set(setup0) if setup.get(k) != setup0.get(k))
            raise ValueError(f"{folder}: differs from {folders[0]} in {differ}, not only in the seed")
        if seed in seen:
            raise ValueError(f"{folder}: seed {seed} is given twice")
        seen.add(seed)
        frames.append(table.assign(seed=seed))
    return pd.concat(frames, ignore_index=True)


def _size_order(sizes: pd.Series) -> pd.Series:
    return sizes.map({name: i for i, name in enumerate(SIZE_NAMES)})


def per_rung(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per family and rung (rungs every seed has)."""
    grouped = runs.groupby(["family", "size"], sort=False)
    table = grouped.agg(seeds=("seed", "nunique"), params=("params", "first"),
                        flops_per_request=("flops_per_request", "first"), compute=("compute", "first"),
                        val_loss=("val_loss", "mean"), val_loss_std=("val_loss", "std"),
                        gauc_full_play=(GOAL_METRIC, "mean"), gauc_full_play_std=(GOAL_METRIC, "std"),
                        auc_full_play=("auc_full_play", "mean"), ndcg_at_10=("ndcg@10", "mean")).reset_index()
    family_order = {f: i for i, f in enumerate(dict.fromkeys(runs["family"]))}  # as the ladders list them
    return table.sort_values(["family", "size"], kind="stable",
                             key=lambda c: _size_order(c) if c.name == "size" else c.map(family_order)
                             ).reset_index(drop=True)


def versus(runs: pd.DataFrame, family: str = "astro") -> pd.DataFrame:
    """`family` against every other family at each rung, paired by seed."""
    rows = []
    columns = ["seed", GOAL_METRIC, "flops_per_request"]
    for other in [f for f in dict.fromkeys(runs["family"]) if f != family]:
        for size in [s for s in SIZE_NAMES if s in set(runs["size"])]:
            mine = runs[(runs["family"] == family) & (runs["size"] == size)][columns]
            theirs = runs[(runs["family"] == other) & (runs["size"] == size)][columns]
            both = mine.merge(theirs, on="seed", suffixes=("", "_other"))
            if both.empty:
                continue
            delta = (both[GOAL_METRIC] - both[f"{GOAL_METRIC}_other"]).to_numpy()
            p = float(stats.ttest_rel(both[GOAL_METRIC], both[f"{GOAL_METRIC}_other"]).pvalue) \
                if len(delta) > 1 and np.ptp(delta) > 0 else float("nan")
            flops_ratio = float(both["flops_per_request"].iloc[0] / both["flops_per_request_other"].iloc[0])
            rows.append({"size": size, "against": other, "seeds": len(delta), "mean_delta_gauc": float(delta.mean()),
                         "seeds_ahead": int((delta > 0).sum()), "paired_t_p": p, "flops_ratio": flops_ratio,
                         "ahead_at_no_more_flops": bool(delta.mean() > 0 and flops_ratio <= 1.0)})
    return pd.DataFrame(rows)


def goal_per_rung(against: pd.DataFrame) -> pd.DataFrame:
    """Issue 3 at each rung: ASTRO ahead of every baseline on mean GAUC at no more FLOPs."""
    return (against.groupby("size", sort=False)
            .agg(baselines=("against", "nunique"), ahead_of=("mean_delta_gauc", lambda d: int((d > 0).sum())),
                 at_no_more_flops_than=("flops_ratio", lambda r: int((r <= 1.0).sum())),
                 goal_met=("ahead_at_no_more_flops", "all"))
            .reset_index())


def loss_trends(table: pd.DataFrame) -> tuple[pd.DataFrame, list[PowerLawFit]]:
    """Per family: does the mean loss fall at every rung, and the power law of the mean loss."""
    rows, fits = [], []
    for family, group in table.groupby("family", sort=False):
        losses = group["val_loss"].to_numpy()
        fit = fit_power_law(family, group["compute"].to_numpy(), losses)
        fits.append(fit)
        rows.append({"family": family, "mean_losses": " > ".join(f"{v:.5f}" for v in losses),
                     "falls_at_every_rung": bool(np.all(np.diff(losses) < 0)), "fit_a": fit.a, "fit_b": fit.b,
                     "fit_c": fit.c, "fit_R2": fit.r2})
    return pd.DataFrame(rows), fits


def plot(table: pd.DataFrame, fits: Sequence[PowerLawFit], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, gauc_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    by_family = {f.family: f for f in fits}
    for i, (family, group) in enumerate(table.groupby("family", sort=False)):
        colour = f"C{i}"
        loss_ax.errorbar(group["compute"], group["val_loss"], yerr=group["val_loss_std"], fmt="o", color=colour,
                         capsize=3, label=family)
        fit = by_family[family]
        if np.isfinite(fit.a):
            grid = np.geomspace(group["compute"].min(), group["compute"].max(), 100)
            loss_ax.plot(grid, fit.predict(grid), color=colour, linestyle="--", label=f"{family} fit, R²={fit.r2:.3f}")
        gauc_ax.errorbar(group["flops_per_request"], group["gauc_full_play"], yerr=group["gauc_full_play_std"],
                         fmt="o-", color=colour, capsize=3, label=family)
        for _, row in group.iterrows():
            gauc_ax.annotate(row["size"], (row["flops_per_request"], row["gauc_full_play"]),
                             textcoords="offset points", xytext=(4, 4), fontsize=8)
    seeds = int(table["seeds"].min())
    loss_ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="held-out loss, mean over seeds",
                title=f"Loss against compute ({seeds} seeds, ±1 std)")
    gauc_ax.set(xscale="log", xlabel="forward FLOPs per request", ylabel="full-play GAUC, mean over seeds",
                title="Full-play GAUC against FLOPs per request")
    for ax in (loss_ax, gauc_ax):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(folders: Sequence[Path], out_dir: Path) -> dict[str, pd.DataFrame]:
    runs = combine(folders)
    table = per_rung(runs)
    against = versus(runs)
    goal = goal_per_rung(against)
    trends, fits = loss_trends(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / "seeds.csv", index=False)
    against.to_csv(out_dir / "versus.csv", index=False)
    seeds = sorted(runs["seed"].unique().tolist())
    intro = f"Ladders {', '.join(str(f) for f in folders)}; seeds {seeds}."
    sections = [("Per rung, mean and std over seeds", table), ("ASTRO against each baseline, paired by seed", against),
                ("The goal at each rung: ahead of every baseline at no more FLOPs", goal),
                ("Mean loss across rungs, and its power-law fit", trends)]
    (out_dir / "seeds.md").write_text(f"# Scaling ladder over seeds\n\n{intro}\n\n" + "\n\n".join(
        f"## {heading}\n\n{markdown_table(display_frame(frame))}" for heading, frame in sections) + "\n")
    plot(table, fits, out_dir / "seeds.png")
    write_html_report(out_dir / "seeds.html", "Scaling ladder over seeds", intro, out_dir / "seeds.png",
                      "loss against compute and GAUC against FLOPs, mean over seeds", sections)
    out = console if console.is_terminal else Console(width=200)
    for heading, frame in sections:
        out.print(f"\n[bold]{heading}[/bold]")
        out.print(display_frame(frame).to_string(index=False))
    out.print(f"\nwritten {out_dir / 'seeds.md'}, {out_dir / 'seeds.png'}, {out_dir / 'seeds.html'}")
    return {"rungs": table, "versus": against, "goal": goal, "trends": trends}


def main(argv: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """`python -m studies.scaling_seeds`: the `climber` command of the same name."""
    from sandbox.cli_options import run_command
    from studies.cli import scaling_seeds_app

    return run_command(scaling_seeds_app, argv, "python -m studies.scaling_seeds")


if __name__ == "__main__":
    main()
