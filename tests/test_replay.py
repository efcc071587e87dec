"""`climber replay`: a recorded log driven through the real feature path again (DuckDB
source, JSON lines with bad lines in them, a longer sequence length, Kafka + Faust)."""

from __future__ import annotations

import gzip

import duckdb
import numpy as np
import pytest
from typer.testing import CliRunner

from experiments.recorder import RunRecorder, iter_event_log
from features.sequence import sequences_from_log
from features.store import FeatureStoreClient
from sandbox.cli import app
from sandbox.policy_log import simulate_policy_log
from sandbox.replay import replay
from tests.test_sandbox_e2e import BAD_LINE_REASONS, bad_json_lines, tiny_settings


@pytest.fixture(scope="module")
def source_log(tmp_path_factory):
    """A simulator log (random policy) in a run's DuckDB file, and its events."""
    settings = tiny_settings(tmp_path_factory.mktemp("source"), run_id="source")
    path = simulate_policy_log(settings, "random")
    recorder = RunRecorder(path)
    events = recorder.read_events()
    recorder.close()
    assert len(events) > 3000
    return path, events


def _replayed(run_dir):
    recorder = RunRecorder(run_dir / "sandbox.duckdb")
    try:
        return recorder.read_events(), recorder.event_log_hash()
    finally:
        recorder.close()


def test_a_duckdb_log_replays_into_a_run_with_the_same_events_and_verified_features(source_log, tmp_path):
    path, events = source_log
    result = replay(path, tiny_settings(tmp_path, run_id="again"), chunk_events=777)
    assert result.ok and result.verified_users > 30 and result.mismatched_users == []
    assert result.events_read == result.events_applied == len(events) and result.dead_letters == 0
    replayed, digest = _replayed(result.run_dir)
    source = RunRecorder(path)
    assert digest == source.event_log_hash()  # the same events, in the same order
    source.close()
    # An independent read of the rebuilt store, against the log itself.
    reference = sequences_from_log(events, 256)
    served = FeatureStoreClient(result.run_dir / "feast").get_sequences(sorted(reference))
    assert all(served[u].equals(reference[u]) for u in reference)
    assert (result.run_dir / "replay.json").exists()
    chunks = list(iter_event_log(path, 777))
    assert len(chunks) == -(-len(events) // 777) and sum(map(len, chunks)) == len(events)


def test_json_lines_with_bad_lines_dead_letter_those_and_apply_the_rest(source_log, tmp_path):
    _, events = source_log
    good = events.encode_json()
    bad = bad_json_lines(good)
    lines = good[:500] + bad[:3] + good[500:2000] + bad[3:] + good[2000:]
    source = tmp_path / "events.jsonl.gz"
    with gzip.open(source, "wb") as f:
        f.write(b"\n".join(lines) + b"\n\n")  # a blank line is skipped, not dead-lettered
    result = replay(source, tiny_settings(tmp_path, run_id="fromjson"), chunk_events=1000)
    assert result.events_read == len(lines) and result.events_applied == len(events)
    assert result.dead_letters == len(bad) and result.ok and result.verified_users > 30
    con = duckdb.connect(str(result.db_path), read_only=True)
    dead = con.execute("SELECT reason, source FROM dead_letters").fetchall()
    settings_json = con.execute("SELECT settings FROM runs").fetchone()[0]
    con.close()
    reasons = " | ".join(r for r, _ in dead)
    for needle in BAD_LINE_REASONS:
        assert needle in reasons
    assert {s for _, s in dead} == {"replay"} and str(source.resolve()) in settings_json
    replayed, _ = _replayed(result.run_dir)
    np.testing.assert_array_equal(replayed.event_id, events.event_id)


@pytest.mark.parametrize("name", ["events.jsonl", "events.ndjson.gz"])
def test_an_exported_log_replays_to_the_same_event_log(source_log, tmp_path, name):
    path, events = source_log
    out = tmp_path / name
    cli = CliRunner().invoke(app, ["export", str(path), "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    assert f"{len(events):,} events" in cli.output and not (tmp_path / f"{name}.partial").exists()
    result = replay(out, tiny_settings(tmp_path, run_id=f"export-{name.replace('.', '-')}"), chunk_events=999)
    assert result.ok and result.dead_letters == 0 and result.events_applied == len(events)
    source = RunRecorder(path)
    assert _replayed(result.run_dir)[1] == source.event_log_hash()
    source.close()
    again = CliRunner().invoke(app, ["export", str(path), "--out", str(out)])
    assert again.exit_code == 2 and "does not overwrite" in again.output
    wrong = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "events.csv")])
    assert wrong.exit_code == 2 and "JSON lines" in wrong.output


def test_a_replay_rebuilds_features_at_another_sequence_length(source_log, tmp_path):
    path, events = source_log
    settings = tiny_settings(tmp_path, run_id="short").model_copy(update={"max_seq_len": 8})
    result = replay(path, settings)
    assert result.ok
    served = FeatureStoreClient(result.run_dir / "feast").get_sequences(sorted(set(events.user_id.tolist())))
    lengths = [len(seq) for seq in served.values()]
    assert max(lengths) == 8 and min(lengths) >= 0


def test_replay_refuses_what_it_cannot_do_and_says_why(source_log, tmp_path):
    path, _ = source_log
    (tmp_path / "events.csv").touch()
    with pytest.raises(ValueError, match="cannot tell the format"):
        replay(tmp_path / "events.csv", tiny_settings(tmp_path))
    with pytest.raises(FileNotFoundError, match="no event log"):
        replay(tmp_path / "missing.duckdb", tiny_settings(tmp_path))
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    with pytest.raises(ValueError, match="no events table"):
        replay(empty, tiny_settings(tmp_path, run_id="empty"))
    kafka_elsewhere = tiny_settings(tmp_path, run_id="k").model_copy(update={"transport": "kafka", "workers": 0})
    with pytest.raises(ValueError, match="--no-verify"):
        replay(path, kafka_elsewhere, verify=True)
    replay(path, tiny_settings(tmp_path, run_id="once"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        replay(path, tiny_settings(tmp_path, run_id="once"))

    runner = CliRunner()
    missing = runner.invoke(app, ["replay", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)])
    assert missing.exit_code == 2 and "no event log" in missing.output
    done = runner.invoke(app, ["replay", str(path), "--out", str(tmp_path), "--run-id", "cli", "--chunk", "5000"])
    assert done.exit_code == 0, done.output
    assert "mismatched users" in done.output and (tmp_path / "cli" / "replay.json").exists()


@pytest.mark.slow
def test_a_replay_through_kafka_and_faust_builds_the_same_sequences(source_log, tmp_path):
    """Tansu broker, one sequence worker and one track worker, Feast on Valkey."""
    path, events = source_log
    settings = tiny_settings(tmp_path, run_id="viakafka").model_copy(update={"transport": "kafka", "workers": 1})
    result = replay(path, settings, chunk_events=2000)
    assert result.ok and result.verified_users > 30
    assert result.events_applied == len(events) and result.dead_letters == 0
