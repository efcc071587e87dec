"""`make bench-gpu` runs unchanged on CPU: the whole command at tiny sizes, and the CUDA
install step's decisions (no GPU here, so the install itself is checked as a dry run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench import gpu_setup
from sandbox.cli import app

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_gpu_on_cpu_checks_then_measures_every_benchmark_and_names_the_device(tmp_path):
    out = tmp_path / "gpu.json"
    result = CliRunner().invoke(app, ["bench", "gpu", "--device", "cpu", "--tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["device"] == "cpu" and figures["device_name"] == "cpu" and figures["tiny"]
    assert figures["exactness"]["passed"] and "CLIMBER_TEST_DEVICE=cpu" in figures["exactness"]["command"]
    assert {(r["family"], r["n"]) for r in figures["lengths"]} == {(f, n) for f in ("astro", "hstu", "sasrec")
                                                                   for n in (32, 64)}
    assert all(r["cold_ms"] > 0 and r["warm_ms"] > 0 and r["encode_ms"] > 0 for r in figures["lengths"])
    ratios = figures["sumi_incremental"]["ratios"]
    assert set(ratios) == {"cold", "warm", "incremental"}
    assert all(r["measured"] > 0 and r["flops"] > 1 for r in ratios.values())
    service = figures["service"]
    assert [r["fraction_of_saturation"] for r in service["open_loop"]] == [0.25, 0.5, 0.75]
    assert all(r["basis"] == "ceiling" and r["p99_ms"] >= r["p50_ms"] > 0 for r in service["open_loop"])
    assert service["device"] == "cpu" and "http_overhead_p50_ms" in service
    assert "HTTP overhead at p50" in figures["markdown"]


def test_bench_gpu_refuses_cuda_where_torch_sees_none(monkeypatch):
    import torch

    from bench.gpu import run_bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="sees no CUDA device.*bench.gpu_setup"):
        run_bench_gpu("cuda", tiny=True)


def test_the_cuda_install_is_pinned_to_the_makefile_torch_and_skipped_without_a_gpu(monkeypatch):
    pins = set(re.findall(r"torch==([0-9.]+)", (REPO / "Makefile").read_text()))
    assert pins == {gpu_setup.TORCH_VERSION}
    monkeypatch.setattr(gpu_setup, "has_nvidia_gpu", lambda: False)
    assert gpu_setup.ensure_cuda_torch().startswith("no NVIDIA GPU")
    monkeypatch.setattr(gpu_setup, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(gpu_setup, "torch_sees_cuda", lambda python=None: False)
    plan = gpu_setup.ensure_cuda_torch(dry_run=True)
    assert plan.startswith("would run:") and f"torch=={gpu_setup.TORCH_VERSION}" in plan and "uninstall -y torch" in plan
    commands, env = gpu_setup.install_commands()
    assert env["PIP_FIND_LINKS"] == "" and "--index-url" in commands[1]  # the local +cpu wheel cannot win
    monkeypatch.setenv("CLIMBER_TORCH_WHEELS", "/wheels")
    assert gpu_setup.install_commands()[0][1][-4:] == ["--no-index", "--find-links", "/wheels", "torch==2.13.0"]
