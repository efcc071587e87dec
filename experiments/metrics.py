"""Engagement per arm, read from a run's DuckDB (tables in docs/schema.md).

Only recommendation traffic counts (events whose request_id is in `requests`), attributed to
the arm that served the request: organic library plays happen whatever the ranker does and
would dilute a difference between arms. Redelivered events (same event_id) count once. An impression
is a (request_id, track_id) pair the user was shown; a rate is the share of impressions
that got at least one event of that behaviour, so a listen reported as both `play` and
`full_play` is still one played impression. Users are those with at least one request in
the arm (exposed users), which is also the denominator of per-user means.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

RATE_BEHAVIOURS = {
    "play_rate": ("play", "full_play", "skip"),  # any listen started
    "full_play_rate": ("full_play",),
    "skip_rate": ("skip",),
    "like_rate": ("like",),
}
ARM_METRICS_SQL = """
WITH exposure AS (
    SELECT arm, count(DISTINCT request_id) AS requests, count(DISTINCT user_id) AS users
    FROM requests GROUP BY arm),
served AS (  -- recommendation events, attributed to the arm of the request that served them
    SELECT DISTINCT ON (e.event_id) r.arm, e.event_id, e.request_id, e.track_id, e.behaviour
    FROM events e JOIN requests r USING (request_id)),
reactions AS (  -- one row per shown (request, track), with what the user did to it
    SELECT arm, request_id, track_id, {flags}
    FROM served GROUP BY arm, request_id, track_id),
per_arm AS (
    SELECT arm, count(*) FILTER (WHERE shown) AS impressions, {rates}
    FROM reactions GROUP BY arm),
full_plays AS (
    SELECT arm, count(*) AS full_plays FROM served WHERE behaviour = 'full_play' GROUP BY arm)
SELECT exposure.arm, users, requests, coalesce(impressions, 0) AS impressions, {rate_columns},
       coalesce(full_plays, 0) / users AS full_plays_per_user
FROM exposure LEFT JOIN per_arm USING (arm) LEFT JOIN full_plays USING (arm)
ORDER BY exposure.arm
"""


def _in(behaviours: tuple[str, ...]) -> str:
    return "behaviour IN (" + ", ".join(f"'{b}'" for b in behaviours) + ")"


def _query() -> str:
    flags = ", ".join([f"bool_or(behaviour = 'impression') AS shown"]
                      + [f"bool_or({_in(b)}) AS {name}" for name, b in RATE_BEHAVIOURS.items()])
    rates = ", ".join(f"count(*) FILTER (WHERE shown AND {name}) AS {name}_n" for name in RATE_BEHAVIOURS)
    rate_columns = ", ".join(f"{name}_n / nullif(impressions, 0) AS {name}" for name in RATE_BEHAVIOURS)
    return ARM_METRICS_SQL.format(flags=flags, rates=rates, rate_columns=rate_columns)


def connect(source: duckdb.DuckDBPyConnection | str | Path) -> tuple[duckdb.DuckDBPyConnection, bool]:
    """A connection to a run's database and whether the caller must close it."""
    if isinstance(source, duckdb.DuckDBPyConnection):
        return source, False
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no DuckDB file at {path}")
    return duckdb.connect(str(path), read_only=True), True


def engagement_by_arm(source: duckdb.DuckDBPyConnection | str | Path) -> pd.DataFrame:
    """One row per arm (index `arm`): users, requests, impressions, play/full-play/skip/like
    rate per impression, and mean full plays per exposed user."""
    con, owned = connect(source)
    try:
        tables = {row[0] for row in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        missing = {"requests", "events"} - tables
        if missing:
            raise ValueError(f"the run database lacks table(s) {sorted(missing)}")
        frame = con.execute(_query()).df()
    finally:
        if owned:
            con.close()
    return frame.set_index("arm")
