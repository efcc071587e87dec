"""An experiment's report: terminal tables that fit 80 columns, PNG plots and report.html.

Everything is rebuilt from the run's DuckDB file (experiments.evaluate), so
`climber experiment report RUN` gives the same report for any past run.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from rich import box  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from experiments.analysis import ceiling_frame  # noqa: E402
from experiments.figures import save_figure  # noqa: E402
from experiments.evaluate import Evaluation, evaluate, summary_json  # noqa: E402
from experiments.online_growth import growth_frame, growth_line, plot_growth, retrained_after  # noqa: E402

LABELS = {"listening_minutes": "listening min", "plays": "plays", "full_plays": "full plays",
          "skips": "skips", "likes": "likes", "shares": "shares", "playlist_adds": "playlist adds",
          "sessions": "sessions", "active_days": "active days", "distinct_artists": "distinct artists",
          "full_play_rate": "full-play rate", "skip_rate": "skip rate"}  # per user; the rates per impression


def _pct(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:+.1%}"


def _ci(low: float, high: float) -> str:
    """An interval of relative lifts in percent, the % sign once: '[+2.5, +34.1]%' keeps an
    80-column table's interval on one line where '[+2.5%, +34.1%]' wrapped."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "n/a"
    return f"[{100 * low:+.1f}, {100 * high:+.1f}]%"


def _p(v: float) -> str:
    return "n/a" if not np.isfinite(v) else f"{v:.2g}"


def best_lift(row) -> tuple[float, float, float, str]:
    """(lift, low, high, kind): CUPED where it applies, else plain."""
    if np.isfinite(row["cuped_lift"]):
        return row["cuped_lift"], row["cuped_ci_low"], row["cuped_ci_high"], "CUPED"
    return row["lift"], row["ci_low"], row["ci_high"], "plain"


# -- frames (shared by terminal and HTML) -----------------------------------------------------

def run_frame(ev: Evaluation) -> pd.DataFrame:
    phases = json.loads(ev.meta["phase_seconds"])
    spec = ev.spec
    rows = [("experiment", spec.name), ("seed / salt", f"{spec.seed} / {spec.salt}"),
            ("simulator", f"user model {spec.sim.get('user_model', '?')}"),
            ("users x tracks", f"{spec.sim_config().n_users:,} x {spec.sim_config().n_tracks:,}"),
            ("days", f"{spec.phases.warm_up.days} warm-up + {spec.phases.ab.days} A/B"),
            ("wall seconds", f"{float(ev.meta['wall_seconds']):.0f} (" + ", ".join(
                f"{k} {v:.0f}" for k, v in phases.items()) + ")"),
            ("event log hash", str(ev.meta["event_log_hash"])[:16]),
            ("A/B users per arm", ", ".join(f"{a} {n:,}" for a, n in ev.srm.observed.items())),
            ("sample-ratio check", f"p = {ev.srm.p_value:.3g}" + (" MISMATCH: lifts untrustworthy"
                                                                  if ev.srm.mismatch else " (no mismatch)"))]
    return pd.DataFrame(rows, columns=["", "value"])


def models_frame(ev: Evaluation) -> pd.DataFrame:
    if ev.models.empty:
        return pd.DataFrame(columns=["arm"])
    m = ev.models
    return pd.DataFrame({"arm": m["arm"], "params": [f"{int(v):,}" for v in m["n_params"]],
                         "MFLOPs/req": [f"{v / 1e6:.2f}" for v in m["flops_per_request"]],
                         "steps": m["steps"], "val loss": [f"{v:.4f}" for v in m["val_loss"]],
                         "GAUC full": [f"{v:.3f}" for v in m["gauc_full_play"]]})


def lift_frame(rows: pd.DataFrame, confidence: float) -> pd.DataFrame:
    out = []
    for _, r in rows.iterrows():
        lift, low, high, _ = best_lift(r)
        out.append({"metric": LABELS[r["metric"]], "plain": _pct(r["lift"]), "CUPED": _pct(r["cuped_lift"]),
                    f"{confidence:.0%} CI": _ci(low, high), "p": _p(r["p_tested"]),
                    "Holm": _p(r["p_holm"]),
                    "VR": "" if not np.isfinite(r["variance_reduction"]) else f"{r['variance_reduction']:.0%}"})
    return pd.DataFrame(out)


