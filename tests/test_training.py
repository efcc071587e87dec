"""Training pipeline: datasets from a DuckDB event log, metrics, trainer, checkpoints, importer.

The event log is a real DuckDB file written from an EventBatch (the recorder's layout), with
the awkward parts of real logs in it: organic plays, redelivered duplicates, dislikes,
requests without any reaction, several days.
"""

from __future__ import annotations

import json
import math

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from features.sequence import sequences_from_log
from ranker.batch import TASKS
from ranker.training.data import DAY_MS, iterate_batches, load_request_log, split_by_time
from ranker.training.importer import import_interactions
from ranker.training.metrics import auc, gauc, logloss, ndcg_at_k
from streaming.events import BEHAVIOUR_CODE, BEHAVIOURS, SCENARIO_CODE, EventBatch
from tests.support import TRAINING_LOG_TRACKS, synthetic_log, write_log

torch.set_num_threads(1)
N_TRACKS = TRAINING_LOG_TRACKS


@pytest.fixture(scope="module")
def events() -> EventBatch:
    return synthetic_log()


@pytest.fixture(scope="module")
def db_path(tmp_path_factory, events):
    path = tmp_path_factory.mktemp("log") / "sandbox.duckdb"
    redelivered = events.select(np.arange(0, len(events), 17))  # at-least-once duplicates
    write_log(path, EventBatch.concat([events, redelivered]))
    return path


@pytest.fixture(scope="module")
def log(db_path):
    return load_request_log(db_path)


# ----------------------------------------------------------------------------- dataset

