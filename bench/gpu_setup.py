"""Make the virtualenv's torch a CUDA build when the machine has an NVIDIA GPU (`make bench-gpu`'s
first step; `python -m bench.gpu_setup [--dry-run]`).

The venv is installed with the local CPU wheel (torch==2.13.0+cpu, see the Makefile), which
cannot see a GPU. On a machine with one, this replaces it with the same version's CUDA build:
PyPI's Linux wheel of torch 2.13.0, which brings the CUDA libraries as nvidia-* packages. The
local wheel folder and extra indexes are switched off for that one install, so the +cpu wheel
cannot win the version match. Offline machines set CLIMBER_TORCH_WHEELS to a folder holding
the CUDA wheel and its nvidia-* dependencies (`pip download torch==2.13.0` on a connected one).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TORCH_VERSION = "2.13.0"  # the Makefile's pin: the same version, CUDA build
DEFAULT_INDEX = "https://pypi.org/simple"


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    result = subprocess.run([smi, "-L"], capture_output=True, text=True)
    return result.returncode == 0 and "GPU" in result.stdout


def torch_sees_cuda(python: str = sys.executable) -> bool:
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"
    return subprocess.run([python, "-c", probe]).returncode == 0


def install_commands(python: str = sys.executable) -> tuple[list[list[str]], dict[str, str]]:
    """The pip commands (uninstall the CPU build, install the pinned CUDA build) and their environment."""
    wheels = os.environ.get("CLIMBER_TORCH_WHEELS")
    source = ["--no-index", "--find-links", wheels] if wheels else \
        ["--index-url", os.environ.get("CLIMBER_TORCH_INDEX", DEFAULT_INDEX)]
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_EXTRA_INDEX_URL": ""}
    return ([[python, "-m", "pip", "uninstall", "-y", "torch"],
             [python, "-m", "pip", "install", "--no-cache-dir", *source, f"torch=={TORCH_VERSION}"]], env)


def ensure_cuda_torch(dry_run: bool = False, python: str = sys.executable) -> str:
    """What was done, in a sentence; raises SystemExit with the reason when the install fails."""
    if not has_nvidia_gpu():
        return "no NVIDIA GPU on this machine (nvidia-smi -L lists none): torch left as installed"
    if torch_sees_cuda(python):
        return "torch already sees the GPU: nothing to install"
    commands, env = install_commands(python)
    if dry_run:
        return "would run: " + " && ".join(" ".join(c) for c in commands)
    for command in commands:
        print("+", " ".join(command), flush=True)
        if subprocess.run(command, env=env).returncode:
            raise SystemExit(f"'{' '.join(command)}' failed: install torch=={TORCH_VERSION} with CUDA by hand "
                             "(or set CLIMBER_TORCH_WHEELS to a folder of wheels) and rerun make bench-gpu")
    if not torch_sees_cuda(python):
        raise SystemExit(f"torch=={TORCH_VERSION} installed but torch.cuda.is_available() is False: check the "
                         "NVIDIA driver (nvidia-smi) against the CUDA version of the wheel")
    return f"installed torch=={TORCH_VERSION} (CUDA build); torch sees the GPU"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    print(ensure_cuda_torch(dry_run="--dry-run" in args))


if __name__ == "__main__":
    main()