def cache_frame(ev: Evaluation) -> pd.DataFrame:
    c = ev.cache
    if c.empty:
        return pd.DataFrame(columns=["arm"])
    lookups = (c["hits"] + c["incremental"] + c["rebuilds"]).clip(lower=1)
    return pd.DataFrame({"arm": c["arm"], "hits": c["hits"], "extends": c["incremental"], "rebuilds": c["rebuilds"],
                         "cold": c["cold"], "evictions": c["evictions"],
                         "hit+extend": [f"{v:.0%}" for v in (c["hits"] + c["incremental"]) / lookups]})


def regret_frame(ev: Evaluation) -> pd.DataFrame:
    r = ev.regret
    return pd.DataFrame({"arm": r["arm"], "requests": r["requests"], "served": [f"{v:.3f}" for v in r["served"]],
                         "oracle best": [f"{v:.3f}" for v in r["best"]],
                         "regret": [f"{v:.3f} ± {1.96 * s:.3f}" for v, s in zip(r["regret"], r["regret_se"])],
                         "relative": [f"{v:.1%}" for v in r["relative_regret"]]})


def ceiling(ev: Evaluation) -> pd.DataFrame | None:
    """Full-play rate per arm beside the oracle arm's, and the share of the popularity ->
    oracle gap each arm closes (`experiments.analysis.ceiling_frame`); None without an
    oracle arm."""
    totals = ev.users.groupby("arm")[["full_played_impressions", "impressions"]].sum()
    return ceiling_frame(totals["full_played_impressions"].to_dict(), totals["impressions"].to_dict(),
                         json.loads(ev.meta["rankers"]), ev.control)


def ceiling_shown(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"arm": frame["arm"], "ranker": frame["ranker"],
                         "impressions": [f"{v:,}" for v in frame["impressions"]],
                         "full-play rate": [f"{v:.4f}" for v in frame["full_play_rate"]],
                         "gap closed": ["n/a" if not np.isfinite(v) else f"{v:.1%}" for v in frame["gap_closed"]]})


def sequential_frame(ev: Evaluation) -> pd.DataFrame:
    s = ev.sequential
    if s.empty:
        return pd.DataFrame(columns=["arm"])
    return pd.DataFrame({"day": s["day"], "arm": s["arm"], "metric": [LABELS[m] for m in s["metric"]],
                         "lift": [_pct(v) for v in s["lift"]],
                         "always-valid CI": [_ci(lo, hi) for lo, hi in zip(s["seq_low"], s["seq_high"])],
                         "p": [_p(v) for v in s["seq_p"]]})


def size_lines(ev: Evaluation) -> list[str]:
    """One line per trained size: its lift on each primary metric against the control."""
    lines, flops = [], dict(zip(ev.models["arm"], ev.models["flops_per_request"]))
    for arm in sorted(flops, key=flops.get):
        rows = ev.lifts[(ev.lifts["baseline"] == ev.control) & (ev.lifts["arm"] == arm)]
        parts = []
        for metric in ev.spec.metrics.primary:
            row = rows[rows["metric"] == metric].iloc[0]
            lift, low, high, kind = best_lift(row)
            parts.append(f"{LABELS[metric]} {_pct(lift)} [{_pct(low)}, {_pct(high)}]")
        lines.append(f"{arm} ({flops[arm] / 1e6:.2f} MFLOPs/req): " + "; ".join(parts))
    return lines


