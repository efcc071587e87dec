"""`climber bench ...`: every benchmark's command (also `python -m bench.<name>`).

Figures go to bench/results/ and, with the command and machine, to docs/results.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from sandbox.cli_options import (choice_help, family as family_name, size as size_name, MultiValueCommand, overrides_option,
                                 parse_family_override, parse_override)

bench_app = typer.Typer(help="Benchmarks; figures go to bench/results/ and docs/results.md.", no_args_is_help=True)
# One-command apps for the modules' `python -m` entry points; the same functions as in bench_app.
bench_stream_app = typer.Typer(add_completion=False)
bench_growth_app = typer.Typer(add_completion=False)
bench_serve_app = typer.Typer(add_completion=False)


@bench_app.command("sim")
def bench_sim(
    users: int = typer.Option(2000), tracks: int = typer.Option(20000), days: float = typer.Option(3.0),
    seed: int = typer.Option(7), repeats: int = typer.Option(1),
) -> None:
    """Simulated events/s of the embedded loop with the baseline rankers."""
    from bench.sim import run_bench_sim

    run_bench_sim(users=users, tracks=tracks, days=days, seed=seed, repeats=repeats)


@bench_app.command("feast")
def bench_feast(store: str = typer.Option("sqlite", help="online store: sqlite or redis (a local Valkey)")) -> None:
    """Feast online-store writes and reads: our batched client beside Feast's public API."""
    if store not in ("sqlite", "redis"):
        typer.secho(f"--store must be sqlite or redis, not {store!r}", fg="red", err=True)
        raise typer.Exit(2)
    from bench.feast import run_bench_feast

    run_bench_feast(store)


@bench_stream_app.command("stream", cls=MultiValueCommand)
@bench_app.command("stream", cls=MultiValueCommand)
def bench_stream(
    ctx: typer.Context,
    events: int = typer.Option(200_000),
    workers: list[int] = typer.Option([1, 2], help="worker counts, one or more: one run each"),
    paced_rate: float = typer.Option(5_000),
    split_tracks: bool = typer.Option(False, "--split-tracks",
                                      help="also run each worker count with track_stats in its own process"),
    embedded_only: bool = typer.Option(False, "--embedded-only", help="only the embedded path (no broker, no "
                                       "workers); figures are printed, not saved"),
    coalesce_events: int = typer.Option(2_300, help="with --embedded-only: events per coalesced batch"),
    repeats: int = typer.Option(3, help="with --embedded-only: best of this many runs"),
) -> None:
    """Events/s and freshness from producer to Feast, through Kafka and Faust."""
    from bench.stream import run_bench_stream

    run_bench_stream(events, workers, paced_rate, split_tracks, embedded_only, coalesce_events, repeats,
                     command_args=ctx.meta.get(MultiValueCommand.ARGV, []))


@bench_app.command("growth-profile", cls=MultiValueCommand)
def bench_growth_profile(
    db: Path = typer.Option(...),
    size: str = typer.Option("m", parser=size_name, metavar="SIZE", help=choice_help("size")),
    steps: int = typer.Option(60, help="steps per run (steady sparse steps are counted)"),
    rounds: int = typer.Option(2, help="dense and sliced in turns, this many times; the lower figure kept"),
    batch_size: int = typer.Option(64),
    max_len: int = typer.Option(64),
    growth: list[str] = typer.Option([], "--growth", parser=parse_override, metavar="KEY=VALUE",
                                     help="grow-and-prune setting, repeatable (as `climber train --growth`)"),
    threads: int = typer.Option(1, help="torch threads"),
    name: str = typer.Option("growth-profile", help="results file: bench/results/NAME.json"),
) -> Any:
    """Where an ASTRO training step's CPU time goes, dense against sliced: by phase, and the forward by part."""
    from bench.growth_profile import run_bench_growth_profile
    from ranker.training.growth import GrowthConfig

    return run_bench_growth_profile(db, "astro", size, steps, batch_size, max_len, GrowthConfig.from_dict(dict(growth)),
                                    threads, rounds, name)


