"""The `climber` command line: the main job end to end, and bad settings named clearly."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from sandbox.cli import app

runner = CliRunner()


def test_sandbox_command_runs_and_says_where_results_are(tmp_path):
    result = runner.invoke(app, ["sandbox", "--users", "30", "--tracks", "400", "--days", "0.5",
                                 "--seed", "5", "--out", str(tmp_path), "--run-id", "cli"])
    assert result.exit_code == 0, result.output
    assert "Stylised facts" in result.output and "Engagement per arm" in result.output
    assert " NO " not in result.output.split("Stylised facts")[1]  # the ranges are the logging policy's (issue 23)
    run_dir = tmp_path / "cli"
    assert (run_dir / "sandbox.duckdb").exists() and (run_dir / "report.html").exists()
    assert str(run_dir) in result.output


def test_bad_settings_exit_2_naming_the_field(tmp_path):
    result = runner.invoke(app, ["sandbox", "--users", "-4", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "n_users" in result.output
    result = runner.invoke(app, ["sandbox", "--transport", "carrier-pigeon", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "transport" in result.output


def test_train_shows_its_own_help():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0
    assert "--model" in result.output and "--size" in result.output


def test_every_command_parses_its_own_flags_and_list_flags_take_several_values():
    """One CLI style: no command hands unparsed arguments on; `--sizes xs s` (one flag,
    several values, as the frozen configs write it) and the registry's choices hold."""
    import typer

    from ranker.models import FAMILIES
    from sandbox.frozen import parse_step

    def leaves(command, path=()):
        subs = getattr(command, "commands", None)
        if subs is None:
            yield " ".join(path), command
        for name, sub in (subs or {}).items():
            yield from leaves(sub, (*path, name))

    commands = dict(leaves(typer.main.get_command(app)))
    assert {"train", "scaling", "scaling-seeds", "growth-study", "serve", "worker", "bench stream", "bench growth",
            "bench serve", "bench sim", "sandbox", "reproduce", "import"} <= set(commands)
    assert not [name for name, command in commands.items() if command.context_settings.get("allow_extra_args")]
    _, args = parse_step(["scaling", "--db", "d", "--out", "o", "--sizes", "xs", "s", "--families", "astro", "hstu",
                          "--set", "astro:n_layers=1", "--max-len", "32"])
    assert (args.sizes, args.families, args.overrides, args.max_len) == (["xs", "s"], ["astro", "hstu"],
                                                                          [("astro", "n_layers", 1)], 32)
    assert parse_step(["scaling", "--db", "d", "--out", "o"])[1].families == list(FAMILIES)
    assert parse_step(["bench", "stream", "--workers", "1", "2", "--split-tracks"])[1].workers == [1, 2]
    _, args = parse_step(["growth-study", "--db", "d", "--out", "o", "--seeds", "0", "1", "2", "--set", "d_model=16"])
    assert (args.seeds, args.overrides) == ([0, 1, 2], [("d_model", 16)])
    assert parse_step(["scaling-seeds", "a", "b", "--out", "o"])[1].ladders == [Path("a"), Path("b")]
    for bad, needle in ((["train", "--model", "gpt", "--size", "s", "--db", "d", "--out", "o"], "'astro'"),
                        (["growth-study", "--db", "d", "--out", "o", "--size", "xxl"], "'xl'"),
                        (["scaling", "--db", "d", "--out", "o", "--set", "n_layers=1"], "FAMILY:KEY=VALUE"),
                        (["worker", "--role", "both"], "'sequences'")):
        with pytest.raises(ValueError, match=needle):
            parse_step(bad)
    failed = runner.invoke(app, ["train", "--model", "gpt", "--size", "s", "--db", "d", "--out", "o"])
    assert failed.exit_code == 2 and "gpt" in failed.output


