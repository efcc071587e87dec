"""Training the neural arms of an experiment: the one place the experiment calls the trainer.

Every trained arm gets the same budget (`experiments.spec.Train`): the same warm-up log,
epochs, batch size, history length, learning rate and seed. Sizes differ only in the model,
so the A/B lift between two sizes is the size's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from experiments.spec import Retrain, Train, TrainedArm

DAY_MS = 86_400_000


@dataclass(frozen=True)
class TrainedModel:
    arm: str
    family: str
    size: str
    checkpoint: Path
    model_version: str
    n_params: int
    flops_per_request: int
    train_seconds: float
    steps: int
    val_loss: float
    gauc_full_play: float


def train_arm(arm: str, spec: TrainedArm, budget: Train, db_path: Path, out_dir: Path,
              progress: bool = True) -> TrainedModel:
    """Train one arm on the warm-up log at `db_path` into `out_dir` (a checkpoint folder)."""
    from ranker.training.train import TrainConfig, train

    config = TrainConfig(spec.family, spec.size, db_path, out_dir, epochs=budget.epochs, steps=budget.steps,
                         batch_size=budget.batch_size, lr=budget.lr, seed=budget.seed, device="auto",
                         max_len=budget.max_len, eval_window_ms=int(budget.eval_days * DAY_MS), checkpoint_every=0,
                         model_overrides=dict(spec.overrides) or None)
    result = train(config, progress=progress)
    return TrainedModel(arm, spec.family, spec.size, Path(result.checkpoint), result.model_version, result.n_params,
                        result.flops_per_request, result.train_seconds, result.steps,
                        float(result.metrics.get("loss", float("nan"))),
                        float(result.metrics.get("gauc/full_play", float("nan"))))


def retrain_arm(arm: str, model: TrainedModel, budget: Train, retrain: Retrain, db_path: Path, out_dir: Path,
                progress: bool = True) -> TrainedModel:
    """Fine-tune an arm's current model on the log so far (`climber train --resume-from`):
    weights and optimizer state carried over, the arms' shared fine-tune budget."""
    from ranker.training.train import TrainConfig, train

    config = TrainConfig(model.family, model.size, db_path, out_dir, steps=retrain.steps,
                         batch_size=budget.batch_size, lr=retrain.lr, seed=budget.seed, device="auto",
                         max_len=budget.max_len, eval_window_ms=int(budget.eval_days * DAY_MS), checkpoint_every=0,
                         resume_from=model.checkpoint)
    result = train(config, progress=progress)
    return TrainedModel(arm, model.family, model.size, Path(result.checkpoint), result.model_version, result.n_params,
                        result.flops_per_request, result.train_seconds, result.steps,
                        float(result.metrics.get("loss", float("nan"))),
                        float(result.metrics.get("gauc/full_play", float("nan"))))