@bench_growth_app.command("growth", cls=MultiValueCommand)
@bench_app.command("growth", cls=MultiValueCommand)
def bench_growth(
    db: Path = typer.Option(...),
    family: str = typer.Option("astro", parser=family_name, metavar="FAMILY", help=choice_help("family")),
    size: str = typer.Option("s", parser=size_name, metavar="SIZE", help=choice_help("size")),
    steps: int = typer.Option(100),
    repeats: int = typer.Option(3),
    batch_size: int = typer.Option(64),
    max_len: int = typer.Option(64),
    overrides: list[str] = overrides_option(),
    growth: list[str] = typer.Option([], "--growth", parser=parse_override, metavar="KEY=VALUE",
                                     help="grow-and-prune setting, repeatable (as `climber train --growth`)"),
    floor: bool = typer.Option(True, help="also sliced with one unit per group (what no density removes)"),
    masked: bool = typer.Option(True, help="also the masked reference (as slow as dense; --no-masked in sweeps)"),
    threads: int = typer.Option(1, help="torch threads"),
    name: str = typer.Option("growth", help="results file: bench/results/NAME.json"),
    track_gradient: str = typer.Option("sparse", help="the track table's gradient path: sparse (the reference, the trainer's default), rows "
                                       "or both (adds dense-sparse and sliced-sparse to the same rounds)"),
) -> Any:
    """Training wall and CPU time per step and per run: dense, masked and sliced grow-and-prune, side by side."""
    from bench.growth import run_bench_growth
    from ranker.training.growth import GrowthConfig

    return run_bench_growth(db, family, size, steps, repeats, batch_size, max_len, dict(overrides),
                            GrowthConfig.from_dict(dict(growth)), floor, threads, masked, name, track_gradient)


@bench_serve_app.command("serve", cls=MultiValueCommand)
@bench_app.command("serve", cls=MultiValueCommand)
def bench_serve(
    quick: bool = typer.Option(False, "--quick", help="small sizes: a smoke run, not for reporting"),
    size: str = typer.Option("s", parser=size_name, metavar="SIZE", help=choice_help("size")),
    threads: Optional[int] = typer.Option(None),
    service_seconds: float = typer.Option(15.0),
    overrides: list[str] = overrides_option(),
) -> Any:
    """TURBO serving: batched vs per-pair scoring, KV cache, partitioning, service latency."""
    from bench.serve import run_bench_serve

    return run_bench_serve(quick, size, threads, service_seconds, overrides=dict(overrides))


def family_label(value: str) -> str:
    """FAMILY or FAMILY@NAME (a labelled variant of FAMILY)."""
    family, at, name = value.partition("@")
    if at and not name.strip():
        raise typer.BadParameter(f"{value!r}: a variant label needs a name after '@' (e.g. astro@3g)")
    return family_name(family) + (at + name.strip() if at else "")


def history_mix(value: str) -> str:
    from bench.serve_common import HISTORY_MIXES

    if value.endswith(".duckdb"):
        if not Path(value).exists():
            raise typer.BadParameter(f"--mix {value}: no such event log")
        return value
    if value not in HISTORY_MIXES:
        raise typer.BadParameter(f"unknown history mix {value!r}; known: {', '.join(HISTORY_MIXES)} or a .duckdb log")
    return value


@bench_app.command("serve-long", cls=MultiValueCommand)
def bench_serve_long(
    sizes: list[str] = typer.Option(["m", "l"], help="ladder sizes, one or more (depth and width of the shared ladder)"),
    lengths: list[int] = typer.Option([256, 512, 1024, 2048, 4096], help="history lengths n, one or more"),
    candidates: int = typer.Option(200, "--candidates", "-M"),
    sumi_size: str = typer.Option("l", parser=size_name, metavar="SIZE"),
    sumi_n: int = typer.Option(1024),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:i"),
    threads: int = typer.Option(1, help="torch threads on CPU"),
    min_seconds: float = typer.Option(1.0, help="time each path at least this long (best of N)"),
    families: list[str] = typer.Option(["astro", "hstu", "sasrec"], parser=family_label, metavar="FAMILY...",
                                       help="families timed in turns; FAMILY@NAME adds a variant of FAMILY "
                                            "(its own --set FAMILY@NAME:KEY=VALUE), timed in the same turns"),
    overrides: list[str] = typer.Option([], "--set", parser=parse_family_override, metavar="FAMILY:KEY=VALUE",
                                        help="a variant: config override for one family or label, repeatable "
                                             "(e.g. --set astro:candidate_path=shared)"),
    sumi: bool = typer.Option(True, "--sumi/--no-sumi", help="also the SUMI and incremental ratios (part 2)"),
    mix: str = typer.Option("sandbox", help="the histories' behaviour and scenario mix: sandbox (the simulator "
                                            "log's shares), uniform, or a .duckdb event log (the last n tokens "
                                            "of its longest history); it sets ASTRO's block lengths"),
    save_as: str = typer.Option("serve_long", help="bench/results/NAME.json and .png"),
) -> Any:
    """Cost against history length (ASTRO, HSTU, SASRec) and SUMI/incremental ratios beside FLOP ratios."""
    import torch

    from bench.serve_long import run_bench_serve_long

    by_family: dict[str, dict[str, Any]] = {}
    for family, key, value in overrides:
        if family not in families:
            raise typer.BadParameter(f"--set names {family!r}, which is not in --families {families}")
        by_family.setdefault(family, {})[key] = value
    torch.set_num_threads(threads)
    return run_bench_serve_long(tuple(size_name(s) for s in sizes), tuple(lengths), candidates, sumi_size, sumi_n,
                                device, min_seconds, save_as=save_as, families=tuple(families),
                                overrides=by_family, sumi=sumi, mix=history_mix(mix))


