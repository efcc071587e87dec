"""Checkpoints: a folder a trained model is saved to, resumed from and served from.

`model.safetensors` (weights only), `optimizer.pt` (optimizer state, loaded with
`weights_only=True`), `growth.safetensors` (pruning masks, only while a grow-and-prune run
is sparse) and `checkpoint.json` (family, size, model config, step, model version =
"<family>-<size>-<hash of the weights file>"). The JSON is written last, so a folder with a
JSON holds a complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from ranker.models import model_from_config
from ranker.models.base import SequenceRanker

if TYPE_CHECKING:
    from ranker.training.growth import GrowPrune

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
GROWTH_FILE = "growth.safetensors"  # the pruning masks, only while a grow-and-prune run is sparse
META_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def weights_version(family: str, size: str, weights_path: Path) -> str:
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()[:12]
    return f"{family}-{size}-{digest}"


def save_checkpoint(out_dir: Path, model: SequenceRanker, optimizer: torch.optim.Optimizer,
                    family: str, size: str, step: int, extra: dict[str, Any],
                    growth: GrowPrune | None = None) -> str:
    """Write weights, optimizer, growth masks while sparse, and metadata (JSON last, each via
    a temporary file). A dense model leaves no masks behind: the checkpoint is a plain one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if growth is not None and not growth.is_dense:
        tmp_growth = out_dir / (GROWTH_FILE + ".tmp")
        save_file(growth.state_dict(), str(tmp_growth))
        tmp_growth.replace(out_dir / GROWTH_FILE)
    else:
        (out_dir / GROWTH_FILE).unlink(missing_ok=True)
    tmp_weights = out_dir / (WEIGHTS_FILE + ".tmp")
    save_model(model, str(tmp_weights))
    tmp_weights.replace(out_dir / WEIGHTS_FILE)
    tmp_opt = out_dir / (OPTIMIZER_FILE + ".tmp")
    torch.save({"optimizer": optimizer.state_dict(), "step": step}, tmp_opt)
    tmp_opt.replace(out_dir / OPTIMIZER_FILE)
    version = weights_version(family, size, out_dir / WEIGHTS_FILE)
    meta = {"format": CHECKPOINT_FORMAT, "family": family, "size": size, "model_version": version,
            "step": step, "config": model.config.to_dict(), **extra}
    tmp_meta = out_dir / (META_FILE + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2, default=float))
    tmp_meta.replace(out_dir / META_FILE)
    return version


def read_checkpoint_meta(checkpoint_dir: str | Path) -> dict[str, Any]:
    path = Path(checkpoint_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {checkpoint_dir} (missing {META_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {meta.get('format')}, expected {CHECKPOINT_FORMAT}")
    return meta


def load_checkpoint(checkpoint_dir: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[SequenceRanker, dict[str, Any]]:
    """A trained model (in eval mode) and its metadata; reads weights only, never pickles."""
    meta = read_checkpoint_meta(checkpoint_dir)
    model = model_from_config(meta["family"], meta["config"])
    load_model(model, str(Path(checkpoint_dir) / WEIGHTS_FILE), strict=True, device=str(device))
    return model.to(device).eval(), meta


def restore_checkpoint(checkpoint_dir: Path, model: SequenceRanker, optimizer: torch.optim.Optimizer,
                       family: str, size: str, device: torch.device, growth: GrowPrune | None = None) -> int:
    """Load weights, optimizer state and any growth masks into a freshly built model; return
    the step reached."""
    meta = read_checkpoint_meta(checkpoint_dir)
    if (meta["family"], meta["size"]) != (family, size):
        raise ValueError(f"{checkpoint_dir} holds a {meta['family']}/{meta['size']} checkpoint, not {family}/{size}")
    load_model(model, str(checkpoint_dir / WEIGHTS_FILE), strict=True, device=str(device))
    state = torch.load(checkpoint_dir / OPTIMIZER_FILE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if (meta.get("growth") is not None) != (growth is not None):
        raise ValueError(f"{checkpoint_dir} was trained {'with' if meta.get('growth') else 'without'} grow-and-prune; "
                         "resume it the same way")
    # No mask file: the checkpoint was saved once dense, and a fresh GrowPrune's masks are all on.
    if growth is not None and (checkpoint_dir / GROWTH_FILE).exists():
        growth.load_state_dict(load_file(str(checkpoint_dir / GROWTH_FILE), device=str(device)))
    return int(meta["step"])


def continue_from(checkpoint_dir: str | Path, model: SequenceRanker, optimizer: torch.optim.Optimizer,
                  device: torch.device) -> dict[str, Any]:
    """Load a trained model's weights, and its optimizer state where the folder has one,
    into a model built from the same config, to train it further (recurring training on a
    newer log); return the checkpoint's metadata. The step count starts again at 0."""
    checkpoint_dir = Path(checkpoint_dir)
    meta = read_checkpoint_meta(checkpoint_dir)
    if (checkpoint_dir / GROWTH_FILE).exists():
        raise ValueError(f"{checkpoint_dir} stopped in a grow-and-prune run's sparse phase; finish it with --resume "
                         "first (recurring training continues a full-size model)")
    load_model(model, str(checkpoint_dir / WEIGHTS_FILE), strict=True, device=str(device))
    if (checkpoint_dir / OPTIMIZER_FILE).exists():
        state = torch.load(checkpoint_dir / OPTIMIZER_FILE, map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
    return meta
