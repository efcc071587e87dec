"""What a sandbox run shows people: a terminal summary (rich) and report.html with PNG plots.

Plots are computed from the run's DuckDB so the report can be rebuilt for any past run.
"""

from __future__ import annotations

import html
from pathlib import Path

import duckdb
import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sandbox.loop import SandboxResult  # noqa: E402


def _table(title: str, frame: pd.DataFrame, float_format: str = "{:.4g}") -> Table:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        table.add_column(str(column), justify="right" if frame[column].dtype.kind in "iuf" else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*[float_format.format(v) if isinstance(v, float) else str(v) for v in row])
    return table


def facts_frame(facts) -> pd.DataFrame:
    """A fact without enough data (e.g. a daily cycle in a half-day run) is n/a, not a failure."""
    def verdict(fact) -> str:
        if np.isnan(float(fact.value)):
            return "n/a"
        return "yes" if fact.ok else "NO"

    return pd.DataFrame([{"fact": f.name, "value": round(float(f.value), 4), "low": f.low, "high": f.high,
                          "ok": verdict(f)} for f in facts])


def run_frame(result: SandboxResult) -> pd.DataFrame:
    rows = [
        ("run", result.run_dir.name), ("events", f"{result.events:,}"), ("requests", f"{result.requests:,}"),
        ("sessions", f"{result.sessions:,}"), ("dead letters", f"{result.dead_letters:,}"),
        ("feature rows pushed to Feast", f"{result.feature_rows_written:,}"),
        ("wall seconds", f"{result.wall_seconds:.1f}"), ("events/s", f"{result.events_per_second:,.0f}"),
        ("event log hash", result.event_log_hash[:16]),
    ]
    rows += [(f"time in {name}", f"{seconds:.1f} s") for name, seconds in sorted(result.timings.items())]
    return pd.DataFrame(rows, columns=["", "value"])


def lift_frame(result: SandboxResult) -> pd.DataFrame:
    if result.lift is None or len(result.lift) == 0:
        return pd.DataFrame({"": ["no A/B analysis for this run (an arm had no exposed users)"]})
    return _lift_columns(result.lift, result.sample_ratio)


def _lift_columns(lift: pd.DataFrame, srm) -> pd.DataFrame:
    frame = lift[["arm", "metric", "control", "treatment", "lift", "ci_low", "ci_high", "p_value", "mde"]].copy()
    frame = frame.rename(columns={"mde": "MDE (80% power)"})
    frame["SRM p"] = srm.p_value if srm is not None else float("nan")
    return frame


def lift_table(lift: pd.DataFrame, srm, title: str) -> Table:
    """The lift rows of `experiments.analysis.ab_report` as a terminal table (`climber ab`)."""
    return _table(title, _lift_columns(lift, srm))


def sections(result: SandboxResult) -> list[tuple[str, pd.DataFrame]]:
    return [
        ("Run", run_frame(result)),
        ("Events by scenario and behaviour", result.behaviour_counts.reset_index()),
        ("Engagement per arm", result.arm_metrics.reset_index()),
        ("A/B lift against control (delta method, 95% CI; SRM: sample-ratio chi-square)", lift_frame(result)),
        ("Stylised facts", facts_frame(result.facts)),
    ]


def print_summary(result: SandboxResult, console: Console | None = None) -> None:
    console = console or Console()
    for title, frame in sections(result):
        console.print(_table(title, frame))


def _plots(db_path: Path, out_dir: Path) -> list[Path]:
    con = duckdb.connect(str(db_path), read_only=True)
    hourly = con.execute("""
        SELECT (ts // 3600000) % 24 AS hour, count(*) AS events FROM events GROUP BY hour ORDER BY hour""").df()
    by_position = con.execute("""
        WITH shown AS (SELECT request_id, track_id, position FROM events
                       WHERE behaviour = 'impression' AND position >= 0),
             played AS (SELECT DISTINCT request_id, track_id FROM events
                        WHERE behaviour IN ('play', 'full_play', 'skip'))
        SELECT shown.position, avg(CASE WHEN played.track_id IS NULL THEN 0 ELSE 1 END) AS play_rate
        FROM shown LEFT JOIN played USING (request_id, track_id)
        GROUP BY shown.position ORDER BY shown.position""").df()
    daily = con.execute("""
        SELECT ts // 86400000 AS day, arm,
               sum(CASE WHEN behaviour = 'full_play' THEN 1 ELSE 0 END)
                 / greatest(sum(CASE WHEN behaviour = 'impression' THEN 1 ELSE 0 END), 1) AS full_play_rate
        FROM events WHERE request_id >= 0 GROUP BY day, arm ORDER BY day, arm""").df()
    con.close()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(hourly["hour"], hourly["events"])
    axes[0].set(title="Daily cycle", xlabel="hour of day (UTC)", ylabel="events")
    axes[1].plot(by_position["position"], by_position["play_rate"], marker="o")
    axes[1].set(title="Position bias", xlabel="slate position", ylabel="played / shown")
    for arm, rows in daily.groupby("arm"):
        axes[2].plot(rows["day"] - rows["day"].min(), rows["full_play_rate"], marker="o", label=arm)
    axes[2].set(title="Full plays per impression by arm", xlabel="day", ylabel="rate")
    axes[2].legend()
    fig.tight_layout()
    path = out_dir / "overview.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(result: SandboxResult) -> Path:
    images = _plots(result.db_path, result.run_dir)
    body = "".join(f"<h2>{html.escape(title)}</h2>{frame.to_html(index=False, border=0)}"
                   for title, frame in sections(result))
    body += "".join(f'<h2>Plots</h2><img src="{img.name}" style="max-width:100%">' for img in images)
    page = (f"<!doctype html><meta charset='utf-8'><title>Climber sandbox {html.escape(result.run_dir.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:2px 10px;text-align:right}</style>"
            f"<h1>Climber sandbox run {html.escape(result.run_dir.name)}</h1>{body}")
    path = result.run_dir / "report.html"
    path.write_text(page)
    return path