@bench_app.command("block-cost", cls=MultiValueCommand)
def bench_block_cost(
    families: list[str] = typer.Option(["astro"], parser=family_label, metavar="astro[@NAME]...",
                                       help="ASTRO and labelled variants of it (astro@NAME, set with --set)"),
    overrides: list[str] = typer.Option([], "--set", parser=parse_family_override, metavar="LABEL:KEY=VALUE",
                                        help="config override for one label, repeatable"),
    db: Optional[Path] = typer.Option(None, help="an event log (DuckDB): also its own request histories"),
    max_len: int = typer.Option(1024, help="history window of the log's requests"),
    window_h: float = typer.Option(48.0, help="the log's requests of the last H hours (0: all)"),
    n: int = typer.Option(4096, help="history length of the synthetic histories and of the FLOP ratio"),
    candidates: int = typer.Option(200, "--candidates", "-M"),
    sizes: list[str] = typer.Option(["m", "l"], help="ladder sizes of the FLOP ratio"),
    save_as: str = typer.Option("block_cost", help="bench/results/NAME.json"),
) -> Any:
    """Tokens per ASTRO block and the attention share sum_b L_b^2 / n^2 on a log's histories
    and on serve-long's synthetic ones, with the FLOP ratio against HSTU it allows."""
    from bench.block_cost import run_block_cost
    from bench.common import save
    from bench.serve_common import console

    by_label: dict[str, dict[str, Any]] = {}
    for label, key, value in overrides:
        if label not in families:
            raise typer.BadParameter(f"--set names {label!r}, which is not in --families {families}")
        by_label.setdefault(label, {})[key] = value
    if db is not None and not db.exists():
        raise typer.BadParameter(f"--db {db}: no such file")
    try:
        figures = run_block_cost(tuple(families), by_label, db, max_len, window_h, n, candidates,
                                 tuple(size_name(s) for s in sizes))
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    console.print(f"written {save(save_as, figures)}")
    return figures


