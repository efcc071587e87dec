"""Experiments: assignment, the DuckDB run record, engagement per arm and A/B statistics."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest

from experiments.analysis import ab_report, mean_lift, ratio_lift, ratio_variance, sample_ratio_check
from experiments.assignment import N_BUCKETS, assign_arms, assignment_table, buckets
from experiments.metrics import engagement_by_arm
from experiments.recorder import RunRecorder, event_batch_hash
from ranker.interface import RANKING_SCORE, RankResponse, SlateRequest, TrackMetadata, order_by_score
from streaming.events import BEHAVIOUR_CODE, BEHAVIOURS, SCENARIO_CODE, SCENARIOS, DeadLetter, EventBatch

REPO = Path(__file__).resolve().parents[1]
ARMS = {"control": 0.5, "treatment": 0.5}


# -- assignment -------------------------------------------------------------------------

def test_bucket_is_blake2b_of_salt_and_user_id_mod_10000():
    for user in (0, 7, 123456789):
        digest = hashlib.blake2b(f"salt-1|{user}".encode(), digest_size=8).digest()
        assert buckets([user], "salt-1")[0] == int.from_bytes(digest, "big") % N_BUCKETS


def test_assignment_is_deterministic_balanced_and_follows_shares():
    users = np.arange(20_000)
    arms = assign_arms(users, "exp", "salt-a", ARMS)
    assert (arms == assign_arms(users, "exp", "salt-a", ARMS)).all()
    share = (arms == "control").mean()
    assert 0.48 < share < 0.52
    skewed = assign_arms(users, "exp", "salt-a", {"a": 0.1, "b": 0.9})
    assert 0.08 < (skewed == "a").mean() < 0.12
    # a new salt reshuffles users: agreement between two 50/50 splits is about a half
    other = assign_arms(users, "exp", "salt-b", ARMS)
    assert 0.45 < (other == arms).mean() < 0.55
    record = assignment_table(users[:5], arms[:5], "exp", "salt-a")
    assert list(record.columns) == ["user_id", "experiment", "arm", "bucket"]
    assert (record["bucket"] < 5_000).tolist() == (arms[:5] == "control").tolist()  # arms own bucket ranges


def test_assignment_is_stable_across_processes():
    code = ("import numpy as np; from experiments.assignment import assign_arms; "
            "print(''.join(a[0] for a in assign_arms(np.arange(300), 'e', 's', {'x': 1, 'y': 1, 'z': 2})))")
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)}
        outputs.add(subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True,
                                   capture_output=True, text=True).stdout.strip())
    here = "".join(a[0] for a in assign_arms(np.arange(300), "e", "s", {"x": 1, "y": 1, "z": 2}))
    assert outputs == {here}


def test_bad_arms_are_named():
    with pytest.raises(ValueError, match="traffic share must be a positive number"):
        assign_arms([1], "e", "s", {"a": 0.0, "b": 1.0})
    with pytest.raises(ValueError, match="need at least one arm"):
        assign_arms([1], "e", "s", {})
    with pytest.raises(ValueError, match="at most 64"):
        assign_arms([1], "e", "s", {"x" * 65: 1.0})
    with pytest.raises(ValueError, match="salt must be a non-empty"):
        assign_arms([1], "e", "", ARMS)


# -- recorder ---------------------------------------------------------------------------

def random_events(n: int, seed: int = 0, first_id: int = 0) -> EventBatch:
    rng = np.random.default_rng(seed)
    return EventBatch.from_columns(
        event_id=first_id + rng.permutation(n), ts=rng.integers(0, 10**9, n), user_id=rng.integers(0, 50, n),
        track_id=rng.integers(0, 500, n), scenario=rng.integers(0, len(SCENARIOS), n),
        behaviour=rng.integers(0, len(BEHAVIOURS), n), request_id=rng.integers(-1, 100, n),
        position=rng.integers(-1, 10, n), arm=rng.choice(np.array(["control", "treatment", ""], object), n),
        play_ms=rng.integers(0, 300_000, n))


def assert_batches_equal(a: EventBatch, b: EventBatch) -> None:
    for name, column in a.columns().items():
        other = b.columns()[name]
        assert column.dtype == other.dtype, name
        assert column.tolist() == other.tolist(), name


def test_events_round_trip_in_event_id_order_and_hash_is_stable(tmp_path):
    events = random_events(1_000)
    recorder = RunRecorder(tmp_path / "a" / "sandbox.duckdb", flush_rows=300)
    for start in range(0, 1_000, 170):  # buffered appends of uneven sizes
        recorder.log_events(events.select(np.arange(start, min(start + 170, 1_000))))
    back = recorder.read_events()
    expected = events.select(np.argsort(events.event_id))
    assert_batches_equal(back, expected)
    digest = recorder.event_log_hash()
    assert digest == event_batch_hash(expected)
    recorder.close()

    again = RunRecorder(tmp_path / "b.duckdb")  # one append, different order in: same content hash
    again.log_events(events.select(np.arange(999, -1, -1)))
    assert again.event_log_hash() == digest
    changed = events.columns()
    changed["play_ms"] = changed["play_ms"].copy()
    changed["play_ms"][0] += 1
    third = RunRecorder(tmp_path / "c.duckdb")
    third.log_events(EventBatch(**changed))
    assert third.event_log_hash() != digest
    reopened = RunRecorder(tmp_path / "a" / "sandbox.duckdb")  # opening an existing run appends, keeps
    assert reopened.event_log_hash() == digest and reopened.count("events") == 1_000
    for r in (again, third, reopened):
        r.close()


def test_names_are_stored_and_unknown_names_refused(tmp_path):
    recorder = RunRecorder(tmp_path / "run.duckdb")
    recorder.log_events(random_events(20))
    counts = recorder.behaviour_counts()
    assert counts.to_numpy().sum() == 20 and list(counts.columns) == list(BEHAVIOURS)
    names = recorder.connection.execute("SELECT DISTINCT behaviour FROM events").fetchall()
    assert {n for (n,) in names} <= set(BEHAVIOURS)
    recorder.connection.execute("INSERT INTO events (event_id, scenario, behaviour) VALUES (99, 'radio', 'moonwalk')")
    with pytest.raises(ValueError, match="events.behaviour holds a value outside"):
        recorder.read_events()
    with pytest.raises(ValueError, match="unknown table 'bogus'"):
        recorder.count("bogus")
    recorder.close()


def test_dead_letters_runs_tracks_and_assignments_are_kept(tmp_path):
    recorder = RunRecorder(tmp_path / "run.duckdb")
    letters = [DeadLetter("{broken", "malformed JSON: oops", "replay", 5),
               DeadLetter('{"user_id": -1}', "invalid field: user_id", "kafka", 6)]
    recorder.log_dead_letters(letters)
    recorder.log_run("run-1", 7, {"sim": {"n_users": 3}})
    meta = TrackMetadata(np.array([0, 0, 1]), np.array([2, 2, 0]), np.full(3, 1000), np.array([0, 5, 9]))
    recorder.log_tracks(meta)
    recorder.log_assignments(np.arange(3), assign_arms(np.arange(3), "e", "s", ARMS), "e", "s")
    con = recorder.connection
    assert con.execute("SELECT received_ts, source, payload, reason FROM dead_letters ORDER BY received_ts"
                       ).fetchall() == [(d.received_ts, d.source, d.payload, d.reason) for d in letters]
    assert con.execute("SELECT run_id, seed, settings->'$.sim.n_users' FROM runs").fetchall() == [("run-1", 7, "3")]
    assert con.execute("SELECT track_id, artist_id, release_ts FROM tracks ORDER BY track_id").fetchall() == [
        (0, 0, 0), (1, 0, 5), (2, 1, 9)]
    assert con.execute("SELECT count(*), count(DISTINCT bucket) FROM assignments WHERE experiment = 'e'"
                       ).fetchone()[0] == 3
    recorder.close()


def response(request: SlateRequest, tracks, scores, model="popularity") -> RankResponse:
    score = np.asarray(scores, np.float32)
    return RankResponse(request.request_id, request.user_id, np.asarray(tracks, np.int64), {RANKING_SCORE: score},
                        order_by_score(score), model, "1")


def test_responses_log_requests_and_the_shown_slate(tmp_path):
    recorder = RunRecorder(tmp_path / "run.duckdb")
    request = SlateRequest(5, 2, "home_feed", 1_000, slate_size=2)
    recorder.log_response(request, response(request, [30, 31, 32], [0.1, 0.9, 0.5]), "control")
    with pytest.raises(ValueError, match="3 requests, 3 responses, 2 arms"):
        recorder.log_responses([request] * 3, [response(request, [1], [1.0])] * 3, ["a", "b"])
    con = recorder.connection
    recorder.flush()
    assert con.execute("SELECT * FROM requests").fetchall() == [
        (5, 1_000, 2, "home_feed", "control", "popularity", "1", 3, 2)]
    rows = con.execute("SELECT request_id, position, track_id, score, arm, model_name FROM impressions "
                       "ORDER BY position").fetchall()
    assert rows == [(5, 0, 31, pytest.approx(0.9), "control", "popularity"),
                    (5, 1, 32, pytest.approx(0.5), "control", "popularity")]
    recorder.close()


def test_impressions_keep_each_requests_arm_and_model(tmp_path):
    recorder = RunRecorder(tmp_path / "run.duckdb")
    served = [("treatment", "cooccurrence", 3), ("control", "popularity", 1), ("treatment", "cooccurrence", 2),
              ("other", "popularity", 2)]
    for request_id, (arm, model, size) in enumerate(served):
        request = SlateRequest(request_id, request_id, "home_feed", 1_000, slate_size=size)
        recorder.log_response(request, response(request, [7, 8, 9], [0.3, 0.2, 0.1], model), arm)
    recorder.flush()
    rows = recorder.connection.execute(
        "SELECT request_id, arm, model_name FROM impressions ORDER BY request_id, position").fetchall()
    assert rows == [(i, arm, model) for i, (arm, model, size) in enumerate(served) for _ in range(size)]
    recorder.close()


# -- metrics on a small log with known answers ------------------------------------------

def synthetic_run(path: Path) -> RunRecorder:
    """control: users 0 and 1 (3 requests); treatment: users 2 and 3 (2 requests). Every
    request shows 2 tracks; reactions are listed per (request, track)."""
    recorder = RunRecorder(path)
    slates = {(10, 0, "control"): [100, 101], (11, 1, "control"): [102, 103], (12, 0, "control"): [104, 105],
              (20, 2, "treatment"): [200, 201], (21, 3, "treatment"): [202, 203]}
    reactions = {(10, 100): ["play", "full_play", "like"], (10, 101): ["skip"], (11, 102): ["play", "full_play"],
                 (20, 200): ["full_play"], (20, 201): ["play", "full_play", "like"], (21, 202): ["skip"]}
    rows = []
    for (request_id, user, arm), tracks in slates.items():
        request = SlateRequest(request_id, user, "home_feed", 0, slate_size=2)
        recorder.log_response(request, response(request, tracks, [1.0, 0.5]), arm)
        for position, track in enumerate(tracks):
            for behaviour in ["impression"] + reactions.get((request_id, track), []):
                rows.append((user, track, behaviour, request_id, position, arm))
    organic = [(0, 999, "full_play", -1, -1, "control")]  # library play: not recommendation traffic
    rows += organic + [rows[2]]  # and one redelivered event, below
    n = len(rows)
    event_ids = list(range(n - 1)) + [2]
    recorder.log_events(EventBatch.from_columns(
        event_id=event_ids, ts=np.arange(n), user_id=[r[0] for r in rows], track_id=[r[1] for r in rows],
        scenario=np.full(n, SCENARIO_CODE["home_feed"]), behaviour=[BEHAVIOUR_CODE[r[2]] for r in rows],
        request_id=[r[3] for r in rows], position=[r[4] for r in rows], arm=np.array([r[5] for r in rows], object)))
    recorder.flush()
    return recorder


def test_engagement_by_arm_on_a_known_log(tmp_path):
    recorder = synthetic_run(tmp_path / "run.duckdb")
    metrics = engagement_by_arm(recorder.connection)
    recorder.close()
    assert list(metrics.index) == ["control", "treatment"]
    control, treatment = metrics.loc["control"], metrics.loc["treatment"]
    assert (control["users"], control["requests"], control["impressions"]) == (2, 3, 6)
    assert (treatment["users"], treatment["requests"], treatment["impressions"]) == (2, 2, 4)
    assert control["play_rate"] == pytest.approx(3 / 6)  # 100, 101 (skip) and 102 were listened to
    assert control["full_play_rate"] == pytest.approx(2 / 6)
    assert control["skip_rate"] == pytest.approx(1 / 6)
    assert control["like_rate"] == pytest.approx(1 / 6)
    assert control["full_plays_per_user"] == pytest.approx(2 / 2)  # the organic play does not count
    assert treatment["play_rate"] == pytest.approx(3 / 4)
    assert treatment["full_play_rate"] == pytest.approx(2 / 4)
    assert treatment["skip_rate"] == pytest.approx(1 / 4)
    assert treatment["like_rate"] == pytest.approx(1 / 4)
    assert treatment["full_plays_per_user"] == pytest.approx(1.0)
    assert engagement_by_arm(tmp_path / "run.duckdb").equals(metrics)  # by path, read-only


def test_ab_report_on_a_known_log(tmp_path):
    synthetic_run(tmp_path / "run.duckdb").close()
    report, srm = ab_report(tmp_path / "run.duckdb", {"control": 0.5, "treatment": 0.5})
    assert srm.observed == {"control": 2, "treatment": 2} and not srm.mismatch
    per_user, rate = report.to_dict("records")
    # full plays per user: control 1, 1; treatment 2, 0: same mean, no lift
    assert (per_user["metric"], per_user["control"], per_user["treatment"]) == ("full_plays_per_user", 1.0, 1.0)
    assert per_user["lift"] == 0 and per_user["p_value"] == pytest.approx(1.0)
    # full-play rate: control 2 of 6 impressions, treatment 2 of 4
    assert rate["metric"] == "full_play_rate" and rate["lift"] == pytest.approx(0.5 / (2 / 6) - 1)
    assert rate["ci_low"] < rate["lift"] < rate["ci_high"]


# -- A/B statistics ---------------------------------------------------------------------

def test_mean_lift_known_values_and_coverage():
    control, treatment = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 3.0, 4.0, 5.0, 6.0])
    lift = mean_lift(control, treatment)
    assert lift.lift == pytest.approx(4.0 / 2.5 - 1)
    se = np.sqrt(treatment.var(ddof=1) / 5 / 2.5**2 + 4.0**2 * control.var(ddof=1) / 4 / 2.5**4)
    assert (lift.ci_high - lift.ci_low) / 2 > 1.96 * se  # t quantile with few df is wider than normal
    rng = np.random.default_rng(0)
    covered, false_positives = 0, 0
    for _ in range(300):
        c, t = rng.exponential(2.0, 400), rng.exponential(2.2, 400)  # true lift +10%
        result = mean_lift(c, t)
        covered += result.ci_low <= 0.1 <= result.ci_high
        false_positives += mean_lift(c, rng.exponential(2.0, 400)).p_value < 0.05
    assert 0.91 <= covered / 300 <= 0.99
    assert false_positives / 300 <= 0.09


def test_a_true_lift_of_one_mde_is_found_about_80_percent_of_the_time():
    # Normal data with a small MDE, so the lift barely changes the standard error.
    rng = np.random.default_rng(4)
    mde = mean_lift(rng.normal(10, 3, 500), rng.normal(10, 3, 500)).mde
    assert mde == pytest.approx((1.96 + 0.8416) * np.sqrt(2 * 9 / 500) / 10, rel=0.1)
    found = sum(mean_lift(rng.normal(10, 3, 500), rng.normal(10 * (1 + mde), 3, 500)).p_value < 0.05
                for _ in range(400))
    assert 0.70 <= found / 400 <= 0.88
    quarter = mean_lift(rng.normal(10, 3, 2000), rng.normal(10, 3, 2000)).mde
    assert quarter == pytest.approx(mde / 2, rel=0.1)  # four times the users, half the MDE


def test_ratio_delta_method_matches_monte_carlo():
    rng = np.random.default_rng(1)

    def arm(rate: float, users: int = 300):
        impressions = rng.poisson(20, users) + 1
        return rng.binomial(impressions, rng.beta(rate * 10, (1 - rate) * 10, users)), impressions

    ratios, variances = [], []
    for _ in range(200):
        y, n = arm(0.3)
        ratio, var = ratio_variance(y, n)
        ratios.append(ratio)
        variances.append(var)
    assert np.mean(variances) == pytest.approx(np.var(ratios, ddof=1), rel=0.25)
    lift = ratio_lift(*arm(0.3, 3000), *arm(0.36, 3000))
    assert lift.ci_low < 0.2 < lift.ci_high and lift.p_value < 1e-6


def test_sample_ratio_mismatch_is_flagged():
    assert not sample_ratio_check({"control": 5_030, "treatment": 4_970}, ARMS).mismatch
    srm = sample_ratio_check({"control": 5_200, "treatment": 4_800}, ARMS)
    assert srm.chi2 == pytest.approx(16.0) and srm.mismatch
    with pytest.raises(ValueError, match="no expected share"):
        sample_ratio_check({"other": 3}, ARMS)
    with pytest.raises(ValueError, match="control mean is 0"):
        mean_lift(np.zeros(3), np.ones(3))
