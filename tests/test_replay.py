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
from streaming.events import BEHAVIOUR_CODE
from tests.support import BAD_LINE_REASONS, bad_json_lines, tiny_settings


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


def _gz_lines(events, n: int) -> bytes:
    return gzip.compress(b"".join(line + b"\n" for line in events.encode_json()[:n]))


@pytest.mark.parametrize("damage, problem", [
    ("truncated", "line 1: the gzip data ends before its end marker (a truncated file?)"),
    ("not-gzip", "line 1: not gzip data, although the name ends in .gz"),
    ("corrupt", "line 1: corrupt gzip data"),
], ids=["truncated", "not-gzip", "corrupt"])
def test_an_unreadable_source_applies_nothing_and_says_where_in_one_line(source_log, tmp_path, damage, problem):
    """Before, a truncated .gz printed only "Aborted." after applying part of the file and
    leaving a half-built run; a .gz that is not gzip printed a traceback."""
    _, events = source_log
    whole = _gz_lines(events, 3000)
    data = {"truncated": whole[: len(whole) * 2 // 3], "not-gzip": b"".join(events.encode_json()[:5]),
            "corrupt": whole[:10] + bytes(b ^ 0x5A for b in whole[10:400]) + whole[400:]}[damage]
    source = tmp_path / "events.jsonl.gz"
    source.write_bytes(data)
    result = CliRunner().invoke(app, ["replay", str(source), "--out", str(tmp_path), "--run-id", "broken"])
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "\n" not in message and message.startswith(f"replay: {source}: line ") and problem.split(": ", 1)[1] in message
    assert message.endswith("nothing was applied") and not (tmp_path / "broken").exists()
    if damage == "truncated":  # the line where the data breaks off, after the whole lines before it
        line = int(message.split(": line ")[1].split(":")[0])
        assert 1 < line <= 3000


def test_a_byte_order_mark_is_ignored_and_the_replay_verified_against_the_source(source_log, tmp_path):
    _, events = source_log
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b"".join(line + b"\n" for line in events.encode_json()))
    result = replay(source, tiny_settings(tmp_path, run_id="bom"), chunk_events=1000)
    assert result.events_applied == len(events) and result.dead_letters == 0 and result.ok


def test_verification_compares_feast_with_the_source_not_with_the_record(source_log, tmp_path, monkeypatch):
    """A pipeline that wrongly accepted or dropped events would have passed a check against
    its own record; against the source as read it fails."""
    import sandbox.loop

    _, events = source_log
    source = tmp_path / "events.jsonl"
    source.write_bytes(b"".join(line + b"\n" for line in events.encode_json()))
    check = sandbox.loop.PlausibilityGate.check

    lost = int(events.user_id[events.behaviour == BEHAVIOUR_CODE["full_play"]][0])

    def loses_a_user(self, batch, *args, **kwargs):  # a pipeline bug: one user's events vanish
        good, dead = check(self, batch, *args, **kwargs)
        return good.select(good.user_id != lost), dead

    monkeypatch.setattr(sandbox.loop, "PlausibilityGate", type("Buggy", (sandbox.loop.PlausibilityGate,),
                                                               {"check": loses_a_user}))
    result = replay(source, tiny_settings(tmp_path, run_id="buggy"), chunk_events=1000)
    assert not result.ok and lost in result.mismatched_users
    assert result.unrecorded_events == int((events.user_id == lost).sum()) > 0
