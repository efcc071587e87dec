"""What a sandbox run shows people: a terminal summary (rich) and report.html with PNG plots.

Plots are computed from the run's DuckDB so the report can be rebuilt for any past run.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import duckdb
import numpy as np
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import pandas as pd  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sandbox.loop import SandboxResult  # noqa: E402


def _table(title: str, frame: pd.DataFrame, float_format: str = "{:.4g}", caption: str | None = None,
           figures_across: bool = False) -> Table:
    """A frame as a terminal table. Cells wrap instead of ending in "…" when the terminal is
    narrow, so no figure is ever cut short. `figures_across`: every column after the first
    holds figures already formatted as text (right-aligned like numbers)."""
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, column in enumerate(frame.columns):
        right = frame[column].dtype.kind in "iuf" or (figures_across and i > 0)
        table.add_column(str(column), justify="right" if right else "left", overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*[float_format.format(v) if isinstance(v, float) else str(v) for v in row])
    return table


def _by_column(frame: pd.DataFrame, label: str) -> pd.DataFrame:
    """`frame` turned on its side (its columns become rows), each value formatted by its
    original column's type: a few row labels across would not fit 80 columns, many down do."""
    def text(value, kind: str) -> str:
        return f"{int(value):,}" if kind in "iu" else f"{value:.4g}" if kind == "f" else str(value)

    rows = [[str(column)] + [text(v, frame[column].dtype.kind) for v in frame[column]] for column in frame.columns]
    return pd.DataFrame(rows, columns=[label] + [str(i) for i in frame.index])


FACTS_TITLE = ("Stylised facts. Their ranges hold under the simulator's logging policy (`python -m simulator "
               "--policy popularity`); this run's rankers move session length, repeats and concentration "
               "(median tracks a session: random 8, logging policy 12, oracle 19), so a value outside "
               "them here is the rankers' effect, not a simulator failure")


def facts_frame(facts, under_logging_policy: bool = True) -> pd.DataFrame:
    """A fact without enough data (e.g. a daily cycle in a half-day run) is n/a, not a failure.
    The ranges are calibrated under the logging policy (`simulator.facts`): on a log ranked
    by anything else a value outside reads "outside", not "NO"."""
    def verdict(fact) -> str:
        if np.isnan(float(fact.value)):
            return "n/a"
        return "yes" if fact.ok else ("NO" if under_logging_policy else "outside")

    return pd.DataFrame([{"fact": f.name, "value": round(float(f.value), 4), "low": f.low, "high": f.high,
                          "ok": verdict(f)} for f in facts])


def feature_rows(written: int | None) -> str:
    """Rows this process pushed to Feast; on the Kafka path the workers write them, so a 0
    here would read as 'nothing reached Feast' while every row did."""
    return f"{written:,}" if written is not None else "by the Faust workers (see their logs)"


def candidate_source(spec: str) -> str:
    """`heuristic`, or `model:<folder name>` (the full path would not fit 80 columns)."""
    return spec if not spec.startswith("model:") else f"model:{Path(spec.removeprefix('model:')).name}"


def run_frame(result: SandboxResult) -> pd.DataFrame:
    rows = [
        ("run", result.run_dir.name), ("events", f"{result.events:,}"), ("requests", f"{result.requests:,}"),
        ("sessions", f"{result.sessions:,}"), ("dead letters", f"{result.dead_letters:,}"),
        ("feature rows pushed to Feast", feature_rows(result.feature_rows_written)),
        ("wall seconds", f"{result.wall_seconds:.1f}"), ("events/s", f"{result.events_per_second:,.0f}"),
        ("event log hash", result.event_log_hash[:16]), ("candidates", candidate_source(result.settings.candidates)),
    ]
    rows += [(f"time in {name}", f"{seconds:.1f} s") for name, seconds in sorted(result.timings.items())]
    return pd.DataFrame(rows, columns=["", "value"])


def lift_frame(result: SandboxResult) -> pd.DataFrame:
    if not _has_lift(result):
        return pd.DataFrame({"": ["no A/B analysis for this run (an arm had no exposed users)"]})
    return _lift_columns(result.lift, result.sample_ratio)


def _has_lift(result: SandboxResult) -> bool:
    return result.lift is not None and len(result.lift) > 0


def _lift_columns(lift: pd.DataFrame, srm) -> pd.DataFrame:
    frame = lift[["arm", "metric", "control", "treatment", "lift", "ci_low", "ci_high", "p_value", "mde"]].copy()
    frame = frame.rename(columns={"mde": "MDE (80% power)"})
    frame["SRM p"] = srm.p_value if srm is not None else float("nan")
    return frame


