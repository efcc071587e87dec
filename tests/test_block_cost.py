"""What an ASTRO block setting costs (issue 24): ASTRO's attention is sum_b L_b^2, so the
serving benchmark draws histories with a realistic behaviour mix, counts each request's
FLOPs from its real block lengths, times labelled variants in the same turns as HSTU, and
`climber bench block-cost` prints the blocks a log's own histories make."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.support import synthetic_log, write_log

torch.set_num_threads(1)

THREE_GROUPS = (("full_play", "like", "share", "add_to_playlist"), ("play",), ("skip", "dislike"))


def test_the_sandbox_mix_is_drawn_and_uniform_is_the_old_batch():
    from bench.serve_common import HISTORY_MIXES, mixed_batch
    from ranker.batch import random_batch
    from bench.serve_common import N_TRACKS
    from streaming.events import BEHAVIOURS

    batch = mixed_batch(8000, 3, seed=1, mix="sandbox")
    shares = np.bincount(batch.history_behaviours[0].numpy(), minlength=len(BEHAVIOURS)) / 8000
    for name, share in HISTORY_MIXES["sandbox"][0].items():
        assert abs(shares[BEHAVIOURS.index(name)] - share) < 0.02, name
    assert shares[BEHAVIOURS.index("impression")] == 0  # impressions are never history tokens
    old = random_batch(1, 50, 3, N_TRACKS, seed=5, min_length=50)
    new = mixed_batch(50, 3, seed=5, mix="uniform")
    assert torch.equal(old.history_behaviours, new.history_behaviours)
    with pytest.raises(ValueError, match="unknown history mix"):
        mixed_batch(10, 3, seed=0, mix="bogus")


def test_labelled_variants_are_timed_with_their_real_block_flops():
    from bench.serve_long import bench_lengths, length_summary, long_model, request_flops
    from bench.serve_common import mixed_batch

    overrides = {"astro@3g": {"partition": "behaviour", "behaviour_groups": THREE_GROUPS}}
    rows = bench_lengths(("xs",), (24,), 4, torch.device("cpu"), ("astro", "astro@3g", "hstu"), min_seconds=0.0,
                         min_reps=1, overrides=overrides)
    by = {r["family"]: r for r in rows}
    assert list(by) == ["astro", "astro@3g", "hstu"]
    assert len(by["astro@3g"]["block_lengths"]) == 3 and sum(by["astro@3g"]["block_lengths"]) == 24
    assert by["hstu"]["block_lengths"] is None
    assert all(r["cold_cpu_ms"] > 0 and r["warm_cpu_ms"] > 0 for r in rows)
    # the FLOPs are the request's own block lengths, not an even split of n
    model = long_model("astro@3g", "xs", 24, torch.device("cpu"), **overrides["astro@3g"])
    batch = mixed_batch(24, 4, seed=24)
    lengths = by["astro@3g"]["block_lengths"]
    assert by["astro@3g"]["cold_mflops"] * 1e6 == request_flops(model, batch, 24, 4)
    assert request_flops(model, batch, 24, 4) == sum(model.flops_breakdown(24, 4, lengths).values())
    summary = length_summary(rows)["xs"]
    assert set(summary["hstu_over"]) == {"astro", "astro@3g"}
    assert summary["hstu_over"]["astro@3g"]["cold"] == by["hstu"]["cold_ms"] / by["astro@3g"]["cold_ms"]


def test_block_cost_reads_a_logs_histories(tmp_path):
    from sandbox.cli import app

    db = tmp_path / "sandbox.duckdb"
    write_log(db, synthetic_log(n_requests=80))
    out = tmp_path / "block_cost"
    groups = json.dumps([list(g) for g in THREE_GROUPS])
    result = CliRunner().invoke(app, ["bench", "block-cost", "--db", str(db), "--max-len", "16", "--window-h", "0",
                                      "--n", "64", "--sizes", "s", "--families", "astro", "astro@3g",
                                      "--set", f"astro@3g:behaviour_groups={groups}", "--save-as", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["variant"], r["source"].split(",")[0]): r for r in figures["rows"]}
    log_row = rows[("astro@3g", "log")]
    assert len(log_row["mean_block_lengths"]) == 3
    assert sum(log_row["mean_block_lengths"]) == pytest.approx(log_row["mean_n"])
    assert 0 < log_row["attention_share"] <= 1
    # more blocks, less attention than two on the same histories
    assert log_row["attention_share"] < rows[("astro", "log")]["attention_share"]
    assert abs(sum(figures["log_mix"]["behaviours"].values()) - 1) < 1e-9
    assert all("request_shares" not in r for r in figures["rows"])  # per-request lists stay out of the JSON
    bad = CliRunner().invoke(app, ["bench", "block-cost", "--families", "astro", "--set", "astro@x:partition=scenario"])
    assert bad.exit_code != 0 and "not in --families" in bad.output


def test_a_log_gives_the_bench_its_longest_real_history(tmp_path):
    from bench.serve_common import mixed_batch
    from ranker.training.data import load_request_log

    db = tmp_path / "sandbox.duckdb"
    write_log(db, synthetic_log(n_requests=80))
    log = load_request_log(db)
    longest = int((log.history_end - log.history_first).max())
    batch = mixed_batch(8, 3, seed=0, mix=str(db))
    row = int((log.history_end - log.history_first).argmax())
    end = int(log.history_end[row])
    assert batch.history_behaviours.tolist() == [log.token_behaviours[end - 8:end].tolist()]
    assert batch.history_scenarios.tolist() == [log.token_scenarios[end - 8:end].tolist()]
    with pytest.raises(ValueError, match="fewer than n"):
        mixed_batch(longest + 1, 3, seed=0, mix=str(db))
