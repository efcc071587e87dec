"""Run the simulator alone with a reference policy; print speed and stylised facts.

    python -m simulator --policy random --days 7
    python -m simulator --policy popularity --users 500 --tracks 5000 --days 2

Events are counted and kept for the facts, nothing else: this measures the simulator's own
speed (events per second of wall time and of this process's CPU time, which is steadier
when other work shares the machine).
"""

from __future__ import annotations

import argparse
import time

from simulator.config import SimConfig
from simulator.facts import stylised_facts
from simulator.platform import MusicPlatform
from simulator.policies import OracleRecommender, PopularityRecommender, RandomRecommender
from streaming.events import EventBatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=("random", "popularity", "oracle"), default="random")
    parser.add_argument("--users", type=int, default=SimConfig().n_users)
    parser.add_argument("--tracks", type=int, default=SimConfig().n_tracks)
    parser.add_argument("--days", type=float, default=SimConfig().days)
    parser.add_argument("--seed", type=int, default=SimConfig().seed)
    parser.add_argument("--window-ms", type=int, default=SimConfig().batch_window_ms)
    parser.add_argument("--sessions-per-day", type=float, default=SimConfig().sessions_per_day_median,
                        help="median sessions per user per day (the user mix)")
    args = parser.parse_args()

    config = SimConfig(n_users=args.users, n_tracks=args.tracks, days=args.days, seed=args.seed,
                       batch_window_ms=args.window_ms, sessions_per_day_median=args.sessions_per_day)
    batches: list[EventBatch] = []
    platform = MusicPlatform(config, None, batches.append)
    metadata = platform.catalog.metadata()
    if args.policy == "random":
        platform.recommender = RandomRecommender(metadata, args.seed)
    elif args.policy == "oracle":
        platform.recommender = OracleRecommender(platform, seed=args.seed)
    else:
        popular = platform.recommender = PopularityRecommender(metadata, args.seed)
        platform.sink = lambda batch: (batches.append(batch), popular.observe(batch))

    wall, cpu = time.perf_counter(), time.process_time()
    summary = platform.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.policy}: {summary.events:,} events, {summary.sessions:,} sessions, {summary.requests:,} requests "
          f"in {summary.recommend_calls:,} calls (mean batch {summary.mean_batch_size:.1f})")
    print(f"wall {wall:.2f} s = {summary.events / wall:,.0f} events/s; cpu {cpu:.2f} s = "
          f"{summary.events / cpu:,.0f} events/s")
    for fact in stylised_facts(EventBatch.concat(batches), metadata):
        print(f"  {'ok' if fact.ok else 'NO'}  {fact.name:28s} {fact.value:7.3f}  [{fact.low}, {fact.high}]")


if __name__ == "__main__":
    main()
