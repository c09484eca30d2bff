"""The training core in plain PyTorch: one process, `torchrun` data-parallel, or a Ray Train worker.

`run_training(cfg, env, ...)` is the per-worker loop (the Ray layer calls it too); `train(cfg)` is the
plain entry that also saves/resumes epoch checkpoints. Each epoch trains on the `train` split, then
validates on the `val` split (never the test split); model selection is by val_mse, and after the last
epoch the best weights are scored once on the `test` split. Metrics are summed over ranks, so a run on
N workers reports the same numbers as one process on the same data.

The loop counts epochs from 0; users see them counted from 1 (vmrnn.train.epochs).

Imports neither Ray nor (unless tracking is on) MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vmrnn.models import build_model
from vmrnn.train import metrics_bridge
from vmrnn.train.config import TrainConfig, TrainConfigError
from vmrnn.train.distributed import (
    DistEnv,
    ShardSampler,
    all_reduce_sum,
    current_env,
    derive_seed,
    rng_state,
    seed_everything,
    unwrap,
)
from vmrnn.train.epochs import epoch_number
from vmrnn.train.execution import resolution_line
from vmrnn.train.schedule import LRSchedule, build_optimizer
from vmrnn.train.step import ExecutionConfig, make_forecast, make_train_step

log = logging.getLogger("vmrnn.train")

# Losses are summed over ranks and checked for NaN/inf every this many steps (one host sync each time);
# the first bad step is still found exactly, from the buffered per-step values.
LOSS_CHECK_EVERY = 8

REPORTED_KEYS = (
    "epoch",
    "train_loss",
    "val_mse",
    "val_mae",
    "val_ssim",
    "val_psnr",
    "lr",
    "epoch_time_s",
    "samples_per_s",
)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int, step: int, loss: float, lr: float | None = None) -> None:
        self.epoch, self.step, self.loss, self.lr = epoch, step, loss, lr
        hint = f" at lr {lr:.3g}" if lr is not None else ""
        super().__init__(
            f"training diverged: loss is {loss} at epoch {epoch_number(epoch)}, step {step}{hint} "
            "(lower lr, set grad_clip, or use precision=fp32)"
        )

    def __reduce__(self):  # picklable across Ray / multiprocessing
        return (type(self), (self.epoch, self.step, self.loss, self.lr))


class TrainingStopped(Exception):
    """Raised by an `on_epoch_end` callback to stop a run on purpose (the checkpoint is kept)."""


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[str, Any]
    improved: bool
    is_last: bool
    payload: Callable[[], tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]]
    """(state, best_model_state, meta) for `checkpoint.write_checkpoint`; only call it where needed."""


@dataclass
class TrainResult:
    metrics: dict[str, Any]  # the last epoch's reported metrics
    history: list[dict[str, Any]]
    best_epoch: int
    best_val_mse: float
    test_metrics: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # MLflow run (rank 0; None elsewhere / tracking off)
    checkpoint: str | None = None  # plain runs: the newest checkpoint directory
    best_model_state: dict[str, Tensor] | None = None
    config: TrainConfig | None = None


# ---------------------------------------------------------------------- data


def dataset_spec(cfg: TrainConfig):
    from vmrnn.data import dataset_spec as spec_of

    return spec_of(cfg.dataset, cfg.data_dir)


def build_split(cfg: TrainConfig, split: str) -> Dataset:
    from vmrnn.data import build_dataset

    return build_dataset(cfg.dataset, cfg.data_dir, split, seed=cfg.seed, **cfg.data_options)


def frames_of(batch: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    inputs, targets = batch[0], batch[1]
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def make_train_loader(ds: Dataset, cfg: TrainConfig, env: DistEnv) -> tuple[DataLoader, DistributedSampler]:
    """Shuffled with a seeded DistributedSampler (also on one process, so shuffles are reproducible and
    resumable); drop_last at both levels, as OpenSTL, so every rank runs the same number of steps and no
    sample is seen twice in an epoch."""
    n = len(ds)
    per_rank = n // env.world_size
    if per_rank < cfg.batch_size:
        raise TrainConfigError(
            f"training option 'batch_size' {cfg.batch_size} is larger than the {per_rank} training samples "
            f"per worker ({n} samples over {env.world_size} worker(s)); lower batch_size or use fewer workers"
        )
    sampler = DistributedSampler(
        ds, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    loader = DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.num_loader_workers,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return env.wrap_loader(loader, train=True), sampler


def make_eval_loader(
    ds: Dataset, batch_size: int, env: DistEnv, num_workers: int = 0, max_batches: int | None = None
) -> DataLoader:
    limit = max_batches * batch_size if max_batches else None
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        sampler=ShardSampler(len(ds), env.world_size, env.rank, limit),
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=env.device.type == "cuda",
    )
    return env.wrap_loader(loader, train=False)


# ---------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    *,
    n_input: int,
    env: DistEnv,
    execution: ExecutionConfig = ExecutionConfig(),
    metrics_mode: str = "standard",
    n_future: int | None = None,
    forecast: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Any]:
    """Forecast every batch and score the predicted frames; state summed over ranks.

    Returns mse, mae, ssim, psnr (as vmrnn.metrics computes them), `<metric>_by_lead` lists, `loss` (the
    OpenSTL vali loss: element-mean squared error on the predicted frames) and `count` (samples scored).
    `forecast`: a `make_forecast` function of this model to reuse (CUDA graphs are captured once)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    if forecast is None:
        forecast = make_forecast(model, n_input=n_input, execution=execution, device=env.device)
    acc = None
    sq_sum, count = torch.zeros((), dtype=torch.float64, device=env.device), 0  # no host sync per batch
    for batch in loader:
        inputs, targets = frames_of(batch, env.device)
        frames = torch.cat([inputs, targets], dim=1)
        preds = forecast(frames)[:, n_input - 1 :]
        if acc is None:
            acc = metrics_bridge.make_accumulator(metrics_mode, n_future or targets.shape[1])
        acc.update(preds, targets)
        sq_sum += F.mse_loss(preds.double(), targets.double(), reduction="sum")
        count += targets.numel()
    if acc is None:  # this rank had no batch (fewer samples than ranks)
        acc = metrics_bridge.make_accumulator(metrics_mode, n_future or _n_future_of(loader))
    totals = all_reduce_sum([float(sq_sum), float(count)], env)
    metrics_bridge.all_reduce(acc, env)
    model.train(was_training)
    out = metrics_bridge.compute(acc)
    out["loss"] = float(totals[0] / totals[1]) if totals[1] else float("nan")
    return out


