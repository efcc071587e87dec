"""Stylised facts: does an event log look like a music platform? Checked on any log.

Each fact is one number from the log and a narrow range around a published figure, about
+-30% unless docs/simulator.md explains otherwise; `source` names where the figure comes
from (the table in docs/simulator.md gives the reference). Where nothing is published for a
platform of this size the range is set around the simulator's own value under the logging
policy and says so (`source` starts with "ours"): a regression check, not a validation.

The ranges hold under the logging policy of the warm-up phase (`python -m simulator
--policy popularity`: candidates drawn in proportion to plays + 1, i.e. popularity with
exploration) on a week at the default size. A uniformly random policy fails the concentration
facts, as it should: real listening is not uniform.

- skips (Lamere 2014): share of plays skipped before the end, within 30 s, within 5 s;
- daily cycle (Zhang et al. 2013): quietest hour, morning peak hour (weekdays), daily peak hour,
  all three of session starts per hour, the quantity the source plots (its session arrival
  rate; the morning peak and the lunch dip after it are weekday features there); weekly cycle;
- sessions (30-minute inactivity gap): median tracks played, 90th percentile over the median;
- repeats: share of plays of a track the user had already played in the log;
- concentration: Gini of plays over the catalog, share of the top 1% of tracks;
- return: median days between a user's sessions, share of users active on a day;
- position bias: play rate per impression at position 0 over positions 5 and later;
- albums (only where the catalogue has them, user model 3): share of plays that continue, in
  order, the album of the same user's previous play in the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ranker.interface import TrackMetadata
from simulator.config import DAY_MS, HOUR_MS
from streaming.events import BEHAVIOUR_CODE, EventBatch

SESSION_GAP_MS = 30 * 60 * 1000
PLAY, SKIP, IMPRESSION = BEHAVIOUR_CODE["play"], BEHAVIOUR_CODE["skip"], BEHAVIOUR_CODE["impression"]
LAMERE, ZHANG, BROST = "Lamere 2014", "Zhang et al. 2013", "Brost et al. 2019"
MBA = "Music Business Association 2016 (full albums 22% of listening time)"


@dataclass(frozen=True)
class Fact:
    name: str
    value: float
    low: float
    high: float
    description: str
    source: str = ""

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.value) and self.low <= self.value <= self.high)


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts (0 = equal, towards 1 = all on one)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return float("nan")
    return float((2 * np.arange(1, n + 1) - n - 1) @ x / (n * total))


def _session_starts(events: EventBatch, gap_ms: int) -> tuple[np.ndarray, np.ndarray]:
    """(order by user and time, True where a session starts in that order)."""
    order = np.lexsort((events.event_id, events.ts, events.user_id))
    user, ts = events.user_id[order], events.ts[order]
    starts = np.ones(len(order), bool)
    starts[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > gap_ms)
    return order, starts


def session_lengths(events: EventBatch, gap_ms: int = SESSION_GAP_MS) -> np.ndarray:
    """Tracks played per session, sessions cut at `gap_ms` of a user's inactivity."""
    if len(events) == 0:
        return np.zeros(0, np.int64)
    order, starts = _session_starts(events, gap_ms)
    session = np.cumsum(starts) - 1
    return np.bincount(session, weights=events.behaviour[order] == PLAY).astype(np.int64)


def days_between_sessions(events: EventBatch, gap_ms: int = SESSION_GAP_MS) -> np.ndarray:
    """Days from one session's start to the same user's next session's start."""
    if len(events) == 0:
        return np.zeros(0)
    order, starts = _session_starts(events, gap_ms)
    user, ts = events.user_id[order][starts], events.ts[order][starts]
    same = user[1:] == user[:-1]
    return np.diff(ts)[same] / DAY_MS


def repeat_share(events: EventBatch) -> float:
    """Share of plays of a track the same user had played earlier in the log."""
    plays = events.behaviour == PLAY
    pairs = events.user_id[plays].astype(np.int64) * (int(events.track_id.max()) + 1) + events.track_id[plays]
    return _ratio(len(pairs) - len(np.unique(pairs)), len(pairs))


