"""`climber experiment run FILE` and `climber experiment report RUN` (a typer sub-app)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

experiment_app = typer.Typer(help="Simulated A/B experiments described by one file (experiments/examples/).",
                             no_args_is_help=True)


@experiment_app.command("run")
def run(
    file: Path = typer.Argument(..., help="an experiment file, e.g. experiments/examples/model_sizes.yaml"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE with a dotted key, repeatable "
                                             "(e.g. --set sim.n_users=3000 --set phases.ab.days=3)"),
    out: Path = typer.Option(Path("runs"), help="folder for runs; the run goes to OUT/<name>/"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Warm-up, training and the A/B test of one experiment file; then its report."""
    from experiments.spec import load_spec

    try:
        spec = load_spec(file, set_ or [])
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"experiment: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    from experiments.report import report
    from experiments.runner import run_experiment

    try:
        run_dir = run_experiment(spec, out, progress=not quiet)
    except FileExistsError as exc:
        typer.secho(f"experiment: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    path = report(run_dir)
    typer.echo(f"\nresults: {run_dir}\n  DuckDB: {run_dir / 'sandbox.duckdb'}\n  report: {path}")


@experiment_app.command("report")
def report_command(run: Path = typer.Argument(..., help="a run folder (runs/<name>) or its sandbox.duckdb")) -> None:
    """Rebuild report.html, its plots and the terminal summary from a run's DuckDB file."""
    from experiments.report import report

    try:
        path = report(run)
    except (FileNotFoundError, ValueError) as exc:
        typer.secho(f"experiment report: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"\nreport: {path}")
