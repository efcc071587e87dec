"""End to end on the embedded default, with every part real (SimPy, Feast SQLite, DuckDB)."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from features.sequence import sequences_from_log
from features.store import FeatureStoreClient
from sandbox.loop import Sandbox, Stopwatch, run_sandbox
from sandbox.report import print_summary, write_report
from streaming.events import encode_event
from tests.support import BAD_LINE_REASONS, bad_json_lines, tiny_settings


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run_sandbox(tiny_settings(tmp_path_factory.mktemp("runs")))


def test_feast_sequences_equal_a_recompute_from_the_duckdb_log(tiny_run):
    con = duckdb.connect(str(tiny_run.db_path), read_only=True)
    n_events = con.execute("SELECT count(*) FROM events").fetchone()[0]
    con.close()
    assert n_events == tiny_run.events > 1000

    from experiments.recorder import RunRecorder

    recorder = RunRecorder(tiny_run.db_path)
    reference = sequences_from_log(recorder.read_events(), tiny_run.settings.max_seq_len)
    recorder.close()
    store = FeatureStoreClient(tiny_run.run_dir / "feast")
    served = store.get_sequences(sorted(reference))
    assert len(reference) > 30
    mismatched = [u for u in reference if not served[u].equals(reference[u])]
    assert mismatched == []


def test_every_request_has_its_impressions_logged(tiny_run):
    con = duckdb.connect(str(tiny_run.db_path), read_only=True)
    n_requests = con.execute("SELECT count(*) FROM requests").fetchone()[0]
    assert n_requests == tiny_run.requests > 0
    # every shown track is an impression row with arm, model, position and score ...
    missing = con.execute("""
        SELECT count(*) FROM events e LEFT JOIN impressions i
          ON e.request_id = i.request_id AND e.position = i.position AND e.track_id = i.track_id
        WHERE e.behaviour = 'impression' AND i.request_id IS NULL""").fetchone()[0]
    assert missing == 0
    # ... and every request logged its full slate: positions 0..k-1, each with a model and a score
    gaps = con.execute("""
        SELECT count(*) FROM (
          SELECT r.request_id, r.slate_size, count(i.position) AS shown, max(i.position) AS last
          FROM requests r LEFT JOIN impressions i USING (request_id)
          GROUP BY r.request_id, r.slate_size) WHERE shown = 0 OR last <> shown - 1 OR shown > slate_size""").fetchone()[0]
    assert gaps == 0
    assert con.execute("SELECT count(*) FROM impressions WHERE model_name IS NULL OR score IS NULL "
                       "OR arm IS NULL").fetchone()[0] == 0
    con.close()


def test_same_seed_same_event_log(tiny_run, tmp_path):
    again = run_sandbox(tiny_settings(tmp_path, run_id="again"))
    assert again.event_log_hash == tiny_run.event_log_hash
    other = run_sandbox(tiny_settings(tmp_path, seed=4, run_id="other"))
    assert other.event_log_hash != tiny_run.event_log_hash




def test_bad_events_are_dead_lettered_and_good_ones_all_processed(tmp_path):
    sandbox = Sandbox(tiny_settings(tmp_path, run_id="bad"))
    try:
        sandbox.run()
        before = sandbox.recorder.read_events()
        # Replay new good events for existing users, interleaved with bad ones, as JSON lines.
        tail = before.select(np.arange(len(before) - 200, len(before)))
        shifted = tail.columns()
        first_new = int(before.event_id.max()) + 1  # the stream's next ids: far-ahead ones are implausible
        shifted["event_id"] = first_new + np.arange(len(tail))
        shifted["ts"] = tail.ts + 1000
        from streaming.events import EventBatch

        good = EventBatch(**shifted).encode_json()
        bad = bad_json_lines(good)
        sandbox.pipeline.on_json(good[:100] + bad + good[100:], source="replay")
        result = sandbox.result()
    finally:
        sandbox.close()

    con = duckdb.connect(str(result.db_path), read_only=True)
    dead = con.execute("SELECT payload, reason, source FROM dead_letters ORDER BY payload").fetchall()
    n_replayed = con.execute("SELECT count(*) FROM events WHERE event_id >= ?", [first_new]).fetchone()[0]
    con.close()
    assert n_replayed == 200
    assert len(dead) == len(bad)
    reasons = " | ".join(r for _, r, _ in dead)
    for needle in BAD_LINE_REASONS:
        assert needle in reasons
    assert {s for _, _, s in dead} == {"replay"}

    from experiments.recorder import RunRecorder

    recorder = RunRecorder(result.db_path)
    reference = sequences_from_log(recorder.read_events(), 256)
    recorder.close()
    served = FeatureStoreClient(result.run_dir / "feast").get_sequences(sorted(reference))
    assert all(served[u].equals(reference[u]) for u in reference)


def test_report_and_summary_are_written(tiny_run):
    report = write_report(tiny_run)
    assert report.exists() and (tiny_run.run_dir / "overview.png").stat().st_size > 10_000
    text = report.read_text()
    assert "Stylised facts" in text and "Engagement per arm" in text and "A/B lift" in text


def test_terminal_summary_shows_every_figure_in_80_columns(tiny_run):
    """An 80-column terminal (or a pipe) must not cut figures short with "…"."""
    from io import StringIO

    from rich.console import Console

    console = Console(width=80, record=True, file=StringIO())
    print_summary(tiny_run, console)
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    cells = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    assert all(scenario in text for scenario in tiny_run.behaviour_counts.index)
    impressions = next(row for row in cells if row[0].strip() == "impression")
    assert [int(cell.replace(",", "")) for cell in impressions[1:]] == \
        tiny_run.behaviour_counts["impression"].tolist()
    assert len(tiny_run.lift) > 0
    for lift in tiny_run.lift.itertuples():
        assert f"A/B lift of {lift.arm} against control" in text
        assert f"{lift.lift:+.2%}" in text and f"[{lift.ci_low:+.2%}, {lift.ci_high:+.2%}]" in text
    assert f"p = {tiny_run.sample_ratio.p_value:.3g}" in text


def test_timings_split_the_wall_time_once(tiny_run):
    """Response logging runs inside ranking; counted in both, the measured components would
    add up to more than the wall time and leave the simulator (the remainder) nothing."""
    timings = tiny_run.timings
    assert {"candidate generation", "scoring", "routing", "features", "duckdb", "simulator"} <= set(timings)
    measured = {name: seconds for name, seconds in timings.items() if name != "simulator"}
    assert all(seconds > 0 for seconds in measured.values()), measured
    assert sum(measured.values()) < tiny_run.wall_seconds
    assert timings["simulator"] > 0


def test_stopwatch_takes_nested_time_out_of_the_outer_component(monkeypatch):
    """On a clock the test advances itself, so the figures are exact, not sleep-timed."""
    import sandbox.loop

    now = [100.0]
    monkeypatch.setattr(sandbox.loop.time, "perf_counter", lambda: now[0])
    watch = Stopwatch()
    with watch.time("outer"):
        now[0] += 2.0
        with watch.time("inner"):
            now[0] += 5.0
            with watch.time("innermost"):
                now[0] += 1.0
        now[0] += 0.5
    with watch.time("inner"):  # a second call accumulates
        now[0] += 3.0
    assert dict(watch.seconds) == {"outer": 2.5, "inner": 8.0, "innermost": 1.0}


@pytest.mark.slow
def test_kafka_transport_builds_the_same_sequences_through_faust(tmp_path):
    """`--transport kafka`: Tansu broker, two Faust workers, Feast on Valkey; the sequences the
    workers wrote equal a recompute from the DuckDB event log."""
    settings = tiny_settings(tmp_path, run_id="kafka").model_copy(update={"transport": "kafka", "workers": 2})
    sandbox = Sandbox(settings)
    try:
        sandbox.run()
        result = sandbox.result()
        events = sandbox.recorder.read_events()
        reference = sequences_from_log(events, settings.max_seq_len)
        served = sandbox.store.get_sequences(sorted(reference))
    finally:
        sandbox.close()
    assert result.events == len(events) > 1000
    assert [u for u in reference if not served[u].equals(reference[u])] == []
    assert result.dead_letters == 0


def test_bench_sim_repeats_report_best_and_median_of_one_log(tmp_path, monkeypatch):
    import json

    import bench.common
    from bench.sim import run_bench_sim

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)  # keep the repository's figures
    figures = run_bench_sim(users=30, tracks=300, days=0.3, seed=1, repeats=2)
    rates = [run["events_per_second"] for run in figures["runs"]]
    assert len(rates) == 2 and figures["best_events_per_second"] == max(rates)
    assert min(rates) <= figures["median_events_per_second"] <= max(rates)
    assert len({run["event_log_hash"] for run in figures["runs"]}) == 1
    assert json.loads((tmp_path / "sim.json").read_text())["config"]["users"] == 30