def test_dataset_rows_match_a_direct_recompute(log, events):
    frame = events.to_pandas()
    max_len = 8
    assert len(log) == frame.request_id.max() + 1 and log.n_tracks == N_TRACKS
    rows = np.array([0, 5, len(log) // 2, len(log) - 1])
    batch = log.batch(rows, max_len)
    for b, row in enumerate(rows):
        request = log.request_id[row]
        shown = frame[(frame.request_id == request) & (frame.behaviour == "impression")].sort_values("position")
        user, first_event = shown.user_id.iloc[0], shown.event_id.min()
        before = events.select((events.user_id == user) & (events.event_id < first_event))
        expected = sequences_from_log(before, max_len).get(user)
        n = int(batch.history_lengths[b])
        assert n == (len(expected) if expected else 0)
        if expected:
            assert batch.history_tracks[b, :n].tolist() == (expected.track_ids + 1).tolist()
            assert batch.history_behaviours[b, :n].tolist() == expected.behaviours.tolist()
            assert batch.history_scenarios[b, :n].tolist() == expected.scenarios.tolist()
            assert batch.history_ts[b, :n].tolist() == expected.timestamps.tolist()
        assert not batch.history_tracks[b, n:].any()
        assert BEHAVIOUR_CODE["impression"] not in batch.history_behaviours[b, :n].tolist()

        m = len(shown)
        assert batch.candidate_mask[b].sum() == m and batch.candidate_tracks[b, :m].tolist() == (shown.track_id + 1).tolist()
        assert batch.scenario[b] == SCENARIO_CODE[shown.scenario.iloc[0]] and batch.request_ts[b] == shown.ts.min()
        reactions = frame[frame.request_id == request]
        for task_index, task in enumerate(TASKS):
            acted = set(reactions[reactions.behaviour == task].track_id)
            assert batch.labels[b, :m, task_index].tolist() == [float(t in acted) for t in shown.track_id]
        assert not batch.labels[b, m:].any()


def test_time_split_has_no_leakage(log):
    split = split_by_time(log, eval_window_ms=DAY_MS)
    assert len(split.train) + len(split.eval) == len(log) and len(split.train) > len(split.eval) > 0
    assert split.train.request_ts.max() < split.cutoff_ts <= split.eval.request_ts.min()
    start, end = split.train.history_window(np.arange(len(split.train)), max_len=10_000)
    seen_ts = np.concatenate([split.train.token_ts[a:b] for a, b in zip(start, end)])
    assert seen_ts.max() < split.cutoff_ts  # no train history token from the eval window
    train_ids, eval_ids = set(split.train.request_id), set(split.eval.request_id)
    assert not train_ids & eval_ids


def test_batches_cover_every_row_once_and_depend_only_on_seed_and_epoch():
    first = np.concatenate(list(iterate_batches(10, 3, shuffle=True, seed=1, epoch=2)))
    again = np.concatenate(list(iterate_batches(10, 3, shuffle=True, seed=1, epoch=2)))
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() == again.tolist()


def test_bad_logs_are_named(tmp_path):
    path = tmp_path / "bad.duckdb"
    frame = synthetic_log(n_requests=5).to_pandas()
    frame.loc[0, "behaviour"] = "teleport"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE events AS SELECT * FROM frame")
    con.close()
    with pytest.raises(ValueError, match="teleport"):
        load_request_log(path)
    with pytest.raises(ValueError, match="no `events` table"):
        duckdb.connect(str(tmp_path / "empty.duckdb")).close()
        load_request_log(tmp_path / "empty.duckdb")


# ----------------------------------------------------------------------------- metrics

def test_auc_and_gauc_against_hand_computed_values():
    # Pairs (pos, neg): (.4,.1) (.4,.35) (.8,.1) (.8,.35) all won -> 1; swap one pair: 3/4.
    assert auc([0, 1, 0, 1], [0.1, 0.4, 0.35, 0.8]) == 1.0
    assert auc([0, 1, 0, 1], [0.1, 0.3, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    # User a: 4 impressions, AUC 0.75; user b: 2 impressions, AUC 0; user c: one class, skipped.
    labels = [0, 1, 0, 1, 1, 0, 1, 1]
    scores = [0.1, 0.3, 0.35, 0.8, 0.2, 0.9, 0.5, 0.6]
    users = ["a", "a", "a", "a", "b", "b", "c", "c"]
    assert gauc(labels, scores, users) == pytest.approx((4 * 0.75 + 2 * 0.0) / 6)
    assert gauc(labels[:4], scores[:4], [7] * 4) == auc(labels[:4], scores[:4])


def test_logloss_and_ndcg_against_hand_computed_values():
    assert logloss([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))
    assert logloss([1, 0], [2.0, -1.0]) == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2)
    # One request: relevances [0, 2, 1] ranked by scores [.9, .5, .1] -> order rel 0, 2, 1.
    dcg = 0 / 1 + 3 / math.log2(3) + 1 / math.log2(4)
    ideal = 3 / 1 + 1 / math.log2(3)
    assert ndcg_at_k([0, 2, 1], [0.9, 0.5, 0.1], [1, 1, 1]) == pytest.approx(dcg / ideal)
    # k=1 keeps only the top; a request with no relevant item is skipped.
    assert ndcg_at_k([0, 2, 1, 0, 0], [0.9, 0.5, 0.1, 0.3, 0.2], [1, 1, 1, 2, 2], k=1) == 0.0
    # Ties in score fall back to the logged position.
    assert ndcg_at_k([0, 1], [0.5, 0.5], [1, 1], positions=[1, 0]) == 1.0


# ----------------------------------------------------------------------------- trainer

TINY_MODEL = {"dropout": 0.0}


def test_import_interactions_round_trip(tmp_path):
    source = pd.DataFrame({
        "member": ["u9", "u7", "u9", "u7", "u9", "u8"],
        "song": ["x", "y", "y", "z", "z", "x"],
        "when": pd.to_datetime(["2024-01-01 10:00", "2024-01-01 09:00", "2024-01-01 11:00",
                                "2024-01-02 09:00", "2024-01-02 12:00", "2024-01-02 10:00"]),
        "what": ["full_play", "like", "skip", "full_play", "share", "play"],
    })
    csv = tmp_path / "interactions.csv"
    source.to_csv(csv, index=False)
    db = tmp_path / "imported.duckdb"
    summary = import_interactions(csv, db, {"user": "member", "item": "song", "timestamp": "when", "behaviour": "what"},
                                  n_negatives=2, seed=3)
    assert (summary.n_interactions, summary.n_users, summary.n_tracks, summary.n_requests) == (6, 3, 3, 6)
    assert summary.n_events == 6 * 4
    with pytest.raises(FileExistsError):
        import_interactions(csv, db, {"user": "member", "item": "song", "timestamp": "when"})

    log = load_request_log(db)
    con = duckdb.connect(str(db), read_only=True)
    users = dict(con.execute("SELECT user_id, source_user FROM user_ids").fetchall())
    tracks = dict(con.execute("SELECT track_id, source_item FROM track_ids").fetchall())
    scenarios = {row[0] for row in con.execute("SELECT DISTINCT scenario FROM events").fetchall()}
    con.close()
    assert scenarios == {"library"}
    ordered = source.sort_values("when").reset_index(drop=True)
    batch = log.batch(np.arange(len(log)), max_len=16)
    for row in range(len(log)):  # requests come out in time order, one per interaction
        expected = ordered.iloc[row]
        assert users[int(log.user_id[row])] == expected.member
        shown = batch.candidate_tracks[row][batch.candidate_mask[row]] - 1
        assert len(shown) == 3 and len(set(shown.tolist()) - {int(k) for k in tracks}) == 0
        behaviour = expected.what
        if behaviour in TASKS:  # the positive carries its label; the negatives none
            labelled = shown[batch.labels[row, :3, TASKS.index(behaviour)].bool()].tolist()
            assert [tracks[t] for t in labelled] == [expected.song]
        # History: the user's earlier interactions, oldest first.
        earlier = ordered[(ordered.member == expected.member) & (ordered.when < expected.when)]
        n = int(batch.history_lengths[row])
        assert [tracks[int(t) - 1] for t in batch.history_tracks[row, :n]] == earlier.song.tolist()
        assert [BEHAVIOURS[b] for b in batch.history_behaviours[row, :n]] == earlier.what.tolist()

    with pytest.raises(ValueError, match="unknown value"):
        bad = tmp_path / "bad.csv"
        source.assign(what="hum").to_csv(bad, index=False)
        import_interactions(bad, tmp_path / "bad.duckdb", {"user": "member", "item": "song", "timestamp": "when", "behaviour": "what"})


@pytest.fixture(scope="module")
def split(log):
    return split_by_time(log, eval_window_ms=DAY_MS)


def test_a_few_steps_reduce_the_training_loss(split, tmp_path):
    from ranker.models import build_model
    from ranker.training.train import TrainConfig, evaluate, train

    torch.manual_seed(0)
    untrained = build_model("astro", "xs", split.train.n_tracks, max_len=32, **TINY_MODEL)
    before = evaluate(untrained, split.train, max_len=32)["loss"]
    result = train(TrainConfig("astro", "xs", None, tmp_path / "astro", steps=40, batch_size=16, lr=3e-3,
                               max_len=32, model_overrides=TINY_MODEL, device="cpu"), progress=False, data=split)
    from ranker.training.checkpoint import load_checkpoint

    model, _ = load_checkpoint(result.checkpoint)
    after = evaluate(model, split.train, max_len=32)["loss"]
    assert after < before - 0.1, (before, after)
    assert result.steps == 40 and result.requests_seen == 640 and result.n_params == model.n_params()
    assert result.flops_per_request > 0 and result.train_compute == 3.0 * result.flops_per_request * 640
    assert set(result.metrics) >= {f"auc/{t}" for t in TASKS} | {"loss", "ndcg@10"}


def test_checkpoint_round_trip_and_resume(split, tmp_path):
    from safetensors.torch import load_file

    from ranker.training.checkpoint import OPTIMIZER_FILE, WEIGHTS_FILE, load_checkpoint
    from ranker.training.train import TrainConfig, train

    kwargs = dict(batch_size=16, lr=3e-3, max_len=32, model_overrides=TINY_MODEL, device="cpu", checkpoint_every=0)
    straight = train(TrainConfig("sasrec", "xs", None, tmp_path / "straight", steps=6,
                                 **kwargs), progress=False, data=split)
    first = train(TrainConfig("sasrec", "xs", None, tmp_path / "resumed", steps=6, stop_after=4,
                              **kwargs), progress=False, data=split)
    assert json.loads((tmp_path / "resumed" / "checkpoint.json").read_text())["step"] == 4
    resumed = train(TrainConfig("sasrec", "xs", None, tmp_path / "resumed", steps=6, resume=True,
                                **kwargs), progress=False, data=split)
    assert first.steps == 4 and resumed.steps == 6 and len(resumed.loss_history) == 2
    assert resumed.loss_history[0][0] == 5
    # Data order and LR depend on the step alone, so 4 + 2 steps equal 6 straight steps.
    assert resumed.model_version == straight.model_version
    assert resumed.model_version.startswith("sasrec-xs-")

    model, meta = load_checkpoint(tmp_path / "resumed")
    assert meta["family"] == "sasrec" and meta["step"] == 6 and meta["metrics"]["loss"] == resumed.metrics["loss"]
    weights = load_file(tmp_path / "resumed" / WEIGHTS_FILE)
    assert all(isinstance(t, torch.Tensor) for t in weights.values())
    torch.load(tmp_path / "resumed" / OPTIMIZER_FILE, weights_only=True)
    batch = split.eval.batch(np.arange(8), 32)
    again, _ = load_checkpoint(tmp_path / "straight")
    with torch.no_grad():
        torch.testing.assert_close(model.score(model(batch), batch.candidate_mask),
                                   again.score(again(batch), batch.candidate_mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not hstu/xs"):
        train(TrainConfig("hstu", "xs", None, tmp_path / "resumed", steps=7, resume=True,
                          **kwargs), progress=False, data=split)


def test_command_line_set_overrides_the_model_config(db_path, tmp_path):
    from ranker.training.checkpoint import load_checkpoint
    from ranker.training.train import main

    out = tmp_path / "astro"
    result = main(["--model", "astro", "--size", "xs", "--db", str(db_path), "--out", str(out), "--steps", "2",
                   "--batch-size", "8", "--max-len", "16", "--device", "cpu", "--checkpoint-every", "0",
                   "--set", "share_block_layers=True", "--set", "partition=none", "--set", "d_model=16",
                   "--set", "recency_scales=[4, 8]"])
    model, meta = load_checkpoint(out)
    expected = {"share_block_layers": True, "partition": "none", "d_model": 16, "recency_scales": [4, 8]}
    assert meta["model_overrides"] == expected
    assert {k: meta["config"][k] for k in expected} == expected
    assert model.config.recency_scales == (4, 8) and result.n_params == model.n_params()
    with pytest.raises(SystemExit):
        main(["--model", "astro", "--size", "xs", "--db", str(db_path), "--out", str(out), "--set", "d_model"])
    with pytest.raises(ValueError, match="unknown AstroConfig overrides"):
        main(["--model", "astro", "--size", "xs", "--db", str(db_path), "--out", str(out), "--steps", "1",
              "--batch-size", "8", "--device", "cpu", "--set", "no_such_field=1"])


# ----------------------------------------------------------------------------- simulator data and the ladder

@pytest.fixture(scope="module")
def simulated_db(tmp_path_factory):
    """A real closed-loop log: the simulator served by the random policy, recorded to DuckDB."""
    from experiments.recorder import RunRecorder
    from simulator.config import SimConfig
    from simulator.platform import MusicPlatform
    from simulator.policies import RandomRecommender

    path = tmp_path_factory.mktemp("sim") / "sandbox.duckdb"
    recorder = RunRecorder(path)
    platform = MusicPlatform(SimConfig(n_users=120, n_tracks=1000, days=2.0, seed=5), None, recorder.log_events)
    platform.recommender = RandomRecommender(platform.catalog.metadata(), seed=5)
    recorder.log_tracks(platform.catalog.metadata())
    platform.run()
    recorder.close()
    return path


def test_simulator_log_histories_end_before_their_request(simulated_db):
    log = load_request_log(simulated_db)
    assert len(log) > 200 and log.n_tracks == 1000 and log.labels.any(axis=0).sum() >= 3
    start, end = log.history_window(np.arange(len(log)), max_len=256)
    last_seen = np.array([log.token_ts[e - 1] if e > s else -1 for s, e in zip(start, end)])
    assert (last_seen <= log.request_ts).all()
    con = duckdb.connect(str(simulated_db), read_only=True)
    tokens_of_user = dict(con.execute("SELECT user_id, count(*) FROM events WHERE behaviour <> 'impression' GROUP BY 1").fetchall())
    con.close()
    last = np.argmax(log.request_ts)  # the latest request sees (at most) all of its user's tokens
    assert end[last] - log.history_first[last] <= tokens_of_user[int(log.user_id[last])]


def test_power_law_fit_recovers_known_parameters():
    from studies.scaling import fit_power_law

    compute = np.geomspace(1e9, 1e13, 6)
    loss = 2.0 * (compute / 1e9) ** -0.5 + 1.0
    fit = fit_power_law("x", compute, loss)
    assert (fit.a, fit.b, fit.c) == pytest.approx((2.0, 0.5, 1.0), rel=1e-3) and fit.r2 == pytest.approx(1.0)
    assert math.isnan(fit_power_law("x", compute[:2], loss[:2]).b)  # too few points to fit
    from studies.scaling import describe_fit

    assert describe_fit(fit).startswith("x: val_loss = 2 (C/1e+09)^-0.5 + 1, R² = 1.0000 over 6 sizes")
    assert describe_fit(fit_power_law("x", compute[:2], loss[:2])) == (
        "x: no power-law fit: 2 size(s), the fit needs at least 3")


def test_ladder_writes_its_reports_and_reuses_done_rungs(simulated_db, tmp_path):
    from studies.scaling import Budget, run_ladder

    budget = Budget(steps=3, batch_size=8, max_len=32)
    table = run_ladder(simulated_db, tmp_path, families=["sasrec"], sizes=["xs", "s", "m"], budget=budget,
                       eval_window_ms=12 * 3_600_000, device="cpu", progress=False)
    assert list(table["size"]) == ["xs", "s", "m"] and table["params"].is_monotonic_increasing
    assert (table["compute"] == 3 * table["flops_per_request"] * 24).all()
    for name in ("scaling.csv", "scaling.md", "scaling.png", "scaling.html", "ladder.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    assert "data:image/png;base64," in (tmp_path / "scaling.html").read_text()
    again = run_ladder(simulated_db, tmp_path, families=["sasrec"], sizes=["xs", "s", "m"], budget=budget,
                       eval_window_ms=12 * 3_600_000, device="cpu", progress=False)
    pd.testing.assert_frame_equal(again, table)  # every rung reused, nothing retrained
    assert len((tmp_path / "ladder.jsonl").read_text().splitlines()) == 3
    # A row trained under other defaults is refused, not reused: its recorded config differs.
    rows = [json.loads(line) for line in (tmp_path / "ladder.jsonl").read_text().splitlines()]
    rows[1]["config"]["d_model"] = 48
    (tmp_path / "ladder.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"sasrec-s in .* another config \(d_model: recorded 48, now 64\)"):
        run_ladder(simulated_db, tmp_path, families=["sasrec"], sizes=["xs", "s", "m"], budget=budget,
                   eval_window_ms=12 * 3_600_000, device="cpu", progress=False)
