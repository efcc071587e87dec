"""The per-user table of an experiment, in DuckDB SQL: one row per (user, arm) per window.

Only recommendation traffic counts: events whose request was served in the window (by
request time), attributed to the arm that served it. Library plays have no request, so no
ranker is credited with them. Redelivered events (same event_id) count once.

Columns: listening_minutes (play_ms of finished or skipped listens), plays, full_plays,
skips, likes, shares, playlist_adds, sessions (ranked activity split at 30-minute gaps),
active_days (days of the window with a ranked request), distinct_artists (artists played),
and for the per-impression ratios: impressions, full_played_impressions,
skipped_impressions (a shown (request, track) pair counts once whatever else happened).
"""

from __future__ import annotations

import duckdb
import pandas as pd

from simulator.config import DAY_MS

SESSION_GAP_MS = 30 * 60_000
USER_TABLE_SQL = """
WITH req AS (
    SELECT request_id, user_id, arm, ts FROM requests WHERE ts >= $start AND ts < $stop),
ev AS (
    SELECT DISTINCT ON (e.event_id) e.event_id, r.user_id, r.arm, e.ts, e.track_id, e.behaviour, e.play_ms,
           e.request_id, r.ts AS request_ts
    FROM events e JOIN req r USING (request_id)),
shown AS (
    SELECT user_id, request_id, track_id, bool_or(behaviour = 'impression') AS shown,
           bool_or(behaviour = 'full_play') AS was_full, bool_or(behaviour = 'skip') AS was_skipped
    FROM ev GROUP BY ALL),
per_impression AS (
    SELECT user_id, count(*) FILTER (WHERE shown) AS impressions,
           count(*) FILTER (WHERE shown AND was_full) AS full_played_impressions,
           count(*) FILTER (WHERE shown AND was_skipped) AS skipped_impressions
    FROM shown GROUP BY user_id),
gaps AS (
    SELECT user_id, ts - lag(ts) OVER (PARTITION BY user_id ORDER BY ts, event_id) AS gap FROM ev),
per_session AS (
    SELECT user_id, count(*) FILTER (WHERE gap IS NULL OR gap > {gap}) AS sessions FROM gaps GROUP BY user_id),
per_user AS (
    SELECT ev.user_id,
           sum(play_ms) / 60000.0 AS listening_minutes,
           count(*) FILTER (WHERE behaviour = 'play') AS plays,
           count(*) FILTER (WHERE behaviour = 'full_play') AS full_plays,
           count(*) FILTER (WHERE behaviour = 'skip') AS skips,
           count(*) FILTER (WHERE behaviour = 'like') AS likes,
           count(*) FILTER (WHERE behaviour = 'share') AS shares,
           count(*) FILTER (WHERE behaviour = 'add_to_playlist') AS playlist_adds,
           count(DISTINCT (request_ts - $start) // {day}) AS active_days,
           count(DISTINCT t.artist_id) FILTER (WHERE behaviour = 'play') AS distinct_artists
    FROM ev LEFT JOIN tracks t USING (track_id) GROUP BY ev.user_id),
exposed AS (SELECT user_id, min(arm) AS arm, count(DISTINCT arm) AS arms FROM req GROUP BY user_id)
SELECT x.user_id, x.arm, x.arms,
       coalesce(listening_minutes, 0)::DOUBLE AS listening_minutes, coalesce(plays, 0) AS plays,
       coalesce(full_plays, 0) AS full_plays, coalesce(skips, 0) AS skips, coalesce(likes, 0) AS likes,
       coalesce(shares, 0) AS shares, coalesce(playlist_adds, 0) AS playlist_adds,
       coalesce(sessions, 0) AS sessions, coalesce(active_days, 0) AS active_days,
       coalesce(distinct_artists, 0) AS distinct_artists,
       coalesce(impressions, 0) AS impressions, coalesce(full_played_impressions, 0) AS full_played_impressions,
       coalesce(skipped_impressions, 0) AS skipped_impressions
FROM exposed x LEFT JOIN per_user USING (user_id) LEFT JOIN per_impression USING (user_id)
LEFT JOIN per_session USING (user_id)
ORDER BY x.user_id
""".format(gap=SESSION_GAP_MS, day=DAY_MS)


def user_table(con: duckdb.DuckDBPyConnection, start_ts: int, stop_ts: int) -> pd.DataFrame:
    """Users with a ranked request in [start_ts, stop_ts), with their metrics over it.

    A user served by two arms in one window (only possible if assignments changed) is a
    broken experiment: it raises rather than counting the user twice."""
    frame = con.execute(USER_TABLE_SQL, {"start": int(start_ts), "stop": int(stop_ts)}).df()
    mixed = frame[frame["arms"] > 1]
    if len(mixed):
        raise ValueError(f"{len(mixed)} users were served by more than one arm, e.g. user {mixed['user_id'].iloc[0]}")
    return frame.drop(columns="arms")