def _n_future_of(loader: DataLoader) -> int:
    ds = loader.dataset
    return int(ds[0][1].shape[0])


# ---------------------------------------------------------------------- the loop


def _build_model(cfg: TrainConfig) -> nn.Module:
    return build_model(cfg.preset, **cfg.model)  # execution knobs: step.configure_model


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()}


def _vis_indices(n: int, k: int) -> list[int]:
    if n <= 0 or k <= 0:
        return []
    return sorted(set(np.linspace(0, n - 1, min(k, n)).round().astype(int).tolist()))


def make_meta(cfg: TrainConfig, model_cfg: dict[str, Any], spec: Any) -> dict[str, Any]:
    return {
        "train": cfg.to_dict(),
        "model": model_cfg,
        "dataset": {
            "name": cfg.dataset,
            "in_frames": spec.in_frames,
            "out_frames": spec.out_frames,
            "channels": spec.channels,
            "height": spec.height,
            "width": spec.width,
        },
    }


def effective_config(cfg: TrainConfig, env: DistEnv) -> TrainConfig:
    """`cfg` with the execution that runs on this worker's device written into its execution fields and the
    ``vmrnn.execution`` tag (so MLflow and the checkpoints record what ran); the main rank prints it."""
    if env.is_main:
        print(
            "execution: "
            + resolution_line(
                cfg.execution, cfg.execution_overrides(), device=str(env.device), world_size=env.world_size
            ),
            flush=True,
        )
    return cfg.with_effective_execution(env.device.type, env.world_size)


