"""The thin Ray Train (V2, Ray 2.60) layer over the plain training core.

    trainer = build_trainer(cfg, num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5},
                            run_config=ray.train.RunConfig(name=..., storage_path=...))
    result = trainer.fit()

`train_loop_per_worker(config)` runs `vmrnn.train.loop.run_training` on each worker (the model on Ray's
device for the worker, not wrapped in DDP: the step all-reduces the gradients itself, so it can be one
CUDA graph; see vmrnn.train.data_parallel) with `prepare_data_loader`, reports the per-epoch metrics with a
checkpoint through `ray.train.report`, and resumes from `ray.train.get_checkpoint()` after a worker
failure (`FailureConfig(max_failures)`). Rank 0 owns the MLflow run.

Divergence (NaN/inf loss) is not retried: retrying from the last checkpoint would diverge again, so the
workers report `diverged=1` (with NaN validation metrics) and return; `fit` raises `TrainingDiverged`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

# Read by Ray when it is imported: a local Ray listens on 127.0.0.1 only and sends no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402

from vmrnn.tracking.tags import ROLE_TRIAL, TAG_ROLE
from vmrnn.train.checkpoint import BEST_FILE, load_state, write_checkpoint
from vmrnn.train.config import TrainConfig
from vmrnn.train.distributed import DistEnv
from vmrnn.train.epochs import epoch_number
from vmrnn.train.loop import REPORTED_KEYS, EpochResult, TrainingDiverged, effective_config, run_training
from vmrnn.train.phases import set_phase

log = logging.getLogger("vmrnn.train")

# Seconds Ray Train waits for the worker group to start (default 60 s, tight on a 2-core machine and
# for GPU workers that import CUDA); propagated from the driver to the controller and workers.
WORKER_GROUP_START_TIMEOUT_S = "300"


def init_local_ray(
    address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, **kwargs: Any
) -> None:
    """Connect to `address` / $RAY_ADDRESS, else start a local loopback-only Ray with the dashboard
    (Train V2 needs its State API to clean up placement groups between runs)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
    else:
        from ray._private import ray_constants

        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            # Ray was imported before our default was set (the constant is read at import): loopback only.
            ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


# ---------------------------------------------------------------------- worker side


def _prepare_model(model):
    return model.to(ray.train.torch.get_device())


def _prepare_loader(loader, train: bool = True):
    # Our samplers already shard (train: a seeded DistributedSampler, which Ray keeps; eval: an exact
    # non-padding shard, which Ray must not replace), so Ray only moves the batches to the device.
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=train)


def _ray_env() -> DistEnv:
    ctx = ray.train.get_context()
    return DistEnv(
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        local_rank=ctx.get_local_rank(),
        device=ray.train.torch.get_device(),
        wrap_model=_prepare_model,
        wrap_loader=_prepare_loader,
        backend="ray",
    )


