"""`climber bench gpu` (`make bench-gpu`): the device's serving path checked, then measured.

    make bench-gpu                 # CUDA: installs the CUDA torch build if needed (bench.gpu_setup)
    make bench-gpu DEVICE=cpu      # the same steps on CPU
    climber bench gpu --device cpu --tiny --out /tmp/gpu.json   # what make test runs

1. Exactness: tests/test_device_paths.py on the device (bf16 weights and K/V with SDPA
   candidate attention against the fp32 reference, to the documented tolerance; SDPA vs
   split in fp32; a 2,000-event history from the cache against a full recompute). A failure
   stops the run: figures of a wrong path are worth nothing.
2. Benchmark 1, cost against n (bench.serve_long), sizes m and l, M candidates.
3. Benchmark 2, SUMI and incremental at size l, n = 1024, ratios beside FLOP ratios.
4. Benchmark 5, the HTTP service at size l, n = 1024, M candidates: open loop at 25/50/75%
   of the in-process ceiling (bench.load). Goal on a GPU: p99 <= 10 ms at M = 1000.

The JSON names the device (and the GPU's model), the torch build, and every figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, cpu_model, machine
from bench.serve_common import console

REPO = Path(__file__).resolve().parent.parent
FULL = dict(sizes=("m", "l"), ns=(256, 512, 1024, 2048, 4096), M=1000, size="l", n=1024, min_seconds=1.0,
            service_seconds=10.0, users=200, open_seconds=10.0, ceiling_seconds=3.0, checks="")
TINY = dict(sizes=("xs",), ns=(32, 64), M=16, size="xs", n=64, min_seconds=0.0,
            service_seconds=0.5, users=4, open_seconds=0.5, ceiling_seconds=0.05, checks="bf16 and astro")
GOAL_P99_MS = 10.0
OPEN_FRACTIONS = (0.25, 0.5, 0.75)


def exactness(device: str, select: str = "") -> dict:
    """tests/test_device_paths.py on `device`, in a subprocess (pytest owns its process);
    `select` is a pytest -k expression (the tiny run checks the bf16 tests only)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device_paths.py",
               *(["-k", select] if select else [])]
    started = time.time()
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "CLIMBER_TEST_DEVICE": device, "PYTHONPATH": str(REPO)})
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    return {"command": f"CLIMBER_TEST_DEVICE={device} " + " ".join(command[2:]), "passed": result.returncode == 0,
            "seconds": time.time() - started, "output_tail": tail}


def run_bench_gpu(device: str = "cuda", tiny: bool = False, out: Path | None = None, threads: int = 1) -> dict:
    from bench.load import bench_service, service_markdown
    from bench.serve_long import bench_lengths, bench_sumi_incremental, length_summary, markdown
    from ranker.serving.ranker import serving_device

    dev = serving_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device; on a GPU machine run "
                         "`python -m bench.gpu_setup` first (make bench-gpu does)")
    p = TINY if tiny else FULL
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    started = time.time()
    console.print(f"bench gpu on {dev}: 1/4 exactness (tests/test_device_paths.py)")
    checks = exactness(str(dev), p["checks"])
    console.print("\n".join(checks["output_tail"][-3:]))
    figures: dict = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "torch": torch.__version__, "tiny": tiny, "parameters": p, "exactness": checks}
    if not checks["passed"]:
        raise SystemExit("the device path does not agree with the fp32 reference: no figures taken\n"
                         + "\n".join(checks["output_tail"]))
    console.print("bench gpu: 2/4 cost against n")
    lengths = bench_lengths(p["sizes"], p["ns"], p["M"], dev, min_seconds=p["min_seconds"])
    console.print("bench gpu: 3/4 SUMI and incremental")
    sumi = bench_sumi_incremental(p["size"], p["n"], p["M"], dev, min_seconds=p["min_seconds"], reps=5 if tiny else 30)
    console.print("bench gpu: 4/4 the HTTP service, open loop at fractions of the in-process ceiling")
    service = bench_service(p["size"], p["n"], p["M"], 32, p["service_seconds"], p["users"], threads,
                            open_fractions=OPEN_FRACTIONS, open_seconds=p["open_seconds"], device=str(dev),
                            open_basis="ceiling", ceiling_seconds=p["ceiling_seconds"])
    summary = length_summary(lengths)
    at_half = next(r for r in service["open_loop"] if r["fraction_of_saturation"] == 0.5)
    figures.update(lengths=lengths, length_summary=summary, sumi_incremental=sumi, service=service,
                   goal_p99_ms=GOAL_P99_MS, p99_at_half_ceiling_ms=at_half["p99_ms"],
                   wall_seconds=time.time() - started,
                   # the calibration workloads take seconds: a tiny run is a check, not a figure
                   machine={"cpu": cpu_model(), "torch": torch.__version__} if tiny else machine(),
                   measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    figures["markdown"] = "\n".join([*markdown(lengths, summary, sumi, str(dev)), "",
                                     *service_markdown(service, GOAL_P99_MS)])
    console.print(figures["markdown"])
    path = out or RESULTS_DIR / f"gpu-{dev.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "gpu", **figures}, indent=2, default=str))
    console.print(f"written {path}")
    return figures