def run_training(
    cfg: TrainConfig,
    env: DistEnv | None = None,
    *,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    tracker: Any = None,
) -> TrainResult:
    """Train `cfg.epochs` epochs from `resume` (a checkpoint state) or from scratch, on this worker.

    `on_epoch_end` is called on every rank after each epoch (metrics already summed over ranks);
    `tracker` (rank 0) is an opened `vmrnn.tracking.runs.RunTracker` or None. Raises `TrainingDiverged`.
    `cfg` is resolved by the caller, once per run (`train`, or the Ray driver for its workers).
    """
    if not cfg.is_resolved:
        raise TrainConfigError("run_training needs a resolved config: pass cfg.resolved()")
    env = env or current_env(cfg.device)
    spec = dataset_spec(cfg)
    n_input, n_future = spec.in_frames, spec.out_frames
    device = env.device
    cfg = cfg.with_effective_execution(device.type, env.world_size)  # as `effective_config` did (idempotent)
    execution = cfg.execution_config(device.type, env.world_size)

    # Same initial weights on every rank (prepare_model also broadcasts rank 0's).
    seed_everything(cfg.seed)
    model = _build_model(cfg)
    model_cfg = model.config.to_dict()
    meta = make_meta(cfg, model_cfg, spec)
    # Setup failures (unreadable data, a checkpoint of another model) close the MLflow run as FAILED too.
    try:
        train_ds, val_ds = build_split(cfg, "train"), build_split(cfg, "val")
        start_epoch, history = 0, []
        best_epoch, best_val = -1, math.inf
        best_state: dict[str, Tensor] | None = None
        if resume is not None:
            _load_resumed_weights(model, resume, model_cfg)
            start_epoch = int(resume["epoch"]) + 1
            history = list(resume.get("history", []))
            best_epoch = int(resume.get("best_epoch", -1))
            best_val = float(resume.get("best_val_mse", math.inf))
            best_state = resume.get("best_model")
        ddp_model = env.prepare_model(model)
        core = unwrap(ddp_model)
        optimizer = build_optimizer(core, cfg)
        train_loader, sampler = make_train_loader(train_ds, cfg, env)
        steps_per_epoch = (
            len(train_loader) if cfg.max_train_batches is None else min(len(train_loader), cfg.max_train_batches)
        )
        schedule = LRSchedule(optimizer, cfg, steps_per_epoch)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            schedule.load_state_dict(resume.get("scheduler", {}))
        val_loader = make_eval_loader(val_ds, cfg.val_batch_size, env, cfg.num_loader_workers, cfg.max_val_batches)
        step_fn = make_train_step(
            ddp_model,
            optimizer,
            n_input=n_input,
            execution=execution,
            loss_target=cfg.loss_target,
            loss_kind=cfg.loss_kind,
            grad_clip=cfg.grad_clip,
            device=device,
            grad_sync=env.gradient_sync(core),
        )
        forecast_fn = make_forecast(core, n_input=n_input, execution=execution, device=device)
        vis_idx = _vis_indices(len(val_ds), cfg.n_vis_samples) if env.is_main and tracker is not None else []

        def vis_batch() -> tuple[Tensor, Tensor, Tensor]:
            items = [val_ds[i] for i in vis_idx]
            inputs = torch.stack([it[0] for it in items]).to(device)
            targets = torch.stack([it[1] for it in items]).to(device)
            core.eval()
            with torch.no_grad():
                preds = forecast_fn(torch.cat([inputs, targets], 1))[:, n_input - 1 :]
            core.train()
            return inputs.cpu(), targets.cpu(), preds.cpu()

        result_metrics: dict[str, Any] = history[-1] if history else {}
        test_metrics: dict[str, Any] = {k[5:]: v for k, v in result_metrics.items() if k.startswith("test_")}
    except BaseException as exc:
        if tracker is not None:
            tracker.fail(exc)
        raise

    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            seed_everything(derive_seed(cfg.seed, epoch, env.rank))  # exact resume, distinct per rank
            sampler.set_epoch(epoch)
            if hasattr(train_ds, "set_epoch"):
                train_ds.set_epoch(epoch)
            lr = schedule.start_epoch(epoch)
            ddp_model.train()
            loss_sum, n_steps, n_samples, pending = 0.0, 0, 0, []
            for step, batch in enumerate(train_loader):
                if step >= steps_per_epoch:
                    break
                inputs, targets = frames_of(batch, device)
                schedule.before_step(epoch, step)
                loss = step_fn(torch.cat([inputs, targets], dim=1))
                pending.append(loss.float())
                n_samples += inputs.shape[0]
                if len(pending) >= LOSS_CHECK_EVERY or step == steps_per_epoch - 1:
                    loss_sum += _check_losses(pending, epoch, step - len(pending) + 1, env, schedule.current_lr)
                    n_steps += len(pending)
                    pending = []
            train_time = time.perf_counter() - t0
            totals = all_reduce_sum([loss_sum, float(n_steps), float(n_samples)], env)
            train_loss = float(totals[0] / totals[1]) if totals[1] else float("nan")
            samples_per_s = float(totals[2]) / train_time if train_time > 0 else 0.0

            val = evaluate(
                core,
                val_loader,
                n_input=n_input,
                env=env,
                execution=execution,
                metrics_mode=cfg.metrics_mode,
                n_future=n_future,
                forecast=forecast_fn,
            )
            epoch_time = time.perf_counter() - t0
            improved = val["mse"] < best_val
            if improved:
                best_val, best_epoch = float(val["mse"]), epoch
                best_state = _cpu_state(core)
            metrics = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_mse": float(val["mse"]),
                "val_mae": float(val["mae"]),
                "val_ssim": float(val["ssim"]),
                "val_psnr": float(val["psnr"]),
                "lr": float(lr if cfg.schedule != "cosine_step" else schedule.current_lr),
                "epoch_time_s": epoch_time,
                "samples_per_s": samples_per_s,
                "val_loss": float(val["loss"]),
                "train_time_s": train_time,
                "best_val_mse": best_val,
                "best_epoch": best_epoch,  # the loop's index, as `epoch`
                "val_samples": int(val["count"]),
                "world_size": env.world_size,
            }
            is_last = epoch == cfg.epochs - 1
            if is_last and cfg.test_at_end:
                test_metrics = score_test(cfg, best_state, env, execution)
                metrics.update({f"test_{k}": v for k, v in test_metrics.items() if not isinstance(v, list)})
            history.append(metrics)
            result_metrics = metrics
            if env.is_main:
                log.info(
                    "epoch %d/%d  train_loss %.5g  val_mse %.5g  val_ssim %.4f  lr %.3g  %.1fs",
                    epoch_number(epoch),
                    cfg.epochs,
                    train_loss,
                    val["mse"],
                    val["ssim"],
                    metrics["lr"],
                    epoch_time,
                )
            if tracker is not None:
                tracker.log_epoch(metrics, epoch)
                if improved:
                    tracker.log_best_epoch(epoch, vis_batch() if vis_idx else None, val, n_input)
                if is_last and test_metrics:
                    tracker.log_test(test_metrics, epoch)

            def payload(epoch=epoch, history=history) -> tuple[dict, dict | None, dict]:
                state = {
                    "epoch": epoch,
                    "model": _cpu_state(core),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": schedule.state_dict(),
                    "rng": rng_state(),
                    "history": list(history),
                    "best_epoch": best_epoch,
                    "best_val_mse": best_val,
                    "config": cfg.to_dict(),
                    "model_config": model_cfg,
                    "world_size": env.world_size,
                    "mlflow_run_id": getattr(tracker, "run_id", None) if tracker is not None else None,
                }
                return state, best_state, meta

            if on_epoch_end is not None:
                on_epoch_end(EpochResult(epoch, metrics, improved, is_last, payload))
        if tracker is not None:
            if best_state is not None and cfg.log_model:
                tracker.log_model(best_state, model_cfg, spec, val_ds)
            tracker.finish()
    except TrainingStopped:
        if tracker is not None:
            tracker.flush()
        raise
    except BaseException as exc:
        if tracker is not None:
            tracker.fail(exc)
        raise
    return TrainResult(
        metrics=result_metrics,
        history=history,
        best_epoch=best_epoch,
        best_val_mse=best_val,
        test_metrics=test_metrics,
        run_id=getattr(tracker, "run_id", None),
        best_model_state=best_state,
        config=cfg,
    )


