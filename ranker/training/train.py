"""Train a ranker on the DuckDB event log: loss, loop, evaluation, DDP.

    python -m ranker.training.train --model astro --size s --db runs/<id>/sandbox.duckdb --out models/astro-s
    torchrun --nproc-per-node 2 -m ranker.training.train ...     # the same, data-parallel

Loss: binary cross-entropy per task on real (unpadded) candidates, summed over tasks and
averaged over the candidates of the *global* batch. Normalising by the global count (not
per rank) is what makes DDP's gradient average equal the single-process gradient exactly.

Checkpoints: ranker.training.checkpoint. Data order depends only on (seed, epoch), so
`resume=True` continues exactly where the last checkpoint stopped.
"""

from __future__ import annotations

import ast
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ranker.batch import TASKS, RankBatch
from ranker.training.data import DAY_MS, RequestLog, TimeSplit, iterate_batches, load_request_log, split_by_time
from ranker.training.growth import GrowPrune, GrowthConfig, LinearFlopCounter
from ranker.training.step_cost import TrackGradient, clip_gradients
from ranker.training.metrics import ranking_report
from ranker.models.config import _tuples
from ranker.models.base import SequenceRanker
from ranker.models import build_model, model_class, model_from_config
from ranker.training.checkpoint import META_FILE, continue_from, read_checkpoint_meta, restore_checkpoint, save_checkpoint
from ranker.training.loo import LeaveOneOut, leave_one_out
from ranker.training.loo_eval import Protocol, evaluate_loo, model_scorer
from ranker.training.ceiling import ORACLE_KEY, POPULARITY_KEY, ceiling_metrics, gap_closed

console = Console()


@dataclass
class TrainResult:
    metrics: dict[str, float]  # evaluation on the held-out last window (see ranker.training.metrics)
    n_params: int
    flops_per_request: int  # forward, at the train set's mean history length and slate size
    train_seconds: float
    steps: int
    requests_seen: int
    train_compute: float  # 3 x forward FLOPs x requests seen (forward + backward)
    final_train_loss: float
    checkpoint: Path
    model_version: str
    family: str
    size: str
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    # Grow-and-prune runs: the schedule, the final density and the units swapped.
    growth: dict[str, Any] | None = None
    # Linear-layer FLOPs of this invocation's training forwards, done and as a dense run
    # would do them (ranker.training.growth.LinearFlopCounter); counted with growth or when asked.
    linear_flops: dict[str, float] | None = None
    # CPU time of this process over the training loop (the same span as train_seconds): on
    # a shared machine less disturbed by other jobs than wall time.
    train_cpu_seconds: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["checkpoint"] = str(self.checkpoint)
        return out


# ----------------------------------------------------------------------------- devices and DDP

@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int
    world: int
    autocast_dtype: torch.dtype | None  # bf16 on CUDA, None (fp32) on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_runtime(device: str = "auto") -> Runtime:
    """Device and process group: `torchrun` sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', not {device!r}")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device='cuda' asked for, but torch sees no CUDA device")
        if world > 1:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Runtime(dev, rank, world, torch.bfloat16 if dev.type == "cuda" else None)


def shard(global_rows: np.ndarray, runtime: Runtime) -> np.ndarray:
    """This rank's contiguous share of a global batch."""
    return np.array_split(global_rows, runtime.world)[runtime.rank]


# ----------------------------------------------------------------------------- loss and schedule

def masked_bce_sum(logits: torch.Tensor, batch: RankBatch) -> torch.Tensor:
    """Sum over real candidates and tasks of BCE-with-logits (fp32 whatever the autocast)."""
    if batch.labels is None:
        raise ValueError("a training batch needs labels (RankBatch.labels is None)")
    mask = batch.candidate_mask
    return F.binary_cross_entropy_with_logits(logits[mask].float(), batch.labels[mask], reduction="sum")