def sections(ev: Evaluation) -> list[tuple[str, pd.DataFrame]]:
    conf = ev.spec.metrics.confidence
    out = [("Run", run_frame(ev)), ("Models (trained on the warm-up log, one budget)", models_frame(ev))]
    lifts = ev.lifts
    for arm in [a for a in ev.spec.arms if a != ev.control]:
        rows = lifts[(lifts["baseline"] == ev.control) & (lifts["arm"] == arm)]
        out.append((f"{arm} against {ev.control}: relative lift per user (rates per impression); CI of "
                    "CUPED where given; VR: CUPED's variance reduction", lift_frame(rows, conf)))
    between = lifts[(lifts["baseline"] != ev.control) & lifts["metric"].isin(ev.spec.metrics.primary)]
    for (base, arm), rows in between.groupby(["baseline", "arm"], sort=False):
        out.append((f"{arm} against {base} (primary metrics)", lift_frame(rows, conf)))
    out += [("Always-valid (mSPRT) interval after each A/B day, against control", sequential_frame(ev)),
            ("Oracle regret: expected full plays per slate (position-weighted; the oracle leaves out "
             "fatigue within the slate, so slates that repeat an artist look better than they play)",
             regret_frame(ev)),
            ("KV cache per neural arm (TURBO serving in the A/B phase)", cache_frame(ev))]
    top = ceiling(ev)
    if top is not None:
        out.append((CEILING_TITLE, ceiling_shown(top)))
    if not ev.retrains.empty:
        out.append((growth_title(ev), growth_frame(ev.daily, ev.daily_gap, ev.spec, _after(ev))))
    return out


def _after(ev: Evaluation) -> list[int]:
    return retrained_after(ev.retrains, ev.spec.phases.warm_up.days)


def growth_title(ev: Evaluation) -> str:
    gap = ev.daily_gap
    vs = "" if gap.empty else (f"; gap: {gap['arm'].iloc[0]} over {gap['baseline'].iloc[0]} that day "
                               f"({gap['kind'].iloc[0]}, {ev.spec.metrics.confidence:.0%} CI)")
    return (f"Growth with daily retraining: {LABELS[ev.spec.metrics.primary[0]]} per exposed user per full "
            f"A/B day{vs}; retrain: every trained arm fine-tuned after that day")


CEILING_TITLE = ("The oracle arm as the ceiling: full-play rate per impression over the A/B days; gap closed = "
                 "(arm - popularity arm) / (oracle arm - popularity arm)")


# -- terminal -------------------------------------------------------------------------------------

def print_summary(ev: Evaluation, console: Console | None = None) -> None:
    console = console or Console(width=80)
    for title, frame in sections(ev):
        if frame.empty:
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, column in enumerate(frame.columns):
            table.add_column(str(column), justify="left" if i == 0 else "right", overflow="fold")
        for row in frame.itertuples(index=False):
            table.add_row(*[str(v) for v in row])
        console.print(table)
    console.print("Lift of each size against the control (CUPED where it applies, "
                  f"{ev.spec.metrics.confidence:.0%} CI):", style="bold")
    for line in size_lines(ev):  # one metric a line: two of them overflow 80 columns mid-interval
        head, _, metrics = line.partition(": ")
        console.print(f"  {head}:")
        for part in metrics.split("; "):
            console.print(f"    {part}")
    console.print("p: CUPED test where it applies, else plain; Holm p adjusts it over all "
                  f"{len(ev.lifts)} (metric, pair) tests. Library plays are not counted.")
    if not ev.retrains.empty:
        console.print(growth_line(ev.daily_gap, _after(ev)), style="bold")


# -- plots --------------------------------------------------------------------------------------

