"""Public data: RecBole's .inter import, leave-one-out, HR/NDCG/MRR (fast == reference), the
next-item objective of every family, and the `climber import / train / eval` commands."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ranker.batch import random_batch
from ranker.models import FAMILIES, build_model
from ranker.training.data import load_request_log
from ranker.training.importer import import_interactions
from ranker.training.loo import leave_one_out, metrics_from_ranks, pessimistic_ranks, reference_metrics
from ranker.training.loo_eval import Protocol, evaluate_loo, model_scorer, popularity_scorer
from ranker.training.next_item import counted_outputs, next_item_loss, popularity_log_q, training_windows
from sandbox.cli import app

TINY = Path(__file__).parent / "data" / "tiny.inter"  # RecBole's format: 12 users, 30 items
COLUMNS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp"}
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("tiny") / "tiny.duckdb"
    import_interactions(TINY, db, COLUMNS, negatives="none")
    return db


@pytest.fixture(scope="module")
def split(tiny_db):
    return leave_one_out(load_request_log(tiny_db))


def test_recbole_inter_imports_with_each_negative_sampler(tmp_path):
    source = [line.split("\t") for line in TINY.read_text().splitlines()[1:]]
    for negatives in ("none", "uniform", "popularity"):
        db = tmp_path / f"{negatives}.duckdb"
        summary = import_interactions(TINY, db, COLUMNS, negatives=negatives, n_negatives=4)
        assert (summary.n_interactions, summary.n_users) == (len(source), 12)
        assert summary.n_requests == (0 if negatives == "none" else len(source))
        con = duckdb.connect(str(db), read_only=True)
        settings = dict(con.execute("SELECT key, value FROM import_settings").fetchall())
        items = dict(con.execute("SELECT track_id, source_item FROM track_ids").fetchall())
        con.close()
        assert settings["negatives"] == negatives
        assert set(items.values()) == {row[1] for row in source}  # token ids kept as strings
        log = load_request_log(db)
        assert len(log.token_tracks) == len(source) and len(log) == summary.n_requests
        if len(log):  # the positive is never its own negative
            batch = log.batch(np.arange(len(log)), max_len=8)
            positive = batch.labels[..., 0].bool()
            assert (positive.sum(1) == 1).all()
            for row in range(len(log)):
                shown = batch.candidate_tracks[row][batch.candidate_mask[row]].tolist()
                assert len(shown) == 5 and len(set(shown)) == len(shown) or shown.count(
                    int(batch.candidate_tracks[row][positive[row]])) == 1


def test_inter_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id\titem_id:token\ttimestamp:float\n1\t2\t3\n")
    with pytest.raises(ValueError, match="not `name:type`"):
        import_interactions(bad, tmp_path / "x.duckdb", COLUMNS)
    with pytest.raises(ValueError, match="negatives must be one of"):
        import_interactions(TINY, tmp_path / "y.duckdb", COLUMNS, negatives="hard")


def test_ratings_import_as_behaviours_and_keep_the_same_targets(tmp_path, split):
    """ML-100K's ratings through --behaviour-map: every rated item stays a consumed token, so
    leave-one-out holds out the same items as the import without ratings."""
    ratings = [int(line.split("\t")[2]) for line in TINY.read_text().splitlines()[1:]]
    db = tmp_path / "rated.duckdb"
    import_interactions(TINY, db, {**COLUMNS, "behaviour": "rating"}, negatives="none",
                        behaviour_map="5=like,4=full_play,1-3=play")
    con = duckdb.connect(str(db), read_only=True)
    counts = dict(con.execute("SELECT behaviour, count(*) FROM events GROUP BY 1").fetchall())
    settings = dict(con.execute("SELECT key, value FROM import_settings").fetchall())
    con.close()
    assert counts == {name: n for name, n in (("like", ratings.count(5)), ("full_play", ratings.count(4)),
                                               ("play", sum(r <= 3 for r in ratings))) if n}
    assert settings["behaviour_map"] == "5=like,4=full_play,1=play,2=play,3=play"
    rated = leave_one_out(load_request_log(db))
    assert np.array_equal(rated.test_index, split.test_index) and np.array_equal(rated.valid_index, split.valid_index)
    with pytest.raises(ValueError, match=r"does not name value\(s\) \['1', '2', '3'\]"):
        import_interactions(TINY, tmp_path / "a.duckdb", {**COLUMNS, "behaviour": "rating"}, behaviour_map="4-5=like")
    with pytest.raises(ValueError, match="'loved' is not one of"):
        import_interactions(TINY, tmp_path / "b.duckdb", {**COLUMNS, "behaviour": "rating"}, behaviour_map="5=loved")
    with pytest.raises(ValueError, match="needs a behaviour column"):
        import_interactions(TINY, tmp_path / "c.duckdb", COLUMNS, behaviour_map="5=like")


def test_leave_one_out_holds_out_each_users_last_two_items(split):
    log = split.log
    for u, first, valid, test in zip(split.users, split.user_first, split.valid_index, split.test_index):
        mine = np.flatnonzero(log.token_users == u)
        assert (first, valid, test) == (mine[0], mine[-2], mine[-1])
    train = split.train_token_mask()
    assert not train[split.valid_index].any() and not train[split.test_index].any()
    assert train.sum() == len(log.token_tracks) - 2 * len(split.users)
    firsts = set(split.user_first.tolist())
    for stride in (None, 1, 3, 4):  # every training target predicted exactly once, whatever the stride
        windows = training_windows(split, max_len=4, stride=stride)
        targets = [(s + p + 1, p + 1) for s, e, f in zip(windows.start, windows.end, windows.loss_from)
                   for p in range(f, e - s)]
        assert sorted(t for t, _ in targets) == [t for t in np.flatnonzero(train) if t not in firsts]
        first_of = {t: first for first, stop in zip(split.user_first, split.valid_index) for t in range(first, stop)}
        for target, context in targets:  # context = earlier tokens in the window: >= max_len - stride, or all
            assert context >= min(4 - (stride or 2), target - first_of[target])
        assert (windows.end - windows.start <= 4).all()
    with pytest.raises(ValueError, match="window stride must be in"):
        training_windows(split, max_len=4, stride=5)


@pytest.mark.parametrize("seed", range(4))
def test_fast_metrics_agree_with_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (40, 25), generator=g).float()  # many ties
    targets = torch.randint(0, 25, (40,), generator=g)
    excluded = torch.rand(40, 25, generator=g) < 0.2
    for mask in (None, excluded):
        fast = metrics_from_ranks(pessimistic_ranks(scores, targets, mask).numpy(), (1, 5, 10))
        skip = None if mask is None else [set(np.flatnonzero(row).tolist()) for row in mask.numpy()]
        slow = reference_metrics(scores.tolist(), targets.tolist(), (1, 5, 10), skip)
        assert fast == pytest.approx(slow, abs=1e-12) and "mrr@5" in fast  # RecBole's MRR@K too
    constant = torch.zeros(3, 7)  # a model that scores everything alike ranks the target last
    assert pessimistic_ranks(constant, torch.tensor([0, 3, 6])).tolist() == [6, 6, 6]


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_output_is_causal_for_every_family(family):
    torch.manual_seed(0)
    model = build_model(family, "s", 40, dropout=0.0, max_len=16).eval()
    batch = random_batch(3, 10, 0, 40, seed=2, min_length=10)
    full = model.sequence_output(batch)
    for t in (0, 5):
        cut = {name: getattr(batch, name)[:, :t + 1] for name in
               ("history_tracks", "history_behaviours", "history_scenarios", "history_ts")}
        prefix = dataclasses.replace(batch, **cut, history_lengths=batch.history_lengths.clamp_max(t + 1))
        assert torch.allclose(model.sequence_output(prefix)[:, t], full[:, t], atol=1e-5)
    assert model.next_item_logits(full).shape == (3, 10, 40)


@pytest.mark.parametrize("logit_norm", [True, False])
def test_next_item_logits_against_a_written_out_dot_product(logit_norm):
    """logit = <norm(h), item row> with the parameter-free layer norm (default), or <h, item
    row> as SASRec / RecBole score (logit_norm=false); items are 0-based, row 0 is padding."""
    torch.manual_seed(0)
    model = build_model("sasrec", "xs", 12, dropout=0.0, max_len=8, norm="post", logit_norm=logit_norm).eval()
    hidden = torch.randn(3, model.config.d_model) * 3 + 1
    table = model.embed.track.weight
    for row in range(3):
        h = hidden[row]
        if logit_norm:
            h = (h - h.mean()) / (h.var(unbiased=False) + 1e-5).sqrt()
        expected = torch.stack([(h * table[item + 1]).sum() for item in range(12)])
        assert torch.allclose(model.next_item_logits(hidden)[row], expected, atol=1e-5)
        assert torch.allclose(model.next_item_logits(hidden, torch.tensor([4, 0]))[row], expected[[4, 0]], atol=1e-5)


@pytest.fixture(scope="module")
def rated_split(tmp_path_factory):
    """The tiny log with ratings as behaviours: ASTRO's behaviour blocks both hold tokens."""
    db = tmp_path_factory.mktemp("rated") / "rated.duckdb"
    import_interactions(TINY, db, {**COLUMNS, "behaviour": "rating"}, negatives="none",
                        behaviour_map="5=like,4=full_play,1-3=play")
    return leave_one_out(load_request_log(db))


