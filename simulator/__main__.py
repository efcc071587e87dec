"""Run the simulator alone with a reference policy; print speed and stylised facts.

    python -m simulator --policy random --days 7
    python -m simulator --policy popularity --users 500 --tracks 5000 --days 2

Events are counted and kept for the facts, nothing else: this measures the simulator's own
speed (events per second of wall time and of this process's CPU time, which is steadier
when other work shares the machine).
"""

from __future__ import annotations

import time
from typing import Literal

import typer

from simulator.config import SimConfig
from simulator.facts import stylised_facts
from simulator.platform import MusicPlatform
from simulator.policies import OracleRecommender, PopularityRecommender, RandomRecommender
from streaming.events import BEHAVIOUR_CODE, EventBatch

DEFAULTS = SimConfig()
simulator_app = typer.Typer(add_completion=False)


@simulator_app.command(help=__doc__.splitlines()[0])
def simulate_alone(
    policy: Literal["random", "popularity", "oracle"] = typer.Option("random", help="the reference policy"),
    users: int = typer.Option(DEFAULTS.n_users),
    tracks: int = typer.Option(DEFAULTS.n_tracks),
    days: float = typer.Option(DEFAULTS.days),
    seed: int = typer.Option(DEFAULTS.seed),
    window_ms: int = typer.Option(DEFAULTS.batch_window_ms, help="the simulator's batch window"),
    sessions_per_day: float = typer.Option(DEFAULTS.sessions_per_day_median,
                                           help="median sessions per user per day (the user mix)"),
    per_item_oracle: bool = typer.Option(False, "--per-item-oracle",
                                         help="user model 3: the oracle policy ranks per item, as in models 1 and 2"),
    weekday_lunch_dip: float = typer.Option(DEFAULTS.weekday_lunch_dip,
                                            help="user model 3: the weekday lunch dip (0: model 3 before it)"),
) -> None:
    config = SimConfig(n_users=users, n_tracks=tracks, days=days, seed=seed, batch_window_ms=window_ms,
                       sessions_per_day_median=sessions_per_day, weekday_lunch_dip=weekday_lunch_dip)
    batches: list[EventBatch] = []
    platform = MusicPlatform(config, None, batches.append)
    metadata = platform.catalog.metadata()
    if policy == "random":
        platform.recommender = RandomRecommender(metadata, seed)
    elif policy == "oracle":
        platform.recommender = OracleRecommender(platform, seed=seed)
        platform.oracle.slate_aware &= not per_item_oracle
    else:
        popular = platform.recommender = PopularityRecommender(metadata, seed)
        platform.sink = lambda batch: (batches.append(batch), popular.observe(batch))

    wall, cpu = time.perf_counter(), time.process_time()
    summary = platform.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{policy}: {summary.events:,} events, {summary.sessions:,} sessions, {summary.requests:,} requests "
          f"in {summary.recommend_calls:,} calls (mean batch {summary.mean_batch_size:.1f})")
    print(f"wall {wall:.2f} s = {summary.events / wall:,.0f} events/s; cpu {cpu:.2f} s = "
          f"{summary.events / cpu:,.0f} events/s")
    log = EventBatch.concat(batches)
    ranked = log.request_id >= 0
    impressions = int((ranked & (log.behaviour == BEHAVIOUR_CODE["impression"])).sum())
    full_plays = int((ranked & (log.behaviour == BEHAVIOUR_CODE["full_play"])).sum())
    print(f"full plays per ranked impression {full_plays / max(impressions, 1):.4f} "
          f"({full_plays:,} of {impressions:,}); user model {config.user_model}")
    for fact in stylised_facts(log, metadata):
        print(f"  {'ok' if fact.ok else 'NO'}  {fact.name:28s} {fact.value:7.3f}  [{fact.low}, {fact.high}]")


def main(argv: list[str] | None = None) -> None:
    """`python -m simulator [flags]`."""
    from sandbox.cli_options import run_command

    run_command(simulator_app, argv, "python -m simulator")


if __name__ == "__main__":
    main()