@bench_app.command("incremental")
def bench_incremental(
    size: str = typer.Option("l", parser=size_name, metavar="SIZE"),
    n: int = typer.Option(1024, help="history length"),
    reps: int = typer.Option(60, help="one-event extends timed (and a tenth as many full encodes)"),
    threads: int = typer.Option(1, help="torch threads"),
    compile_check: bool = typer.Option(False, "--compile-check", help="also time the step's attending layer "
                                       "compiled by torch.compile (needs a C++ compiler; about a minute)"),
) -> Any:
    """One-event incremental update vs full re-encode of ASTRO, wall and CPU, beside the FLOP
    ratio and the two floors under it (dispatch and memory reads)."""
    import torch

    from bench.common import save
    from bench.serve_common import console
    from bench.serve_long import bench_incremental as measure

    torch.set_num_threads(threads)
    figures = measure(size, n, torch.device("cpu"), reps=reps)
    console.print(f"astro-{size}, n={n}, {threads} thread(s): extend {figures['extend_one_ms']:.3f} ms wall / "
                  f"{figures['extend_one_cpu_ms']:.3f} ms CPU, full {figures['full_encode_ms']:.1f} / "
                  f"{figures['full_encode_cpu_ms']:.1f} ms: {figures['ratio_wall']:.0f}x wall, "
                  f"{figures['ratio_cpu']:.0f}x CPU, FLOP ratio {figures['flop_ratio']:.0f}x "
                  f"({figures['share_of_flop_ratio_cpu']:.0%} of it by CPU)")
    if "read_floor_ms" in figures:
        console.print(f"FLOP-ideal event {figures['flop_ideal_extend_cpu_ms']:.3f} ms CPU (full / FLOP ratio). "
                      f"Floors: dispatch {figures['aten_calls_per_event']} ATen calls x "
                      f"{figures['per_call_us']:.1f} us = {figures['dispatch_floor_ms']:.3f} ms; memory: reading "
                      f"the {figures['bytes_read_per_event'] / 1e6:.1f} MB one event must read (attended K/V "
                      f"and weights) once, from fresh buffers, {figures['read_floor_ms']:.3f} ms, so no "
                      f"implementation passes {figures['ratio_ceiling_from_reads']:.0f}x "
                      f"({figures['share_of_flop_ratio_ceiling_from_reads']:.0%} of the FLOP ratio) here")
    if compile_check:
        from bench.incremental_floor import compile_check as check
        from bench.serve_long import long_model, prefix, random_sequence
        from bench.serve_common import N_TRACKS
        from ranker.serving.cache import history_batch

        model, seq, cpu = long_model("astro", size, n, torch.device("cpu")), random_sequence(n, seed=1), torch.device("cpu")
        with torch.inference_mode():
            before = model.encode_history(history_batch([prefix(seq, n - 1)], N_TRACKS, cpu))
            figures["compile_check"] = c = check(model, before, history_batch([seq], N_TRACKS, cpu), n)
        console.print(f"{c['layer']}: eager {min(c['eager_us']):.0f} us, compiled static "
                      f"{min(c['compiled_static_us']):.0f} us (compile {c['compiled_static_compile_s']:.0f} s), "
                      f"dynamic {min(c['compiled_dynamic_us']):.0f} us (compile {c['compiled_dynamic_compile_s']:.0f} s); "
                      f"largest difference {max(c['compiled_static_max_abs_diff'], c['compiled_dynamic_max_abs_diff']):.1e}")
    console.print(f"written {save('incremental', {**figures, 'threads': threads})}")
    return figures


@bench_app.command("gpu")
def bench_gpu(
    device: str = typer.Option("cuda", help="cuda (the point of it) or cpu (the same steps, to check them)"),
    tiny: bool = typer.Option(False, "--tiny", help="tiny sizes: what make test runs, not for reporting"),
    out: Optional[Path] = typer.Option(None, help="JSON path (default bench/results/gpu-<device>.json)"),
    threads: int = typer.Option(1, help="torch threads on CPU (bench and server)"),
) -> Any:
    """Exactness of the device's serving path, then benchmarks 1, 2 and 5 on it (make bench-gpu)."""
    from bench.gpu import run_bench_gpu

    return run_bench_gpu(device, tiny, out, threads)


@bench_app.command("cache", cls=MultiValueCommand)
def bench_cache(
    spec: Path = typer.Option(Path("experiments/examples/model_sizes.yaml"), help="the experiment file to run"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="KEY=VALUE override of the experiment, repeatable"),
    long_n: int = typer.Option(1024, help="history length of the untrained model in the storage comparison"),
    long_size: str = typer.Option("l", parser=size_name, metavar="SIZE"),
    hops: Optional[list[int]] = typer.Option(None, "--hops", help="served window hops, one experiment run each "
                                             "(1: sliding; default 1 16)"),
) -> Any:
    """The KV cache in the closed loop (hit/extend/rebuild, bytes per user, rate against the byte
    budget) per served window hop, the hop window's offline GAUC against the sliding one, and
    K/V storage in fp32/bf16/int8 (bytes and score error)."""
    from bench.cache_economics import CacheBench, run_bench_cache

    return run_bench_cache(CacheBench(spec, list(set_ or []), long_n, long_size, hops=tuple(hops or (1, 16))))