def _load_resume(checkpoint: ray.train.Checkpoint) -> dict[str, Any]:
    import torch

    with checkpoint.as_directory() as d:
        state = load_state(d)
        best = Path(d) / BEST_FILE
        state["best_model"] = torch.load(best, map_location="cpu", weights_only=True) if best.exists() else None
    return state


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'bad input' (data, config, checkpoint), deterministic: retrying cannot help."""
    from vmrnn.data.errors import DataError
    from vmrnn.models import CheckpointMismatch, ConfigError
    from vmrnn.train.checkpoint import CheckpointError

    return (DataError, ConfigError, CheckpointMismatch, CheckpointError)


def raise_if_failed(summary: Any) -> None:
    """Re-raise in the driver what the workers returned instead of raising: bad input (`failed`) as
    itself, divergence as `TrainingDiverged`."""
    if not isinstance(summary, dict):
        return
    if summary.get("failed") is not None:
        raise summary["failed"]
    if summary.get("diverged"):
        raise TrainingDiverged(
            summary.get("epoch", -1), summary.get("step", -1), summary.get("loss", float("nan")), summary.get("lr")
        )


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train worker entry. config: {"train_config": TrainConfig dict (resolved, with run_key, as
    `build_trainer` passes it), "threads_per_worker": int}, or a plain TrainConfig dict. Returns a summary
    (rank 0's becomes `Result.return_value`)."""
    import torch

    if "train_config" not in config:
        config = {"train_config": config}
    cfg = TrainConfig.from_dict(config["train_config"])
    env = _ray_env()
    cfg = effective_config(cfg, env)  # before the MLflow run opens: its params record what runs
    if env.device.type == "cpu":
        torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    ckpt = ray.train.get_checkpoint()
    resume = _load_resume(ckpt) if ckpt is not None else None
    if resume is not None and env.is_main:
        log.info("resuming from %s (epoch %d)", resume.get("path"), resume["epoch"])
    # A sweep trial's rank 0 tells the sweep's progress table what it is doing until its first result.
    show_phase = env.is_main and (cfg.tags or {}).get(TAG_ROLE) == ROLE_TRIAL and bool(cfg.run_key)
    tracker = None
    if cfg.tracking and env.is_main:
        from vmrnn.tracking.runs import RunTracker

        if show_phase:
            set_phase(cfg.run_key, "opening its MLflow run")
        tracker = RunTracker.open(
            cfg, run_id=(resume or {}).get("mlflow_run_id"), history=(resume or {}).get("history", [])
        )
    if show_phase:
        set_phase(cfg.run_key, "resuming" if resume is not None else "first epoch")

    def on_epoch_end(res: EpochResult) -> None:
        with tempfile.TemporaryDirectory(prefix="vmrnn-ckpt-") as d:
            checkpoint = None
            if env.is_main:
                state, best, meta = res.payload()
                write_checkpoint(d, state, best, meta)
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(
                res.metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=f"checkpoint_epoch{epoch_number(res.epoch):04d}_{time.time_ns()}",
            )

    try:
        result = run_training(cfg, env, resume=resume, on_epoch_end=on_epoch_end, tracker=tracker)
    except _input_errors() as exc:
        # Bad data or a checkpoint of another model fails the same way on every attempt (and on every
        # rank, before any collective): no retry, no worker traceback; `fit` raises it in the driver.
        return {
            "diverged": False,
            "failed": exc,
            "error": f"{type(exc).__name__}: {exc}",
            "run_id": getattr(tracker, "run_id", None),
        }
    except TrainingDiverged as exc:
        # Every rank sees the same summed losses, so every rank gets here at the same step.
        metrics = {k: float("nan") for k in REPORTED_KEYS}
        metrics.update(epoch=exc.epoch, diverged=1.0, diverged_step=exc.step)
        ray.train.report(metrics)
        return {
            "diverged": True,
            "epoch": exc.epoch,
            "step": exc.step,
            "loss": exc.loss,
            "lr": exc.lr,
            "error": str(exc),
            "run_id": getattr(tracker, "run_id", None),
        }
    return {
        "diverged": False,
        "run_id": result.run_id,
        "best_epoch": result.best_epoch,
        "best_val_mse": result.best_val_mse,
        "test_metrics": result.test_metrics,
        "epochs": len(result.history),
        "resumed_from_epoch": resume["epoch"] if resume else None,
    }


# ---------------------------------------------------------------------- driver side