def plot_lifts(ev: Evaluation, path: Path) -> Path:
    """One row per metric, each on its own scale: a noisy metric (shares) must not squash the rest."""
    arms = [a for a in ev.spec.arms if a != ev.control]
    metrics = list(dict.fromkeys(ev.lifts["metric"]))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 0.32 * len(metrics) * (len(arms) + 1) + 1.2),
                             squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes[:, 0], metrics):
        rows = ev.lifts[(ev.lifts["baseline"] == ev.control) & (ev.lifts["metric"] == metric)].set_index("arm")
        for i, arm in enumerate(arms):
            lift, low, high, kind = best_lift(rows.loc[arm])
            ax.errorbar([lift * 100], [i], xerr=[[(lift - low) * 100], [(high - lift) * 100]], fmt="o", capsize=3,
                        color=colours[i % len(colours)], label=arm)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(arms)), arms, fontsize=7)
        ax.set_ylim(len(arms) - 0.5, -0.5)
        ax.set_ylabel(LABELS[metric], rotation=0, ha="right", va="center", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    axes[-1, 0].set_xlabel(f"relative lift against {ev.control}, % ({ev.spec.metrics.confidence:.0%} CI; CUPED for "
                           "per-user metrics)\neach row has its own scale", fontsize=9)
    axes[0, 0].set_title("Lift per metric per arm")
    return save_figure(fig, path)


def plot_daily(ev: Evaluation, path: Path) -> Path:
    metrics = list(dict.fromkeys(ev.daily["metric"]))
    cols = 4
    rows_n = int(np.ceil(len(metrics) / cols))
    fig, axes = plt.subplots(rows_n, cols, figsize=(14, 3 * rows_n), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        data = ev.daily[ev.daily["metric"] == metric]
        for arm in ev.spec.arms:
            d = data[data["arm"] == arm]
            ax.plot(d["day"], d["value"], marker="o", label=arm)
        ax.set(title="active share of the arm's users" if metric == "active_days" else LABELS[metric],
               xlabel="A/B day (full days)")
        ax.set_xticks(sorted(data["day"].unique()))
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Each metric per arm per A/B day (per exposed user that day; ratios per impression)")
    return save_figure(fig, path, dpi=90)


def plot_scaling(ev: Evaluation, path: Path) -> Path | None:
    """Lift against model FLOPs per request: one point per trained size, CI bars."""
    if ev.models.empty:
        return None
    primary = ev.spec.metrics.primary
    fig, axes = plt.subplots(1, len(primary), figsize=(5.5 * len(primary), 4), squeeze=False)
    for ax, metric in zip(axes.flat, primary):
        for _, m in ev.models.iterrows():
            row = ev.lifts[(ev.lifts["baseline"] == ev.control) & (ev.lifts["arm"] == m["arm"])
                           & (ev.lifts["metric"] == metric)].iloc[0]
            lift, low, high, kind = best_lift(row)
            ax.errorbar([m["flops_per_request"]], [lift * 100], yerr=[[(lift - low) * 100], [(high - lift) * 100]],
                        fmt="o", capsize=4)
            ax.annotate(f"{m['family']} {m['size']}", (m["flops_per_request"], lift * 100),
                        textcoords="offset points", xytext=(6, 4), fontsize=9)
        ax.axhline(0, color="grey", lw=1)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="model FLOPs per request", ylabel=f"lift against {ev.control}, %",
               title=f"{LABELS[metric]} ({'CUPED' if ev.spec.metrics.cuped else 'plain'}, "
                     f"{ev.spec.metrics.confidence:.0%} CI)")
    return save_figure(fig, path)


def plot_sequential(ev: Evaluation, path: Path) -> Path | None:
    s = ev.sequential
    if s.empty:
        return None
    primary = ev.spec.metrics.primary
    arms = list(dict.fromkeys(s["arm"]))
    fig, axes = plt.subplots(1, len(primary), figsize=(5.5 * len(primary), 4), squeeze=False)
    for ax, metric in zip(axes.flat, primary):
        for i, arm in enumerate(arms):
            d = {k: v.to_numpy() for k, v in s[(s["arm"] == arm) & (s["metric"] == metric)].items()}
            x = d["day"] + (i - (len(arms) - 1) / 2) * 0.12
            # Intervals as spans, not error bars around the lift: the always-valid one is
            # intersected over the looks, so a day's lift may lie outside it.
            (line,) = ax.plot(x, d["lift"] * 100, "o-", label=f"{arm} always-valid")
            ax.vlines(x, d["seq_low"] * 100, d["seq_high"] * 100, color=line.get_color(), lw=1.5)
            ax.vlines(x, d["ci_low"] * 100, d["ci_high"] * 100, lw=6, alpha=0.4, color=line.get_color())
        ax.axhline(0, color="grey", lw=1)
        ax.set_xticks(sorted(s["day"].unique()))
        ax.set(xlabel="after A/B day", ylabel=f"lift against {ev.control}, %",
               title=f"{LABELS[metric]}: always-valid (thin) vs fixed (thick)")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_regret(ev: Evaluation, path: Path) -> Path | None:
    r = ev.regret
    if r.empty:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(r["arm"], r["regret"], yerr=1.96 * r["regret_se"], capsize=4)
    ax.set(ylabel="expected full plays per slate lost",
           title="Oracle regret per arm (95% CI;\nwithin-slate fatigue not modelled)")
    return save_figure(fig, path)


def plot_ceiling(ev: Evaluation, path: Path) -> Path | None:
    """Each arm's full-play rate, the oracle arm's drawn as the ceiling line."""
    top = ceiling(ev)
    if top is None:
        return None
    oracle = top[top["ranker"].str.endswith("(ceiling)")].iloc[0]
    rest = top[top["arm"] != oracle["arm"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(rest["arm"], rest["full_play_rate"], color="tab:blue")
    ax.axhline(oracle["full_play_rate"], color="tab:red", linestyle="--",
               label=f"oracle arm {oracle['arm']!r}: {oracle['full_play_rate']:.4f}")
    for x, (rate, gap) in enumerate(zip(rest["full_play_rate"], rest["gap_closed"])):
        if np.isfinite(gap):
            ax.annotate(f"{gap:.0%} of the gap", (x, rate), ha="center", va="bottom", fontsize=8)
    ax.set(ylabel="full-play rate per impression", ylim=(0, oracle["full_play_rate"] * 1.15),
           title="Full-play rate per arm (A/B days) against the oracle ceiling")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def write_report(ev: Evaluation, run_dir: Path) -> Path:
    plots = [p for p in (plot_lifts(ev, run_dir / "lift.png"), plot_scaling(ev, run_dir / "lift_vs_flops.png"),
                         plot_daily(ev, run_dir / "daily.png"), plot_sequential(ev, run_dir / "sequential.png"),
                         plot_regret(ev, run_dir / "regret.png"), plot_ceiling(ev, run_dir / "ceiling.png"))
             if p is not None]
    body = "<h2>Lift of each size</h2><ul>" + "".join(f"<li>{html.escape(l)}</li>" for l in size_lines(ev)) + "</ul>"
    if not ev.retrains.empty:
        plot_growth(ev.daily, ev.daily_gap, ev.spec, _after(ev), run_dir / "growth.png")
        plots.insert(0, run_dir / "growth.png")
        body += f"<p><b>{html.escape(growth_line(ev.daily_gap, _after(ev)))}</b></p>"
    body += "".join(f"<h2>{html.escape(title)}</h2>{frame.to_html(index=False, border=0)}"
                    for title, frame in sections(ev))
    body += "<h2>Plots</h2>" + "".join(f'<p><img src="{p.name}" style="max-width:100%"></p>' for p in plots)
    page = (f"<!doctype html><meta charset='utf-8'><title>Experiment {html.escape(ev.spec.name)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{padding:2px 10px;text-align:right}</style>"
            f"<h1>Experiment {html.escape(ev.spec.name)}</h1>"
            "<p>Per-user metrics over the A/B days, recommendation traffic only (library plays are nobody's "
            "result). CUPED uses each user's warm-up value of the metric; Holm adjusts over every (metric, "
            "pair) test.</p>" + body)
    path = run_dir / "report.html"
    path.write_text(page)
    (run_dir / "summary.json").write_text(json.dumps(summary_json(ev), indent=1, default=float))
    return path


def report(run_dir: str | Path, console: Console | None = None) -> Path:
    """Rebuild the report of a run folder (or its sandbox.duckdb) and print the summary."""
    run_dir = Path(run_dir)
    if run_dir.suffix == ".duckdb":
        run_dir = run_dir.parent
    ev = evaluate(run_dir / "sandbox.duckdb")
    print_summary(ev, console)
    return write_report(ev, run_dir)