def test_simulate_writes_a_policy_log_that_training_reads(tmp_path):
    import duckdb

    from ranker.training.data import load_request_log

    result = runner.invoke(app, ["simulate", "--users", "30", "--tracks", "300", "--days", "0.5",
                                 "--policy", "random", "--out", str(tmp_path), "--run-id", "log"])
    assert result.exit_code == 0, result.output
    db = tmp_path / "log" / "sandbox.duckdb"
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT count(*) FROM tracks").fetchone()[0] == 300
    con.close()
    assert len(load_request_log(db)) > 10
    bad = runner.invoke(app, ["simulate", "--policy", "clairvoyant", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--policy" in bad.output


def test_ranker_flags_set_the_arms_of_the_experiment(tmp_path):
    import duckdb

    result = runner.invoke(app, ["sandbox", "--users", "30", "--tracks", "400", "--days", "1", "--seed", "5",
                                 "--out", str(tmp_path), "--run-id", "arms", "--ranker", "a=popularity",
                                 "--ranker", "b=cooccurrence", "--ranker", "c=popularity"])
    assert result.exit_code == 0, result.output
    con = duckdb.connect(str(tmp_path / "arms" / "sandbox.duckdb"), read_only=True)
    arms = dict(con.execute("SELECT arm, count(*) FROM assignments GROUP BY arm").fetchall())
    models = dict(con.execute("SELECT DISTINCT arm, model_name FROM requests").fetchall())
    con.close()
    assert set(arms) == {"a", "b", "c"} and min(arms.values()) >= 5  # an equal three-way split of 30 users
    assert models["b"] != models["a"] == models["c"]
    lifts = runner.invoke(app, ["ab", str(tmp_path / "arms" / "sandbox.duckdb"), "--control", "b"], env={"COLUMNS": "80"})
    assert lifts.exit_code == 0, lifts.output
    assert "A/B lift of a against b" in lifts.output and "A/B lift of c against b" in lifts.output
    assert "full_play_rate" in lifts.output and "95% CI" in lifts.output and "…" not in lifts.output
    for args, needle in ((["--control", "z"], "no exposed users in the control arm 'z'"), ([], "'control'")):
        failed = runner.invoke(app, ["ab", str(tmp_path / "arms" / "sandbox.duckdb"), *args])
        assert failed.exit_code == 2 and needle in failed.output, failed.output
    for bad, needle in ((["--ranker", "treatment"], "ARM=RANKER"), (["--ranker", "a=x", "--ranker", "a=y"], "twice"),
                        (["--ranker", "control=lasso"], "unknown ranker")):
        failed = runner.invoke(app, ["sandbox", "--out", str(tmp_path), *bad])
        assert failed.exit_code == 2 and needle in failed.output, failed.output


def test_import_turns_an_interaction_file_into_a_log_training_reads(tmp_path):
    import pandas as pd

    from ranker.training.data import load_request_log

    source = tmp_path / "plays.csv"
    pd.DataFrame({"member": ["a", "b", "a", "c", "b"], "song": [1, 2, 2, 3, 1],
                  "at": [1_700_000_000, 1_700_000_060, 1_700_000_120, 1_700_003_600, 1_700_007_200]}
                 ).to_csv(source, index=False)
    db = tmp_path / "imported.duckdb"
    args = ["import", str(source), "--db", str(db), "--user", "member", "--item", "song", "--time", "at",
            "--n-negatives", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "5 interactions of 3 users on 3 items -> 5 requests" in result.output
    log = load_request_log(db)
    assert len(log) == 5 and log.batch([0], max_len=8).candidate_mask.sum() == 2  # the positive and 1 negative
    again = runner.invoke(app, args)  # the table exists: named, not replaced, unless --overwrite
    assert again.exit_code == 2 and "already has an `events` table" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    missing = runner.invoke(app, ["import", str(source), "--db", str(tmp_path / "x.duckdb"), "--user", "who",
                                  "--item", "song", "--time", "at"])
    assert missing.exit_code == 2 and "lacks column(s) ['who']" in missing.output


def test_the_python_m_tools_keep_their_flags(monkeypatch, capsys):
    """`python -m simulator`, `simulator.retention`, `bench.stream_drain` and `bench.stream_table`
    (typer, like `climber`): every flag, the hidden worker modes the benchmarks spawn, and a
    clear exit 2 for a bad value."""
    import bench.stream_drain as drain
    import bench.stream_table as table
    import simulator.__main__ as alone
    import simulator.retention as retention

    calls = []
    monkeypatch.setattr(retention, "report", lambda config: calls.append(config))
    monkeypatch.setattr(drain, "drain", lambda *args: calls.append(("drain", args)))
    monkeypatch.setattr(table, "table_worker", lambda *args: calls.append(("table worker", args)))
    monkeypatch.setattr(table, "bench_table", lambda events: calls.append(("table", events)) or 1.0)
    retention.main(["--users", "30", "--tracks", "300", "--days", "1.5", "--seed", "4"])
    drain.main(["--events", "7"])
    drain.main(["--ack-only-worker", '{"bootstrap": "x"}'])
    table.main(["--worker", "localhost:9092", "1234", "/tmp/d"])
    table.main(["--events", "5"])
    config = calls[0]
    assert (config.n_users, config.n_tracks, config.days, config.seed) == (30, 300, 1.5, 4)
    assert calls[1:] == [("drain", (7, None)), ("drain", (100_000, '{"bootstrap": "x"}')),
                         ("table worker", ("localhost:9092", 1234, "/tmp/d")), ("table", 5)]
    alone.main(["--policy", "popularity", "--users", "20", "--tracks", "200", "--days", "0.2", "--seed", "3",
                "--window-ms", "60000", "--sessions-per-day", "2.0"])
    assert "popularity:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        alone.main(["--policy", "best"])
    assert exit_.value.code == 2 and "'best' is not one of" in capsys.readouterr().err