def active_share(events: EventBatch, start_ts: int | None = None) -> float:
    """Mean over whole days of the log of the share of its users active that day."""
    if len(events) == 0:
        return float("nan")
    start = int(events.ts.min()) if start_ts is None else start_ts
    day = (events.ts - start) // DAY_MS
    whole = int((int(events.ts.max()) - start) // DAY_MS)  # the last, partial day is left out
    if whole < 1:
        return float("nan")
    keep = day < whole
    active = len(np.unique(events.user_id[keep].astype(np.int64) * whole + day[keep]))
    return _ratio(active / whole, len(np.unique(events.user_id)))


def hourly_session_starts(events: EventBatch, weekdays_only: bool = False,
                          gap_ms: int = SESSION_GAP_MS) -> np.ndarray:
    """[24] sessions starting in each hour of day (UTC), sessions cut at `gap_ms`; with
    `weekdays_only`, Monday to Friday (epoch day 0 is a Thursday). Zhang et al. (2013) report
    the daily cycle as this session arrival rate, and events lag it by a session's length."""
    if len(events) == 0:
        return np.zeros(24, np.int64)
    order, starts = _session_starts(events, gap_ms)
    ts = events.ts[order][starts]
    if weekdays_only:
        ts = ts[(ts // DAY_MS + 3) % 7 < 5]
    return np.bincount((ts // HOUR_MS) % 24, minlength=24)


def weekend_over_weekday(events: EventBatch) -> float:
    """Events per weekend day over events per weekday, whole days only (epoch day 0 is a Thursday)."""
    if len(events) == 0:
        return float("nan")
    day = events.ts // DAY_MS
    first, last = int(day.min()), int(day.max())
    whole = np.arange(first + 1, last)  # the first and last days may be partial
    counts = np.bincount(day - first, minlength=last - first + 1)[whole - first]
    weekend = (whole + 3) % 7 >= 5
    if not weekend.any() or weekend.all():
        return float("nan")
    return _ratio(counts[weekend].mean(), counts[~weekend].mean())


def album_in_order_share(events: EventBatch, metadata: TrackMetadata, gap_ms: int = SESSION_GAP_MS) -> float:
    """Share of plays whose track is the next track of the album of the user's previous play
    in the same session (sessions cut at `gap_ms`)."""
    plays = events.select(events.behaviour == PLAY)
    if len(plays) < 2 or metadata.album_id is None:
        return float("nan")
    order, starts = _session_starts(plays, gap_ms)
    track = plays.track_id[order]
    album, number = metadata.album_id[track], metadata.album_track[track]
    follows = ~starts[1:] & (album[1:] == album[:-1]) & (number[1:] == number[:-1] + 1)
    return _ratio(follows.sum(), len(track))


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def stylised_facts(events: EventBatch, metadata: TrackMetadata) -> list[Fact]:
    behaviour = events.behaviour
    plays = behaviour == PLAY
    n_plays = plays.sum()
    play_counts = np.bincount(events.track_id[plays], minlength=metadata.n_tracks)
    top = max(1, int(np.ceil(0.01 * metadata.n_tracks)))
    top_share = _ratio(np.sort(play_counts)[::-1][:top].sum(), play_counts.sum())
    skips = behaviour == SKIP

    lengths = session_lengths(events)
    median_length = float(np.median(lengths)) if len(lengths) else float("nan")
    p90_length = float(np.percentile(lengths, 90)) if len(lengths) else float("nan")
    gaps = days_between_sessions(events)

    ranked = events.position >= 0
    impressions, ranked_plays = ranked & (behaviour == IMPRESSION), ranked & plays

    def play_rate(where: np.ndarray) -> float:
        return _ratio((ranked_plays & where).sum(), (impressions & where).sum())

    starts, weekday_starts = hourly_session_starts(events), hourly_session_starts(events, weekdays_only=True)
    ours = "ours (no published figure at this scale)"
    albums = [] if metadata.album_id is None else [
        Fact("album_in_order_share", album_in_order_share(events, metadata), 0.06, 0.12,
             "plays that go on with the album of the previous play, in order", f"ours; {MBA}")]
    return [
        Fact("skip_share", _ratio(skips.sum(), n_plays), 0.34, 0.63,
             "plays skipped before the end (published 48.6%)", LAMERE),
        Fact("skip_within_30s_share", _ratio((skips & (events.play_ms <= 30_000)).sum(), n_plays), 0.246, 0.456,
             "plays skipped within 30 s (published 35.1%)", LAMERE),
        Fact("skip_within_5s_share", _ratio((skips & (events.play_ms <= 5_000)).sum(), n_plays), 0.169, 0.313,
             "plays skipped within 5 s (published 24.1%)", LAMERE),
        Fact("quietest_hour", float(np.argmin(starts)), 2, 5,
             "hour of day (UTC) with the fewest session starts (published: around 2-5 am)", ZHANG),
        Fact("morning_peak_hour", float(6 + np.argmax(weekday_starts[6:13])), 8, 11,
             "weekday hour between 6 am and noon with the most session starts (published 9-10 am)", ZHANG),
        Fact("daily_peak_hour", float(np.argmax(starts)), 17, 20,
             "hour with the most session starts (published 6-7 pm)", ZHANG),
        Fact("weekend_over_weekday", weekend_over_weekday(events), 0.75, 1.0,
             "events per weekend day over a weekday: a little quieter", f"{ours}; shape from {ZHANG}"),
        Fact("session_median_plays", median_length, 9, 18,
             "median tracks played per session (30 minutes of inactivity split sessions)", f"{ours}; {BROST}"),
        Fact("session_p90_over_median", _ratio(p90_length, median_length), 2.0, 4.0,
             "90th percentile over median session length: a heavy tail", ours),
        Fact("repeat_share", repeat_share(events), 0.7, 0.95,
             "plays of a track the user had played before in the log", f"{ours}; Louail & Barthelemy 2017"),
        Fact("play_gini", gini(play_counts), 0.9, 0.995,
             "Gini of plays over all catalog tracks", ours),
        Fact("top1pct_play_share", top_share, 0.7, 0.95,
             "share of plays going to the most played 1% of tracks", ours),
        Fact("median_days_between_sessions", float(np.median(gaps)) if len(gaps) else float("nan"), 0.22, 0.5,
             "median days from a session to the same user's next one", ours),
        Fact("active_share_per_day", active_share(events), 0.45, 0.8,
             "share of the log's users active on a day (mean over whole days)", ours),
        Fact("position_bias", _ratio(play_rate(events.position == 0), play_rate(events.position >= 5)), 1.3, 10,
             "play rate per impression at position 0 over positions >= 5", "examination model; click logs"),
    ] + albums