def lift_tables(lift: pd.DataFrame, srm, control: str = "control", confidence: float = 0.95) -> list[Table]:
    """The lift rows of `experiments.analysis.ab_report` as terminal tables, one per arm with
    the metrics across and the figures down, so they fit an 80-column terminal for any
    number of arms. Lifts, intervals and MDEs are relative (treatment / control - 1)."""
    tables = []
    for arm, rows in lift.groupby("arm", sort=False):
        figures = {
            control: [f"{v:.4g}" for v in rows["control"]],
            arm: [f"{v:.4g}" for v in rows["treatment"]],
            "lift": [f"{v:+.2%}" for v in rows["lift"]],
            f"{confidence:.0%} CI": [f"[{lo:+.2%}, {hi:+.2%}]" for lo, hi in zip(rows["ci_low"], rows["ci_high"])],
            "p-value": [f"{v:.3g}" for v in rows["p_value"]],
            "MDE (80% power)": [f"±{v:.2%}" for v in rows["mde"]],
            "users": [f"{c:,} / {t:,}" for c, t in zip(rows["n_control"], rows["n_treatment"])],
        }
        frame = pd.DataFrame([[name, *values] for name, values in figures.items()],
                             columns=["", *rows["metric"]])
        caption = None if srm is None else (
            f"sample-ratio check over all arms (chi-square): p = {srm.p_value:.3g}"
            + (" MISMATCH: do not trust these lifts" if srm.mismatch else ""))
        tables.append(_table(f"A/B lift of {arm} against {control} (delta method)", frame, caption=caption,
                             figures_across=True))
    return tables


def ceiling_table(frame: pd.DataFrame) -> Table:
    """`experiments.analysis.ceiling_frame` for the terminal (80 columns)."""
    shown = pd.DataFrame({
        "arm": frame["arm"], "ranker": frame["ranker"], "impressions": [f"{v:,}" for v in frame["impressions"]],
        "full-play rate": [f"{v:.4f}" for v in frame["full_play_rate"]],
        "gap closed": ["n/a" if not np.isfinite(v) else f"{v:.1%}" for v in frame["gap_closed"]]})
    return _table("The oracle arm as the ceiling: full-play rate per impression", shown,
                  caption=frame.attrs.get("caption"))


def sections(result: SandboxResult) -> list[tuple[str, pd.DataFrame, list[Table]]]:
    """Each part of the summary: its title, its frame for report.html, and its terminal
    tables. In the terminal the wide frames are turned on their side (and each arm's lift
    gets a table of its own), so that an 80-column terminal shows every figure."""
    def plain(title: str, frame: pd.DataFrame):
        return title, frame, [_table(title, frame)]

    def turned(title: str, frame: pd.DataFrame, label: str):
        return title, frame.reset_index(), [_table(title, _by_column(frame, label), figures_across=True)]

    lift_title = "A/B lift against control (delta method, 95% CI; SRM: sample-ratio chi-square)"
    lift = lift_frame(result)
    return [
        plain("Run", run_frame(result)),
        turned("Events by scenario and behaviour", result.behaviour_counts, "behaviour"),
        turned("Engagement per arm", result.arm_metrics, ""),
        (lift_title, lift,
         lift_tables(result.lift, result.sample_ratio) if _has_lift(result) else [_table(lift_title, lift)]),
        plain(FACTS_TITLE, facts_frame(result.facts, under_logging_policy=False)),
    ]


def print_summary(result: SandboxResult, console: Console | None = None) -> None:
    console = console or Console()
    for _, _, tables in sections(result):
        for table in tables:
            console.print(table)


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
    run = con.execute("SELECT settings FROM runs ORDER BY started_at LIMIT 1").fetchone()
    sim = json.loads(run[0])["sim"] if run else None
    # Full days only: listening begun before the horizon ends a little after it, and a
    # last point made of those few minutes would be a partial day.
    full_end = sim["start_ts"] + int(sim["days"]) * 86_400_000 if sim else 2**62
    daily = con.execute("""
        SELECT ts // 86400000 AS day, arm,
               sum(CASE WHEN behaviour = 'full_play' THEN 1 ELSE 0 END)
                 / greatest(sum(CASE WHEN behaviour = 'impression' THEN 1 ELSE 0 END), 1) AS full_play_rate
        FROM events WHERE request_id >= 0 AND ts < $end GROUP BY day, arm ORDER BY day, arm""",
                        {"end": full_end}).df()
    con.close()

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(hourly["hour"], hourly["events"])
    axes[0].set(title="Daily cycle", xlabel="hour of day (UTC)", ylabel="events")
    axes[1].plot(by_position["position"], by_position["play_rate"], marker="o")
    axes[1].set(title="Position bias", xlabel="slate position", ylabel="played / shown")
    for arm, rows in daily.groupby("arm"):
        axes[2].plot(rows["day"] - rows["day"].min(), rows["full_play_rate"], marker="o", label=arm)
    axes[2].set(title="Full plays per impression by arm (full days)", xlabel="day", ylabel="rate")
    axes[2].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if daily.empty:  # a run shorter than one day has no full day to show
        axes[2].text(0.5, 0.5, "no full day in this run", ha="center", va="center", transform=axes[2].transAxes)
    else:
        axes[2].legend()
    fig.tight_layout()
    path = out_dir / "overview.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_report(result: SandboxResult) -> Path:
    images = _plots(result.db_path, result.run_dir)
    body = "".join(f"<h2>{html.escape(title)}</h2>{frame.to_html(index=False, border=0)}"
                   for title, frame, _ in sections(result))
    body += "".join(f'<h2>Plots</h2><img src="{img.name}" style="max-width:100%">' for img in images)
    page = (f"<!doctype html><meta charset='utf-8'><title>Climber sandbox {html.escape(result.run_dir.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:2px 10px;text-align:right}</style>"
            f"<h1>Climber sandbox run {html.escape(result.run_dir.name)}</h1>{body}")
    path = result.run_dir / "report.html"
    path.write_text(page)
    return path
