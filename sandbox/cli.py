"""The `climber` command line. Commands import their machinery lazily so `--help` is instant."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bench.cli import bench_app
from experiments.cli import experiment_app
from ranker.serving.cli import serve_app
from ranker.training.cli import data_app, public_app, train_app
from streaming.cli import worker_app
from studies.cli import growth_study_app, hop_window_app, paired_gauc_app, scaling_app, scaling_seeds_app

app = typer.Typer(help="Climber Sandbox: simulator, streaming features, ASTRO ranking, A/B tests.",
                  no_args_is_help=True, add_completion=False)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(topics_app, name="topics")
app.add_typer(experiment_app, name="experiment")
app.add_typer(data_app, name="data")


def _parse_rankers(items: Optional[list[str]]) -> Optional[dict[str, str]]:
    """`--ranker ARM=RANKER` flags as {arm: ranker}; a malformed one stops with the reason."""
    if not items:
        return None
    rankers: dict[str, str] = {}
    for item in items:
        arm, sep, spec = item.partition("=")
        if not sep or not arm.strip() or not spec.strip():
            typer.secho(f"--ranker expects ARM=RANKER (e.g. treatment=checkpoint:models/astro-m), got {item!r}",
                        fg="red", err=True)
            raise typer.Exit(2)
        if arm.strip() in rankers:
            typer.secho(f"--ranker names arm {arm.strip()!r} twice", fg="red", err=True)
            raise typer.Exit(2)
        rankers[arm.strip()] = spec.strip()
    return rankers


def _settings(users: Optional[int], tracks: Optional[int], days: Optional[float], seed: Optional[int],
              out: Optional[Path], rankers: Optional[dict[str, str]] = None, **extra):
    """Flags override environment variables, which override defaults. `rankers` replaces the
    experiment's arms: the configured traffic shares when it names the same arms, else an
    equal split."""
    from pydantic import ValidationError

    from sandbox.settings import SandboxSettings

    try:
        base = SandboxSettings()
        sim_overrides = {k: v for k, v in {"n_users": users, "n_tracks": tracks, "days": days, "seed": seed}.items()
                         if v is not None}
        top = {k: v for k, v in {"out": out, **extra}.items() if v is not None}
        data = base.model_dump()
        data["sim"].update(sim_overrides)
        data.update(top)
        if rankers:
            arms = data["experiment"]["arms"]
            data["experiment"]["arms"] = arms if set(arms) == set(rankers) else {arm: 1.0 for arm in rankers}
            data["experiment"]["rankers"] = rankers
        return SandboxSettings.model_validate(data)
    except ValidationError as exc:
        typer.secho(f"invalid settings:\n{exc}", fg="red", err=True)
        raise typer.Exit(2)


@app.command()
def sandbox(
    users: Optional[int] = typer.Option(None, help="simulated users"),
    tracks: Optional[int] = typer.Option(None, help="catalog size"),
    days: Optional[float] = typer.Option(None, help="simulated days"),
    seed: Optional[int] = typer.Option(None, help="random seed (same seed, same event log)"),
    out: Optional[Path] = typer.Option(None, help="folder for runs (default runs/)"),
    run_id: Optional[str] = typer.Option(None, help="run folder name (default derived from seed and time)"),
    transport: Optional[str] = typer.Option(None, help="embedded (default) or kafka"),
    workers: Optional[int] = typer.Option(None, help="Faust worker subprocesses with --transport kafka"),
    ranker: Optional[list[str]] = typer.Option(
        None, "--ranker", help="ARM=RANKER, repeatable: the A/B arms (popularity, cooccurrence, checkpoint:DIR or http://HOST:PORT)"),
    candidates: Optional[str] = typer.Option(
        None, "--candidates", help="heuristic (default) or model:CHECKPOINT, a next-item model's top K of the catalogue"),
) -> None:
    """Run the closed loop: simulator -> events -> features -> ranker -> simulator."""
    settings = _settings(users, tracks, days, seed, out, rankers=_parse_rankers(ranker), run_id=run_id,
                         transport=transport, workers=workers, candidates=candidates)
    from sandbox.loop import run_sandbox
    from sandbox.report import print_summary, write_report

    from sandbox.kafka_transport import FeaturePathLost

    try:
        result = run_sandbox(settings, show_progress=True)
    except FeaturePathLost as exc:  # the broker or a worker is gone: stop, saying what was lost
        typer.secho(f"sandbox stopped: {exc}", fg="red", err=True)
        raise typer.Exit(3)
    print_summary(result)
    report = write_report(result)
    typer.echo(f"\nresults: {result.run_dir}\n  DuckDB: {result.db_path}\n  report: {report}")


@app.command()
def replay(
    source: Path = typer.Argument(..., help="a run's sandbox.duckdb, or JSON lines of events (.jsonl/.ndjson, .gz)"),
    out: Optional[Path] = typer.Option(None, help="folder for runs (default runs/)"),
    run_id: Optional[str] = typer.Option(None, help="the replay's run folder (default replay-<time>)"),
    transport: Optional[str] = typer.Option(None, help="embedded (default) or kafka"),
    workers: Optional[int] = typer.Option(None, help="Faust worker subprocesses with --transport kafka"),
    max_seq_len: Optional[int] = typer.Option(None, help="sequence length to rebuild features with"),
    chunk: int = typer.Option(50_000, help="events per chunk read from the source"),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify",
                                          help="compare Feast with sequences recomputed from the log (default: on "
                                               "unless the workers run elsewhere)"),
    into: Optional[str] = typer.Option(None, "--into", metavar="redis://HOST:PORT[/DB]",
                                       help="rebuild this live Redis-protocol online store in place: every user "
                                            "and track in the log gets the row the log gives (stop its workers "
                                            "first; runbook in docs/streaming.md)"),
) -> None:
    """Replay an event log through the feature path into a new run: rebuild Feast, re-drive Kafka."""
    import time

    store = {}
    if into is not None:
        if not into.startswith(("redis://", "rediss://")):
            typer.secho(f"replay: --into {into!r}: expected redis://host:port[/db]", fg="red", err=True)
            raise typer.Exit(2)
        store = {"online_store": "redis", "redis_url": into}
    settings = _settings(None, None, None, None, out, run_id=run_id or f"replay-{time.strftime('%Y%m%d-%H%M%S')}",
                         transport=transport, workers=workers, max_seq_len=max_seq_len, **store)
    from rich.console import Console
    from rich.table import Table

    from sandbox.replay import replay as run_replay
    from sandbox.report import feature_rows

    try:
        result = run_replay(source, settings, chunk_events=chunk, verify=verify, progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        typer.secho(f"replay: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    table = Table(title=f"Replay of {source}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [("events read", f"{result.events_read:,}"), ("events applied", f"{result.events_applied:,}"),
            ("dead letters", f"{result.dead_letters:,}"),
            *((f"  {reason}", f"{n:,}") for reason, n in result.dead_letter_reasons.items()),
            ("users", f"{result.users:,}"), ("feature rows written", feature_rows(result.feature_rows_written)),
            ("wall seconds", f"{result.wall_seconds:.1f}"), ("events/s", f"{result.events_per_second:,.0f}"),
            ("verified users", f"{result.verified_users:,}" if result.verified_users else "not verified"),
            ("mismatched users", f"{len(result.mismatched_users):,}"),
            *((("source events not recorded", f"{result.unrecorded_events:,}"),
               ("recorded events not in the source", f"{result.unexpected_events:,}")) if result.verified_users else ())]
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    typer.echo(f"\nreplay: {result.run_dir}\n  DuckDB: {result.db_path}\n  summary: {result.run_dir / 'replay.json'}")
    if not result.ok:
        if result.mismatched_users:
            typer.secho(f"{len(result.mismatched_users)} users' sequences in Feast differ from the source, "
                        f"e.g. {result.mismatched_users[:5]}", fg="red", err=True)
        if result.unrecorded_events or result.unexpected_events:
            typer.secho(f"the run's record differs from the source: {result.unrecorded_events:,} events not "
                        f"recorded, {result.unexpected_events:,} recorded that the source does not hold",
                        fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def export(
    db: Path = typer.Argument(..., help="a run's sandbox.duckdb"),
    out: Path = typer.Option(..., help="JSON-lines file to write (.jsonl/.ndjson, .gz to compress)"),
) -> None:
    """A run's event log as JSON lines, one raw event per line, for `climber replay` and other tools."""
    from sandbox.replay import export_event_log

    try:
        written = export_event_log(db, out, progress=True)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        typer.secho(f"export: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"{written:,} events -> {out}")


@app.command()
def ab(
    db: Path = typer.Argument(..., help="a sandbox run's sandbox.duckdb"),
    control: str = typer.Option("control", help="the arm every other arm is compared with"),
    confidence: float = typer.Option(0.95, min=0.5, max=0.999, help="confidence level of the intervals"),
) -> None:
    """A/B lift of every arm against one of them (e.g. a larger model against a smaller one)."""
    from rich.console import Console

    from experiments.analysis import ab_report, ceiling_from_record, configured_shares
    from sandbox.report import ceiling_table, lift_tables

    if not db.exists():
        typer.secho(f"ab: no run record at {db}", fg="red", err=True)
        raise typer.Exit(2)
    try:
        lift, srm = ab_report(db, configured_shares(db), control, confidence)
    except ValueError as exc:
        typer.secho(f"ab: {exc}", fg="red", err=True)
        raise typer.Exit(2)
    console = Console()
    for table in lift_tables(lift, srm, control, confidence):
        console.print(table)
    ceiling = ceiling_from_record(db, control)
    if ceiling is not None:
        console.print(ceiling_table(ceiling))
    if srm.mismatch:
        typer.secho(f"sample-ratio mismatch (p = {srm.p_value:.2g}): users per arm {srm.observed} do not match "
                    f"the configured shares; do not trust these lifts", fg="red", err=True)


@app.command()
def simulate(
    users: Optional[int] = typer.Option(None), tracks: Optional[int] = typer.Option(None),
    days: Optional[float] = typer.Option(None), seed: Optional[int] = typer.Option(None),
    out: Optional[Path] = typer.Option(None), run_id: Optional[str] = typer.Option(None),
    policy: str = typer.Option("random", help="random, popularity or oracle"),
) -> None:
    """Simulator only, under a reference policy, into DuckDB: training data for `climber train`."""
    settings = _settings(users, tracks, days, seed, out, run_id=run_id)
    from sandbox.policy_log import POLICIES, simulate_policy_log

    if policy not in POLICIES:
        typer.secho(f"--policy must be one of {', '.join(POLICIES)}, not {policy!r}", fg="red", err=True)
        raise typer.Exit(2)
    typer.echo(f"event log: {simulate_policy_log(settings, policy)}")


@topics_app.command("create")
def topics_create(
    bootstrap: Optional[str] = typer.Option(None, help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP)"),
    partitions: Optional[int] = typer.Option(None, help="partitions of `events` (default 4)"),
) -> None:
    """Create `events`, `events.by_track` and `events.dlq` (kafka-python admin), and register Feast."""
    from streaming.settings import StreamSettings
    from streaming.worker import prepare_stream

    overrides = {k: v for k, v in {"bootstrap": bootstrap, "partitions": partitions}.items() if v is not None}
    settings = StreamSettings(**overrides)
    created = prepare_stream(settings)
    typer.echo(f"topics on {settings.bootstrap}: {', '.join(created) if created else 'all existed already'}")


@app.command()
def broker(port: int = typer.Option(9092, help="port on 127.0.0.1"),
           host: str = typer.Option("127.0.0.1", help="address to listen on")) -> None:
    """A local Kafka-protocol broker (Tansu, memory storage) without Docker or a JVM; Ctrl-C stops it."""
    import time

    from streaming.broker import start_broker

    running = start_broker(port=port, host=host)
    typer.echo(f"Tansu listening on {running.bootstrap} (KAFKA_BOOTSTRAP={running.bootstrap}); Ctrl-C to stop")
    try:
        while running.process.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()


@app.command()
def reproduce(
    configs: Optional[list[Path]] = typer.Argument(None, help="frozen configs (default: every file in configs/)"),
    check: bool = typer.Option(False, "--check", help="only check that the steps still parse and the models "
                               "still resolve to the recorded configs; run nothing"),
    freeze_models: Optional[int] = typer.Option(
        None, "--freeze-models", metavar="N_TRACKS",
        help="write the resolved config of every model the steps train (catalog of N_TRACKS) into the file, "
             "then check it as --check does; runs nothing"),
) -> None:
    """Rerun the commands behind reported figures from their frozen, dated configs (configs/)."""
    from sandbox.frozen import check_frozen, freeze_models as freeze, frozen_paths, load_frozen, reproduce as run
    from sandbox.frozen import write_frozen

    paths = configs or frozen_paths()
    if not paths:
        typer.secho("no frozen configs given and none in configs/", fg="red", err=True)
        raise typer.Exit(2)
    failed = False
    for path in paths:
        try:
            config = load_frozen(path)
            if freeze_models is not None:
                write_frozen(freeze(config, freeze_models), path)
                config = load_frozen(path)
            problems = check_frozen(config, path)
        except ValueError as exc:
            problems = [str(exc)]
        for problem in problems:
            typer.secho(f"{path}: {problem}", fg="red", err=True)
        failed |= bool(problems)
        if not problems and not check and freeze_models is None:  # freezing records results already run
            try:
                run(config, say=typer.echo)
            except RuntimeError as exc:
                typer.secho(f"{path}: {exc}", fg="red", err=True)
                raise typer.Exit(1)
        elif not problems:
            typer.echo(f"{path}: {len(config.steps)} steps parse, {len(config.models)} recorded model configs match")
    if failed:
        raise typer.Exit(1)


# Each area's commands live beside the code they drive (light modules: machinery loads lazily).
for area in (train_app, public_app, scaling_app, scaling_seeds_app, growth_study_app, hop_window_app, paired_gauc_app, serve_app,
             worker_app):
    app.registered_commands += area.registered_commands


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