def adamw(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where torch has a fused kernel (CPU and CUDA): the same update as the
    per-tensor loop (about ten passes over every tensor, the embedding table the largest)
    in one pass per tensor."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def learning_rate(step: int, total_steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of peak: a function of the step alone, so a
    resumed run needs no scheduler state."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: SequenceRanker, log: RequestLog, max_len: int, batch_size: int = 256,
             runtime: Runtime | None = None, hop: int = 1) -> dict[str, float]:
    """All offline metrics of `model` on every request of `log` (see ranker.training.metrics),
    each request's history the hop window (ranker.window) of its tokens: 1 is the sliding one."""
    logits, ranking_score = predict(model, log, max_len, batch_size, runtime, hop)
    impressions = log.impression_rows(np.arange(len(log)))
    per_request = np.repeat(np.arange(len(log)), log.candidate_count)
    return ranking_report(
        labels=log.labels[impressions].astype(np.float64),
        logits=logits,
        ranking_score=ranking_score,
        users=log.user_id[per_request],
        requests=log.request_id[per_request],
        relevance=log.relevance(impressions),
        positions=log.candidate_positions[impressions],
    )


@torch.no_grad()
def predict(model: SequenceRanker, log: RequestLog, max_len: int, batch_size: int = 256,
            runtime: Runtime | None = None, hop: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(task logits [N_imp, len(TASKS)], ranking score [N_imp]) for every impression of
    `log`, in `log.impression_rows` order."""
    runtime = runtime or Runtime(torch.device("cpu"), 0, 1, None)
    was_training = model.training
    model.eval()
    logits_parts, score_parts = [], []
    for rows in iterate_batches(len(log), batch_size, shuffle=False):
        batch = log.batch(rows, max_len, hop).to(runtime.device)
        with runtime.autocast():
            logits = model(batch)
        mask = batch.candidate_mask
        logits_parts.append(logits[mask].float().cpu())
        score_parts.append(model.score(logits.float(), mask)[mask].cpu())
    model.train(was_training)
    return torch.cat(logits_parts).numpy(), torch.cat(score_parts).numpy()


def typical_shape(log: RequestLog, max_len: int) -> tuple[int, int]:
    """Mean (history length, slate size) of a log's requests, for FLOPs per request."""
    start, end = log.history_window(np.arange(len(log)), max_len)
    return max(1, round(float(np.mean(end - start)))), max(1, round(float(np.mean(log.candidate_count))))


# ----------------------------------------------------------------------------- training

@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run is: the model, the data, the budget and the optimiser.

    The command line, the studies and the tests build one; `train(config)` runs it. Budget:
    `steps` optimizer steps if given, else `epochs` passes over the train requests.
    `batch_size` is the global batch in requests (split across DDP ranks). `stop_after`
    ends this invocation after that many steps (checkpointed) while keeping the full
    budget's LR schedule, as a preempted job would; `resume=True` later continues it.
    `growth` trains with alternate growth and pruning (ranker.training.growth), ending full-size.
    """

    family: str
    size: str
    db_path: str | Path | None  # the DuckDB log; None when `train` is handed a loaded split
    out_dir: str | Path  # the checkpoint folder
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    max_len: int = 256
    eval_window_ms: int = DAY_MS  # the held-out last window of the log
    # Left out of train and eval alike: the test window, kept unseen while variants are
    # chosen on the eval window just before it (0: nothing left out).
    test_window_ms: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int | None = None
    checkpoint_every: int = 500
    eval_batch_size: int = 256
    model_overrides: dict[str, Any] | None = None
    stop_after: int | None = None
    growth: GrowthConfig | None = None
    # Count Linear FLOPs (a TorchFunctionMode hook that costs time): None means with growth only.
    count_linear_flops: bool | None = None
    # Recurring training: continue the full-size model in this checkpoint folder (weights, and
    # optimizer state where saved) on `db_path`, a newer log; a fresh LR schedule, steps from 0.
    resume_from: str | Path | None = None
    # "time": evaluate on the last eval_window_ms; "loo": leave-one-out per user (ranker.training.loo).
    split: str = "time"
    # "impression": BCE per task on logged slates; "next_item": softmax over the catalogue at
    # every position (ranker.training.next_item), with sampled_negatives > 0 a sampled softmax.
    objective: str = "impression"
    sampled_negatives: int = 0
    window_stride: int | None = None  # next-item: targets per training window (None: max_len // 2)
    prefix_windows: str = "merged"  # next-item, window_stride 1: "merged" or "separate" (the reference)
    lr_schedule: str = "cosine"  # next-item: "cosine" (warm-up + cosine) or "constant" (RecBole's)
    patience: int | None = None  # next-item: early stop on validation HR@10, keep the best epoch
    select_by: str = "last"  # next-item: test the last epoch, or the best on this validation metric
    # The history window of each request (ranker.window): 1 the last max_len tokens; h > 1
    # the hop window a service with window_hop h serves (impression objective only).
    window_hop: int = 1
    # The track table's gradient (ranker.training.step_cost.TrackGradient): "sparse" (the
    # reference, sparse rows) or "rows" (index_add_ into a kept buffer, only written rows
    # zeroed). "rows" sums a row's contributions in another order, which moves every trained
    # model at rounding level (and with it the closed loop's A/B logs), so it stays an option.
    track_gradient: str = "sparse"


def train(config: TrainConfig, data: TimeSplit | None = None, progress: bool = True) -> TrainResult:
    """Train `config.family`/`config.size` on the requests before the last `eval_window_ms`
    of the log at `config.db_path` (or on `data`, an already loaded split) and evaluate on
    that last window. `progress` shows a bar and a summary line."""
    c = config
    family, size, db_path, out_dir = c.family, c.size, c.db_path, c.out_dir
    epochs, steps, batch_size, lr, seed, device = c.epochs, c.steps, c.batch_size, c.lr, c.seed, c.device
    resume, max_len, eval_window_ms, weight_decay = c.resume, c.max_len, c.eval_window_ms, c.weight_decay
    grad_clip, warmup_steps, checkpoint_every = c.grad_clip, c.warmup_steps, c.checkpoint_every
    eval_batch_size, model_overrides, stop_after = c.eval_batch_size, c.model_overrides, c.stop_after
    growth, count_linear_flops = c.growth, c.count_linear_flops
    if size not in model_class(family).SIZES:  # model_class names the known families
        raise ValueError(f"unknown size {size!r} for {family}; known: {list(model_class(family).SIZES)}")
    if batch_size < 1 or max_len < 1:
        raise ValueError(f"batch_size and max_len must be >= 1 (got {batch_size}, {max_len})")
    runtime = setup_runtime(device)
    if runtime.device.type == "cpu" and runtime.world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // runtime.world))
    out_dir = Path(out_dir)
    # Off a terminal (a log file, CI) each message is one line however long: rich would
    # otherwise wrap at 80 columns and split an epoch's figures over two lines.
    say = (partial(console.print, soft_wrap=not console.is_terminal) if runtime.is_main and progress
           else (lambda *a, **k: None))
    if c.split not in ("time", "loo") or c.objective not in ("impression", "next_item"):
        raise ValueError(f"split must be 'time' or 'loo' and objective 'impression' or 'next_item' "
                         f"(got {c.split!r}, {c.objective!r})")

    loo = None
    if data is None:
        if db_path is None:
            raise ValueError("give db_path or data")
        if c.split == "loo":
            loo = leave_one_out(load_request_log(db_path))
            if c.objective == "next_item":
                return _train_next_item(c, loo, say)
            data = loo_requests(loo)
        else:
            log = load_request_log(db_path)
            if c.test_window_ms:
                log = split_by_time(log, c.test_window_ms).train
            data = split_by_time(log, eval_window_ms)
    train_log = data.train
    if batch_size > len(train_log):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(train_log)} train requests")
    if batch_size % runtime.world:
        raise ValueError(f"global batch_size {batch_size} must divide evenly over {runtime.world} ranks")
    steps_per_epoch = len(train_log) // batch_size  # whole global batches only: equal shards
    total_steps = steps if steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    warmup = warmup_steps if warmup_steps is not None else min(100, total_steps // 10 + 1)
    last_step = total_steps if stop_after is None else min(total_steps, stop_after)

    torch.manual_seed(seed)
    parent = None if c.resume_from is None else parent_checkpoint(c, train_log.n_tracks)
    if parent is not None:
        model = model_from_config(family, parent["config"]).to(runtime.device)
    else:
        model = build_model(family, size, train_log.n_tracks,
                            **config_overrides(max_len, model_overrides)).to(runtime.device)
    optimizer = adamw(model.parameters(), lr, weight_decay, runtime.device)
    if growth is not None and growth.implementation == "sliced" and runtime.world > 1:
        raise ValueError("sliced growth swaps parameters, which DistributedDataParallel does not allow; "
                         "use --growth implementation=masked with more than one process")
    grow = GrowPrune(model, growth, total_steps, optimizer, seed) if growth is not None else None
    step = 0
    if parent is not None and not (resume and (out_dir / META_FILE).exists()):
        continue_from(c.resume_from, model, optimizer, runtime.device)
        say(f"continuing {parent['model_version']} (step {parent['step']} of its run) from {c.resume_from} "
            f"on {db_path or 'the given data'}")
    if resume and (out_dir / META_FILE).exists():
        step = restore_checkpoint(out_dir, model, optimizer, family, size, runtime.device, grow)
        say(f"resumed {family}-{size} from {out_dir} at step {step}")
    elif resume:
        say(f"no checkpoint in {out_dir}: starting from step 0")
    if grow is not None:
        grow.start(step)
        say(f"grow-and-prune: density {growth.density} until step {grow.dense_step} of {total_steps}, "
            f"updates every {growth.update_every} steps; {len(grow.groups)} groups of units, {growth.implementation}")
    counting = count_linear_flops if count_linear_flops is not None else grow is not None
    flop_counter = LinearFlopCounter(model, grow) if counting else None

    n_hist, n_cand = typical_shape(train_log, max_len)
    flops = int(model.flops_per_request(n_hist, n_cand))
    n_params = model.n_params()
    say(f"{family}-{size}{' ' + json.dumps(model_overrides) if model_overrides else ''}: {n_params:,} params, {flops:,} FLOPs/request (n={n_hist}, M={n_cand}), "
        f"{len(train_log):,} train / {len(data.eval):,} eval requests, {total_steps} steps of {batch_size}, "
        f"{runtime.device}{' bf16' if runtime.autocast_dtype else ''} x{runtime.world}")

    net: torch.nn.Module = model
    if runtime.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)
    extra: dict[str, Any] = {"n_tracks": train_log.n_tracks, "max_len": max_len, "seed": seed, "batch_size": batch_size,
             "lr": lr, "total_steps": total_steps, "cutoff_ts": data.cutoff_ts,
             "test_window_ms": c.test_window_ms,
             "model_overrides": dict(model_overrides or {}),
             "growth": growth.to_dict() if growth is not None else None,
             "objective": "impression", "split": c.split, "window_hop": c.window_hop}
    if parent is not None:
        extra["resumed_from"] = {"checkpoint": str(c.resume_from), "model_version": parent["model_version"],
                                 "step": parent["step"], "cutoff_ts": parent.get("cutoff_ts")}

    def checkpoint() -> str:
        version = ""
        if grow is not None:
            grow.release()  # full shapes on disk; the next step narrows again where sparse
        if runtime.is_main:
            version = save_checkpoint(out_dir, model, optimizer, family, size, step, extra, grow)
        if runtime.world > 1:
            dist.barrier()
        return version

    model.train()
    track_gradient = TrackGradient(model, enabled=runtime.world == 1,  # DDP keeps the dense lookup
                                   implementation=c.track_gradient)
    loss_history: list[tuple[int, float]] = []
    start_step, started, started_cpu = step, time.perf_counter(), time.process_time()
    bar = Progress(TextColumn(f"{family}-{size}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TimeRemainingColumn(), console=console, disable=not (progress and runtime.is_main), transient=True)
    with bar:
        task = bar.add_task("train", total=total_steps, completed=step, loss=float("nan"))
        while step < last_step:
            epoch, offset = divmod(step, steps_per_epoch)
            batches = iterate_batches(len(train_log), batch_size, shuffle=True, seed=seed, epoch=epoch)
            for i, global_rows in enumerate(batches):
                if i < offset or len(global_rows) < batch_size:
                    continue
                if step >= last_step:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, total_steps, lr, warmup)
                global_count = int(train_log.candidate_count[global_rows].sum())
                batch = train_log.batch(shard(global_rows, runtime), max_len, c.window_hop).to(runtime.device)
                if grow is not None:
                    grow.prepare(step)
                with runtime.autocast(), flop_counter or nullcontext():
                    logits = net(batch)
                loss = masked_bce_sum(logits, batch) * (runtime.world / global_count)
                optimizer.zero_grad(set_to_none=True)
                track_gradient.attach()
                loss.backward()
                if grow is not None:
                    grow.before_step(step)
                if grad_clip > 0:
                    clip_gradients(model.parameters(), grad_clip)
                optimizer.step()
                step += 1
                if grow is not None:
                    grow.after_step(step)
                loss_value = loss.item() / runtime.world  # this rank's share of the global mean
                loss_history.append((step, loss_value))
                bar.update(task, completed=step, loss=loss_value)
                if step % steps_per_epoch == 0 and not console.is_terminal:  # a log keeps one line per epoch
                    recent = [value for _, value in loss_history[-steps_per_epoch:]]
                    say(f"epoch {step // steps_per_epoch}/{math.ceil(total_steps / steps_per_epoch)}  "
                        f"step {step}/{total_steps}  train loss {np.mean(recent):.4f}")
                if checkpoint_every and step % checkpoint_every == 0 and step < last_step:
                    checkpoint()
    train_seconds, train_cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu
    track_gradient.close()
    if grow is not None:
        grow.release()  # full shapes for evaluation and whatever uses the model next

    metrics = evaluate(model, data.eval, max_len, eval_batch_size, runtime, c.window_hop) if runtime.is_main else {}
    if metrics and db_path is not None:  # the floor and the ceiling on the same impressions
        metrics.update(ceiling_metrics(db_path, data.train, data.eval))
    extra["metrics"] = metrics
    version = checkpoint()
    requests_seen = step * batch_size
    recent = [loss for _, loss in loss_history[-20:]]
    result = TrainResult(
        metrics=metrics, n_params=n_params, flops_per_request=flops, train_seconds=train_seconds,
        steps=step, requests_seen=requests_seen, train_compute=3.0 * flops * requests_seen,
        final_train_loss=float(np.mean(recent)) if recent else float("nan"), checkpoint=out_dir,
        model_version=version, family=family, size=size, loss_history=loss_history,
        growth=None if grow is None else {**growth.to_dict(), "dense_step": grow.dense_step, "density_now": grow.density(),
                                          "units_swapped": grow.swapped},
        linear_flops=flop_counter.summary() if flop_counter is not None else None, train_cpu_seconds=train_cpu_seconds,
    )
    if runtime.is_main and metrics:
        if grow is not None and flop_counter is not None:
            counted = flop_counter.summary()
            say(f"grow-and-prune: {counted['linear_flops_share_done']:.3f} of the dense run's Linear FLOPs "
                f"(prunable layers {counted['prunable_flops_done'] / max(1.0, counted['prunable_flops_dense']):.3f}), "
                f"{grow.swapped} units swapped, density now {grow.density():.2f}")
        say(f"{family}-{size}: {step - start_step} steps in {train_seconds:.1f}s, val loss {metrics['loss']:.4f}, "
            + ", ".join(f"AUC {t} {shown(metrics[f'auc/{t}'])}" for t in TASKS)
            + f", GAUC full_play {shown(metrics['gauc/full_play'])}, slate NDCG@10 {shown(metrics['ndcg@10'])}")
        if loo is not None:
            for which in ("valid", "test"):
                found = evaluate_loo(model_scorer(model, loo, which, max_len, "impression"), loo, which, Protocol(0), (10,))
                metrics.update({f"loo_{which}/{key}": value for key, value in found.items()})
                say(f"{which} ({Protocol(0).describe(loo.n_tracks)}): "
                    + "  ".join(f"{key.upper()} {value:.4f}" for key, value in found.items() if key != "users"))
        if POPULARITY_KEY in metrics:
            oracle, popular = metrics[ORACLE_KEY], metrics[POPULARITY_KEY]
            say(f"full-play GAUC on the same impressions: popularity {popular:.3f}, oracle "
                + (f"{oracle:.3f}; this model closes {gap_closed(metrics['gauc/full_play'], popular, oracle):.0%} "
                   "of the gap" if np.isfinite(oracle) else "n/a (no oracle_engagement in this log)"))
    return result


def parent_checkpoint(config: TrainConfig, n_tracks: int) -> dict[str, Any]:
    """The metadata of the checkpoint `config.resume_from` continues, checked against the run."""
    meta = read_checkpoint_meta(config.resume_from)
    if config.growth is not None:
        raise ValueError("--resume-from continues a full-size model; grow-and-prune applies to the offline "
                         "(first) training only, as in arXiv 2105.01064: drop --grow-prune / --growth")
    if (meta["family"], meta["size"]) != (config.family, config.size):
        raise ValueError(f"{config.resume_from} holds {meta['family']}-{meta['size']}, not "
                         f"{config.family}-{config.size}")
    if meta["config"]["n_tracks"] != n_tracks:
        raise ValueError(f"{config.resume_from} was trained on {meta['config']['n_tracks']} tracks, the log has "
                         f"{n_tracks}: recurring training needs the same catalogue")
    if meta["config"]["max_len"] != config.max_len:
        raise ValueError(f"{config.resume_from} was trained with max_len {meta['config']['max_len']}, this run "
                         f"asks for {config.max_len}")
    if config.model_overrides:
        raise ValueError("--resume-from takes the model config from the checkpoint; drop --set")
    return meta


def shown(value: float) -> str:
    """A metric as printed: 'absent' where the log cannot support it (no positives of a task)."""
    return f"{value:.3f}" if np.isfinite(value) else "absent"


def loo_requests(loo: LeaveOneOut) -> TimeSplit:
    """The impression objective on a leave-one-out split: train on the requests before each
    user's validation item, report slate metrics on the validation requests."""
    log = loo.log
    if len(log) == 0:
        raise ValueError("this log has no slates (imported with --negatives none): use --objective next-item")
    train_rows = loo.train_requests()
    valid_rows = np.flatnonzero(np.isin(log.history_end, loo.valid_index))
    if not len(train_rows) or not len(valid_rows):
        raise ValueError("leave-one-out left no training or no validation requests")
    return TimeSplit(log.select(train_rows), log.select(valid_rows), int(log.request_ts[valid_rows].min()))


def _train_next_item(c: TrainConfig, loo: LeaveOneOut, say) -> TrainResult:
    from ranker.training.next_item import train_next_item

    if c.device not in ("auto", "cpu") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("the next-item objective trains in one CPU process here")
    result = train_next_item(c.family, c.size, loo, c.out_dir, epochs=max(1, round(c.epochs)), batch_size=c.batch_size,
                             lr=c.lr, seed=c.seed, max_len=c.max_len, negatives=c.sampled_negatives,
                             weight_decay=c.weight_decay, model_overrides=c.model_overrides, say=say,
                             window_stride=c.window_stride, lr_schedule=c.lr_schedule, grad_clip=c.grad_clip,
                             patience=c.patience, select_by=c.select_by, prefix_windows=c.prefix_windows)
    metrics = {**{f"valid/{k}": v for k, v in result.valid.items()}, **{f"test/{k}": v for k, v in result.test.items()}}
    return TrainResult(metrics=metrics, n_params=result.n_params, flops_per_request=0,
                       train_seconds=result.train_seconds, steps=result.steps, requests_seen=0, train_compute=0.0,
                       final_train_loss=result.epochs[-1]["loss"] if result.epochs else float("nan"),
                       checkpoint=Path(c.out_dir), model_version=result.model_version, family=c.family, size=c.size)


# ----------------------------------------------------------------------------- command line

def config_overrides(max_len: int, model_overrides: dict[str, Any] | None) -> dict[str, Any]:
    """What a trained model's config is built with beyond its rung: the history length the
    run trains at, then the `--set` overrides (frozen configs record exactly this)."""
    return {"max_len": max_len, **(model_overrides or {})}


def parse_override(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` from `--set`; VALUE is read as JSON (or a Python literal: `True` must not
    become the always-truthy string "True") when it parses, else kept as a string, so
    `partition=none` needs no shell quoting."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
    return key.strip(), _tuples(value)  # JSON has no tuples; sequence config fields are tuples


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """`python -m ranker.training.train` (and torchrun): the `climber train` command."""
    from ranker.training.cli import train_app
    from sandbox.cli_options import run_command

    return run_command(train_app, argv, "python -m ranker.training.train")


def run_from_flags(config: TrainConfig) -> TrainResult:
    """Train, then leave the process group the run joined (the command's last step)."""
    result = train(config)
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