def _per_target(model, split, windows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits [T, n_tracks], targets and per-target losses, ordered by the target's token."""
    with torch.no_grad():
        hidden, targets, index = counted_outputs(model, split, windows, np.arange(len(windows)))
        order = index.argsort()
        logits = model.next_item_logits(hidden[order])
        losses = torch.nn.functional.cross_entropy(logits, targets[order], reduction="none")
    return logits, index[order], losses


MERGE_CASES = [(family, {}) for family in FAMILIES] + [
    ("astro", {"block_attention": "softmax", "norm": "post", "logit_norm": False}),  # the ML-100K recipe
    ("hstu", {"n_layers": 2}),  # relative position and time buckets between history tokens
    ("hstu", {"n_layers": 2, "norm": "post", "logit_norm": False}),  # post-norm HSTU layers
    ("astro", {"norm": "post"}),  # post-norm pointwise blocks
]


@pytest.mark.parametrize("family,overrides", MERGE_CASES, ids=lambda c: c if isinstance(c, str) else
                         ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_merged_prefixes_equal_one_window_per_prefix(rated_split, family, overrides):
    """Every prefix (stride 1): one window from each user's first token holds the prefixes of its
    first max_len + 1 tokens; in eval mode each target's logits and loss equal the reference's
    (one window per prefix), and the examples (target, context start) are the same multiset."""
    split, max_len = rated_split, 4
    merged = training_windows(split, max_len, 1, "merged")
    separate = training_windows(split, max_len, 1, "separate")
    examples = lambda w: sorted((int(s) + p + 1, int(s)) for s, e, f in zip(w.start, w.end, w.loss_from)  # noqa: E731
                                for p in range(f, e - s))
    assert examples(merged) == examples(separate)
    assert merged.n_targets == separate.n_targets and merged.n_items < separate.n_items
    assert len(merged) < len(separate)
    torch.manual_seed(0)
    size = "s" if family == "astro" else "xs"  # xs is one block; s has the two behaviour blocks
    model = build_model(family, size, split.n_tracks, max_len=max_len, **overrides).eval()
    assert model.prefix_invariant()
    fast, reference = _per_target(model, split, merged), _per_target(model, split, separate)
    assert torch.equal(fast[1], reference[1])
    torch.testing.assert_close(fast[0], reference[0])
    torch.testing.assert_close(fast[2], reference[2])


def test_recency_blocks_are_not_prefix_invariant(rated_split):
    """ASTRO's recency partition counts ages from the window's end: the merge would change its
    outputs (checked here), so the trainer gives it one window per prefix."""
    split = rated_split
    torch.manual_seed(0)
    model = build_model("astro", "s", split.n_tracks, max_len=4, partition="recency", recency_scales=(2, 4)).eval()
    assert not model.prefix_invariant()
    fast = _per_target(model, split, training_windows(split, 4, 1, "merged"))
    reference = _per_target(model, split, training_windows(split, 4, 1, "separate"))
    assert not torch.allclose(fast[0], reference[0], atol=1e-4)
    with pytest.raises(ValueError, match="prefix windows must be one of"):
        training_windows(split, 4, 1, "joined")


def test_next_item_steps_reduce_the_loss(split):
    torch.manual_seed(0)
    model = build_model("sasrec", "xs", split.n_tracks, dropout=0.0, max_len=8)
    windows = training_windows(split, 8)
    rows = np.arange(len(windows))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    before, _ = next_item_loss(model, split, windows, rows)
    for _ in range(15):
        loss, _ = next_item_loss(model, split, windows, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert next_item_loss(model, split, windows, rows)[0] < before - 0.3


@pytest.mark.parametrize("logit_norm", [True, False])
def test_sampled_softmax_with_log_q_estimates_the_full_loss(split, logit_norm):
    """With many popularity-drawn negatives, the logQ-corrected denominator is an importance-
    sampling estimate of the full softmax's, so the sampled loss is the full loss plus the
    target's own correction, mean(log K q_target), a constant of the data: equal gradients.
    Uncorrected, popular items would be overcounted and the gap would depend on the model."""
    torch.manual_seed(1)
    model = build_model("hstu", "xs", split.n_tracks, dropout=0.0, max_len=8, logit_norm=logit_norm)
    windows = training_windows(split, 8)
    rows = np.arange(len(windows))
    log_q, k = popularity_log_q(split), 4000
    targets = [split.log.token_tracks[s + p + 1] for s, e, f in zip(windows.start, windows.end, windows.loss_from)
               for p in range(f, e - s)]
    offset = float(np.log(k) + log_q[torch.tensor(targets)].mean())
    with torch.no_grad():
        full, _ = next_item_loss(model, split, windows, rows)
        sampled, _ = next_item_loss(model, split, windows, rows, k, log_q, torch.Generator().manual_seed(0))
    assert float(sampled) == pytest.approx(float(full) + offset, abs=0.05)


def test_protocols_score_the_same_targets(split):
    full = evaluate_loo(popularity_scorer(split), split, "test", Protocol(0), (10,))
    sampled = evaluate_loo(popularity_scorer(split), split, "test", Protocol(10), (10,))
    assert full["users"] == sampled["users"] == len(split.users)
    assert sampled["hr@10"] >= full["hr@10"]  # 10 negatives: HR@10 is 1 for everyone
    model = build_model("astro", "xs", split.n_tracks, max_len=8)
    impression = evaluate_loo(model_scorer(model, split, "test", 8, "impression", candidate_chunk=7), split,
                              "test", Protocol(0, exclude_seen=True), (5,))
    assert 0.0 <= impression["hr@5"] <= 1.0
    with pytest.raises(ValueError, match="loo-sampled:N"):
        Protocol.parse("loo-sampled")


def test_commands_import_train_next_item_and_eval(tmp_path):
    db, out = tmp_path / "tiny.duckdb", tmp_path / "hstu"
    imported = runner.invoke(app, ["import", str(TINY), "--db", str(db), "--user", "user_id", "--item", "item_id",
                                   "--time", "timestamp", "--negatives", "none"])
    assert imported.exit_code == 0, imported.output
    assert "no slates (--negatives none)" in imported.output
    trained = runner.invoke(app, ["train", "--model", "hstu", "--size", "xs", "--db", str(db), "--out", str(out),
                                  "--split", "loo", "--objective", "next-item", "--epochs", "2", "--batch-size", "8",
                                  "--max-len", "8"])
    assert trained.exit_code == 0, trained.output
    # Plain lines in a log, one per epoch with every figure on it (no wrap at 80 columns).
    epochs = [line for line in trained.output.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2, trained.output
    assert all(re.fullmatch(r"epoch \d/2  loss \S+  valid HR@10 \S+  NDCG@10 \S+  MRR@10 \S+  MRR \S+  \(\d+ s\)", line)
               for line in epochs), epochs
    assert any(len(line) > 80 for line in epochs)  # long enough that a wrapping console would split it
    assert "valid HR@10" in trained.output and "test (leave-one-out by time" in trained.output
    evaluated = runner.invoke(app, ["eval", str(out), "--db", str(db), "--protocol", "loo-sampled:5", "--k", "1", "3"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "5 sampled items the user never interacted with" in evaluated.output
    assert "HR@1" in evaluated.output and "NDCG@3" in evaluated.output and "MRR" in evaluated.output
    for flags, named in ((["--objective", "next-item"], "--split loo"), (["--patience", "2"], "next-item settings"),
                         (["--select-by", "mrr@10"], "--select-by"), (["--prefix-windows", "separate"], "--prefix-windows")):
        wrong = runner.invoke(app, ["train", "--model", "hstu", "--size", "xs", "--db", str(db), "--out", str(out),
                                    *flags])
        assert wrong.exit_code == 2 and named in wrong.output, (flags, wrong.output)
    popular = runner.invoke(app, ["eval", "popularity", "--db", str(db), "--protocol", "loo-full", "--exclude-seen"])
    assert popular.exit_code == 0 and "items seen before the target excluded" in popular.output


def test_select_by_keeps_the_best_validation_epoch_by_that_metric(tmp_path, split):
    """--select-by mrr@10 (RecBole's protocol): every epoch runs, the checkpoint holds the
    epoch best by validation MRR@10 (the earlier on a tie; re-evaluated from the checkpoint,
    it scores that epoch's figure), and the last epoch's test figures are kept beside."""
    from ranker.training.checkpoint import load_checkpoint
    from ranker.training.next_item import train_next_item

    lines: list[str] = []
    result = train_next_item("sasrec", "xs", split, tmp_path / "m", epochs=5, batch_size=4, lr=3e-2, max_len=8,
                             model_overrides={"norm": "post", "dropout": 0.0}, lr_schedule="constant",
                             grad_clip=0.0, select_by="mrr@10", say=lines.append)
    scores = [line["mrr@10"] for line in result.epochs]
    best = int(np.argmax(scores))  # the first maximum
    assert len(scores) == 5 and result.valid["mrr@10"] == scores[best]
    model, meta = load_checkpoint(tmp_path / "m")
    assert meta["select_by"] == "mrr@10" and meta["best_epoch"] == best + 1 and meta["patience"] is None
    again = evaluate_loo(model_scorer(model.eval(), split, "valid", 8, "next_item"), split, "valid", Protocol(0), (10,))
    assert again["mrr@10"] == pytest.approx(scores[best]) and again["hr@10"] == pytest.approx(result.epochs[best]["hr@10"])
    assert meta["test_metrics"] == result.test and set(meta["last_test_metrics"]) == set(result.test)
    assert any(f"kept epoch {best + 1} (best valid MRR@10" in line for line in lines)
    for wrong in ("auc", "hr@20", "MRR@10"):
        with pytest.raises(ValueError, match="select-by must be one of last, hr@10, ndcg@10, mrr@10, mrr"):
            train_next_item("sasrec", "xs", split, tmp_path / "x", select_by=wrong)


def test_early_stopping_keeps_the_best_validation_epoch(tmp_path, split):
    """--patience: epochs are chosen on the validation item; the checkpoint holds the best
    epoch's weights (re-evaluated, it scores that epoch's validation HR), the test item is
    scored once, after the choice."""
    from ranker.training.checkpoint import load_checkpoint
    from ranker.training.next_item import train_next_item

    lines: list[str] = []
    result = train_next_item("sasrec", "xs", split, tmp_path / "m", epochs=6, batch_size=4, lr=3e-2, max_len=8,
                             model_overrides={"norm": "post", "dropout": 0.0}, lr_schedule="constant",
                             grad_clip=0.0, patience=1, say=lines.append)
    scores = [line["hr@10"] for line in result.epochs]
    best = int(np.argmax(scores))  # the first maximum: a tie does not count as a rise
    assert result.valid["hr@10"] == scores[best]
    assert len(scores) == 6 or len(scores) == best + 2  # stopped one epoch (patience) after the best
    model, meta = load_checkpoint(tmp_path / "m")
    assert meta["best_epoch"] == best + 1 and meta["lr_schedule"] == "constant" and meta["config"]["norm"] == "post"
    again = evaluate_loo(model_scorer(model.eval(), split, "valid", 8, "next_item"), split, "valid", Protocol(0), (10,))
    assert again["hr@10"] == pytest.approx(scores[best])
    assert any("kept epoch" in line for line in lines) and "constant" in lines[0]
    with pytest.raises(ValueError, match="lr schedule"):
        train_next_item("sasrec", "xs", split, tmp_path / "x", lr_schedule="linear")