def _check_losses(pending: list[Tensor], epoch: int, first_step: int, env: DistEnv, lr: float) -> float:
    """Sum the buffered step losses over ranks; raise TrainingDiverged at the first non-finite step.

    Every rank sees the same summed vector, so all ranks raise at the same step (no rank is left
    waiting in a collective)."""
    vals = all_reduce_sum(torch.stack(pending).double(), env).cpu()
    bad = (~torch.isfinite(vals)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise TrainingDiverged(epoch, first_step + i, float(vals[i] / env.world_size), lr)
    return float(vals.sum() / env.world_size)


def score_test(
    cfg: TrainConfig, best_state: dict[str, Tensor] | None, env: DistEnv, execution: ExecutionConfig
) -> dict[str, Any]:
    """Score the best weights once on the test split (sharded over ranks, summed)."""
    if best_state is None:
        return {}
    spec = dataset_spec(cfg)
    model = _build_model(cfg)
    model.load_state_dict(best_state)
    model.to(env.device)
    test_ds = build_split(cfg, "test")
    loader = make_eval_loader(test_ds, cfg.val_batch_size, env, cfg.num_loader_workers, cfg.max_test_batches)
    out = evaluate(
        model,
        loader,
        n_input=spec.in_frames,
        env=env,
        execution=execution,
        metrics_mode=cfg.metrics_mode,
        n_future=spec.out_frames,
    )
    return {k: (v if isinstance(v, list) else int(v) if k == "count" else float(v)) for k, v in out.items()}


# ---------------------------------------------------------------------- plain entry


def train(
    cfg: TrainConfig | dict[str, Any],
    *,
    resume_from: str | None = None,
    resume: bool = True,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    env: DistEnv | None = None,
) -> TrainResult:
    """Run all epochs in this process (data-parallel across processes when torch.distributed is initialised,
    e.g. by `python -m vmrnn.train.torchrun_main` under torchrun).

    Checkpoints go to `cfg.checkpoint_dir` every epoch (rank 0). With `resume` (default) a run restarts
    from the newest checkpoint there; `resume_from` names a checkpoint (dir or root) explicitly.
    MLflow tracking (rank 0) follows `cfg.tracking`.
    """
    from vmrnn.train.checkpoint import latest_checkpoint, load_state, save_epoch_checkpoint

    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    env = env or current_env(cfg.device)
    if env.distributed:
        # Every rank must agree on the run key (and paths): take rank 0's.
        from vmrnn.train.distributed import broadcast_object

        cfg = TrainConfig.from_dict(broadcast_object(cfg.resolved().with_run_key().to_dict(), env))
    else:
        cfg = cfg.resolved().with_run_key()
    cfg = effective_config(cfg, env)  # before the MLflow run opens: its params record what runs
    ckpt = resume_from or (latest_checkpoint(cfg.checkpoint_dir) if resume else None)
    state = load_state(ckpt) if ckpt else None
    if state is not None:
        state["best_model"] = _load_best(state["path"])
    saved: list[str] = []

    def save(result: EpochResult) -> None:
        if cfg.checkpoint_dir and env.is_main:
            st, best, meta = result.payload()
            saved.append(
                str(save_epoch_checkpoint(cfg.checkpoint_dir, result.epoch, st, best, meta, keep=cfg.keep_checkpoints))
            )
        if on_epoch_end is not None:
            on_epoch_end(result)

    tracker, error = None, None
    if cfg.tracking and env.is_main:
        from vmrnn.tracking.runs import RunTracker

        try:
            tracker = RunTracker.open(
                cfg, run_id=(state or {}).get("mlflow_run_id"), history=(state or {}).get("history", [])
            )
        except Exception as exc:  # the other ranks must not wait for rank 0 in a collective
            error = exc
    if env.distributed:
        from vmrnn.train.distributed import broadcast_object

        failed = broadcast_object(f"{type(error).__name__}: {error}" if error else None, env)
        if failed and error is None:
            raise RuntimeError(f"rank 0 could not start: {failed}")
    if error is not None:
        raise error
    out = run_training(cfg, env, resume=state, on_epoch_end=save, tracker=tracker)
    out.checkpoint = saved[-1] if saved else (state or {}).get("path")
    return out


def _load_resumed_weights(model: torch.nn.Module, resume: dict[str, Any], model_cfg: dict[str, Any]) -> None:
    """Load a checkpoint's weights into this run's model; a checkpoint of another architecture is a
    `CheckpointMismatch` naming what differs, not a wall of state_dict keys."""
    from vmrnn.models import CheckpointMismatch

    try:
        model.load_state_dict(resume["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        saved = resume.get("model_config") or {}
        diff = [
            f"{k}={saved.get(k)!r} (this run: {model_cfg.get(k)!r})"
            for k in sorted(set(saved) | set(model_cfg))
            if saved.get(k) != model_cfg.get(k)
        ]
        why = ", ".join(diff[:6]) if diff else str(exc).strip().splitlines()[0][:200]
        raise CheckpointMismatch(
            f"checkpoint {resume.get('path', '')} holds a different model than this run: "
            f"{why}; resume with the settings it was trained with, or start a new run"
        ) from None


def _load_best(path: str) -> dict[str, Tensor] | None:
    from pathlib import Path

    from vmrnn.train.checkpoint import BEST_FILE, load_tensors

    f = Path(path) / BEST_FILE
    return load_tensors(f) if f.exists() else None


__all__ = [
    "REPORTED_KEYS",
    "EpochResult",
    "TrainResult",
    "TrainingDiverged",
    "TrainingStopped",
    "effective_config",
    "evaluate",
    "run_training",
    "score_test",
    "train",
]
