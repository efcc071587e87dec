"""Where benchmark figures go, with the machine they were measured on."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc); None where that is not readable."""
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_minor_faults(pid: int) -> int | None:
    """Minor page faults of a process so far (Linux /proc): pages it touched for the first
    time, e.g. memory malloc mapped afresh; None where that is not readable."""
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[7])
    except OSError:
        return None


def calibration() -> dict:
    """Two fixed workloads timed here (best of 5), so figures from different boxes can be put
    side by side: the interpreter (a pure-Python loop; the simulator and the loop's glue are
    Python) and one core's float32 matmul (what the models spend their time in). The 2-core
    boxes these benchmarks ran on differ by up to 4.7x in `climber bench sim`."""
    import torch

    def best(fn) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    loop_n = 1_000_000
    loop_s = best(lambda: sum(i * i for i in range(loop_n)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(3200, 64), torch.randn(64, 256)
        matmul_s = best(lambda: [a @ b for _ in range(20)]) / 20
    finally:
        torch.set_num_threads(threads)
    return {"python_loop_ns_per_item": loop_s / loop_n * 1e9, "matmul_fp32_1thread_gflops": 2 * 3200 * 64 * 256 / matmul_s / 1e9}


def machine() -> dict:
    import torch

    info = {"cpu_cores": os.cpu_count(), "cpu": cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "calibration": calibration()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(name: str, figures: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"benchmark": name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine(), **figures}
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


if __name__ == "__main__":  # python -m bench.common: this machine, as the benchmarks record it
    print(json.dumps(machine(), indent=2))