@bench_app.command("http-path", cls=MultiValueCommand)
def bench_http_path(
    routes: list[str] = typer.Option(["fastapi", "lean"], "--routes", help="/rank fronts: lean, fastapi"),
    batching: list[str] = typer.Option(["fixed", "adaptive"], "--batching", help="batching waits: adaptive, fixed"),
    waits: list[float] = typer.Option([1.0], "--waits", help="the service's batching waits (ms)"),
    turns: int = typer.Option(3),
    requests: int = typer.Option(200, help="requests per turn, one at a time"),
) -> Any:
    """What the app and the batching task add to a lone /rank request, in process (no socket):
    every combination of the options, in interleaved turns."""
    import itertools

    from bench.http_path import run_bench_http_path

    for value, allowed in [(r, ("lean", "fastapi")) for r in routes] + [(b, ("adaptive", "fixed")) for b in batching]:
        if value not in allowed:
            typer.secho(f"{value!r} is not one of {', '.join(allowed)}", fg="red", err=True)
            raise typer.Exit(2)
    variants = tuple((b_route, b, w) for b, b_route, w in itertools.product(batching, routes, waits))
    return run_bench_http_path(variants, turns, requests=requests)


@bench_app.command("batch-cost", cls=MultiValueCommand)
def bench_batch_cost(
    size: str = typer.Option("s", parser=size_name, metavar="SIZE"),
    n: int = typer.Option(256, help="history length of every user"),
    candidates: int = typer.Option(200, "--candidates", "-M"),
    users: int = typer.Option(200),
    batches: list[int] = typer.Option([1, 2, 3, 4, 8, 16], help="batch sizes, one or more"),
    turns: int = typer.Option(30, min=1, help="calls per (stage-two path, batch size), in turns"),
    threads: int = typer.Option(1, help="torch threads"),
    save_as: str = typer.Option("batch_cost", help="bench/results/<name>.json"),
) -> Any:
    """One scoring batch's cost by batch size, split into fixed and per-request parts, stage
    two's fast and reference paths in turns (in process, warm cache)."""
    from bench.batch_cost import run_bench_batch_cost

    return run_bench_batch_cost(size, n, candidates, users, tuple(sorted(set(batches))), turns, threads, save_as)


@bench_app.command("load")
def bench_load(
    size: str = typer.Option("s", parser=size_name, metavar="SIZE"),
    n: int = typer.Option(256, help="history length of every user"),
    candidates: int = typer.Option(200, "--candidates", "-M"),
    device: str = typer.Option("cpu"),
    threads: int = typer.Option(1, help="torch threads of the server (and of the in-process ceiling)"),
    seconds: float = typer.Option(10.0, help="length of each load run"),
    users: int = typer.Option(200),
    max_wait_ms: Optional[float] = typer.Option(None, help="the server's batching wait in ms (default: the service's)"),
    max_batch: Optional[int] = typer.Option(None, min=1, help="the most requests the server ranks in one batch "
                                            "(default: the service's); the ceiling is timed at batch sizes up to it"),
    batching: Optional[str] = typer.Option(None, help="adaptive or fixed (default: the service's)"),
    rank_route: Optional[str] = typer.Option(None, help="the /rank front: lean or fastapi (default: the service's)"),
    scoring: Optional[str] = typer.Option(None, help="where the server ranks a batch: loop or thread (default: the "
                                          "service's)"),
    malloc: Optional[str] = typer.Option(None, help="the server's malloc: keep or glibc (its dynamic thresholds, the "
                                         "reference; default: the service's)"),
    stage_two: Optional[str] = typer.Option(None, help="the server's and the ceiling's stage two: fast or reference "
                                            "(the model's own; default: the service's)"),
    repeats: int = typer.Option(3, min=1, help="open-loop rounds (25/50/75% each); the figure at 50% is their "
                                "median (one 10 s run holds ~40 requests past its p99)"),
    breakdown: bool = typer.Option(False, "--breakdown", help="trace every open-loop request: where the p50 group's "
                                   "and the slowest 1%'s time goes (generator, server read, queue, batch, reply), GC"),
    generator_gc: bool = typer.Option(False, "--generator-gc", help="let the load generator's GC run during the "
                                      "runs (by default it is held off: its pauses are not the server's latency)"),
    save_as: str = typer.Option("load", help="bench/results/<name>.json"),
) -> Any:
    """The HTTP service under an open loop at 25/50/75% of the in-process ceiling; HTTP overhead at p50."""
    from bench.load import run_bench_load

    return run_bench_load(size, n, candidates, device, threads, seconds, users, max_wait_ms=max_wait_ms,
                          save_as=save_as, batching=batching, rank_route=rank_route, repeats=repeats,
                          breakdown=breakdown, generator_gc=generator_gc, scoring=scoring, malloc=malloc,
                          max_batch=max_batch, stage_two=stage_two)