class ProgressCallback(UserCallback):
    """One line per reported epoch (printed by the Ray Train controller, forwarded to the driver)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def after_report(self, run_context, metrics, checkpoint) -> None:
        m = metrics[0] if metrics else {}
        if "epoch" not in m:
            return
        if m.get("diverged"):
            print(
                f"[vmrnn] diverged at epoch {epoch_number(m['epoch'])}, step {int(m.get('diverged_step', -1))}",
                flush=True,
            )
            return
        extra = "".join(f"  {k} {m[k]:.5g}" for k in ("test_mse", "test_ssim") if k in m)
        print(
            f"[vmrnn] epoch {int(m['epoch']) + 1}/{self.epochs}  train_loss {m['train_loss']:.5g}  "
            f"val_mse {m['val_mse']:.5g}  val_ssim {m['val_ssim']:.4f}  lr {m['lr']:.3g}  "
            f"{m['epoch_time_s']:.1f}s  {m['samples_per_s']:.1f} samples/s{extra}",
            flush=True,
        )


def prepare_config(cfg: TrainConfig | dict[str, Any], *, check: bool = True) -> TrainConfig:
    """Resolve in the driver (absolute paths, pinned MLflow URI, a run_key), and unless `check` is off (a
    caller that checked both already) check the data is there and MLflow is reachable (fails within
    seconds, naming the URI) so that workers never start doomed."""
    from vmrnn.data import open_store

    cfg = TrainConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
    if getattr(cfg, "_prepared", False):  # the CLI prepares before `fit`, which prepares again: once is enough
        return cfg
    cfg = cfg.resolved().with_run_key()
    if not check:
        return cfg
    # Missing or malformed data is a DataError here, once, not a worker failure that Ray retries.
    open_store(cfg.dataset, cfg.data_dir, cfg.data_options.get("prepared", "auto"))
    if cfg.tracking:
        from vmrnn.tracking.experiments import default_experiment, ensure_experiment

        ensure_experiment(cfg.tracking_uri or "", cfg.experiment or default_experiment(cfg.dataset))
    cfg._prepared = True  # not a field: a copy (replace, from_dict) is prepared again
    return cfg


def build_trainer(
    cfg: TrainConfig,
    *,
    num_workers: int,
    use_gpu: bool,
    resources_per_worker: dict | None,
    run_config: RunConfig,
    threads_per_worker: int = 1,
    check: bool = True,
) -> TorchTrainer:
    """A TorchTrainer that runs `train_loop_per_worker` on `num_workers` workers (gloo on CPU, NCCL on GPU).

    `cfg.batch_size` is per worker. The caller owns `run_config` (name, storage_path, failure_config,
    checkpoint_config, callbacks); a run_config without failure/checkpoint settings keeps Ray's defaults.
    `cfg` is resolved here (prepare_config), once: the workers get it resolved; `check=False` skips the
    data and MLflow checks (a sweep's trials: the sweep checked both before Ray started, and they would
    cost each trial an MLflow import and store set-up)."""
    return _trainer(
        prepare_config(cfg, check=check),
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        run_config=run_config,
        threads_per_worker=threads_per_worker,
    )


def _trainer(
    cfg: TrainConfig,
    *,
    num_workers: int,
    use_gpu: bool,
    resources_per_worker: dict | None,
    run_config: RunConfig,
    threads_per_worker: int,
) -> TorchTrainer:
    """build_trainer for a config from prepare_config."""
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", WORKER_GROUP_START_TIMEOUT_S)
    if num_workers < 1:
        from vmrnn.train.config import TrainConfigError

        raise TrainConfigError(f"num_workers must be >= 1; got {num_workers}")
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources_per_worker)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": cfg.to_dict(),
            "threads_per_worker": threads_per_worker,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=scaling,
        run_config=run_config,
    )


def fit(
    cfg: TrainConfig | dict[str, Any],
    num_workers: int = 1,
    use_gpu: bool = False,
    *,
    resources_per_worker: dict | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 2,
    num_to_keep: int = 2,
    progress: bool = True,
    threads_per_worker: int | None = None,
) -> ray.train.Result:
    """Run one TorchTrainer to completion (starting a local Ray if none is connected); for the CLI.

    Raises TrainingDiverged when the loss became NaN/inf, ray.train.TrainingFailedError when the
    workers failed more than `max_failures` times."""
    cfg = prepare_config(cfg)
    init_local_ray()
    if resources_per_worker is None:
        cpus = float(ray.available_resources().get("CPU", 1.0))
        per = max(0.25, min(1.0, (cpus - 0.5) / num_workers))  # the controller needs a little too
        resources_per_worker = {"CPU": per}
        if use_gpu:
            resources_per_worker["GPU"] = 1
    if threads_per_worker is None:
        threads_per_worker = max(1, int(resources_per_worker.get("CPU", 1)))
    run_config = RunConfig(
        name=name or f"vmrnn-{cfg.dataset}-{(cfg.run_key or '')[:8]}",
        storage_path=str(Path(storage_path or Path.home() / "ray_results").expanduser().resolve()),
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        callbacks=[ProgressCallback(int(cfg.epochs or 0))] if progress else [],
    )
    trainer = _trainer(
        cfg,
        num_workers=num_workers,
        use_gpu=use_gpu,
        resources_per_worker=resources_per_worker,
        run_config=run_config,
        threads_per_worker=threads_per_worker,
    )
    result = trainer.fit()
    raise_if_failed(result.return_value)
    return result


__all__ = [
    "ProgressCallback",
    "build_trainer",
    "fit",
    "init_local_ray",
    "prepare_config",
    "raise_if_failed",
    "train_loop_per_worker",
]
