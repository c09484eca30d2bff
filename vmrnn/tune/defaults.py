"""Names and defaults shared by the sweep machinery: metric, MLflow tags, smoke settings, storage."""

from __future__ import annotations

import os

# The metric every sweep optimises, and its direction. The training layer reports it once per epoch.
METRIC = "val_mse"
MODE = "min"
TIME_ATTR = "epoch"  # ASHA's clock: the training layer's epoch counter (0-based; see scheduler.py)
REPORTED_METRICS = ("val_mse", "val_mae", "val_ssim", "val_psnr", "train_loss")

# MLflow tags. `mlflow.parentRunId` and `vmrnn.run_key` are set on the trial runs by the training layer
# (from TrainConfig.parent_run_id / run_key); the sweep machinery sets the others.
TAG_SWEEP = "vmrnn.sweep"  # the sweep name, on the parent and on every trial run
TAG_ROLE = "vmrnn.role"  # "sweep" on the parent, "trial" on the trial runs
TAG_DATASET = "vmrnn.dataset"
TAG_TRIAL_ID = "vmrnn.trial_id"
TAG_TRIAL_STATUS = "vmrnn.trial_status"  # RUNNING | FINISHED | PRUNED | FAILED
TAG_RUN_KEY = "vmrnn.run_key"
TAG_ERROR = "vmrnn.error"
TAG_SWEEP_STATUS = "vmrnn.sweep_status"  # RUNNING | FINISHED | INTERRUPTED | FAILED
TAG_EVAL_DATA = "vmrnn.eval_data"  # "real" | "synthetic": what val_mse was measured on
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"

TRIAL_RUNNING = "RUNNING"
TRIAL_FINISHED = "FINISHED"
TRIAL_PRUNED = "PRUNED"
TRIAL_FAILED = "FAILED"
TRIAL_PENDING = "PENDING"
# MLflow run status per trial status (a pruned trial was stopped by ASHA: KILLED).
MLFLOW_STATUS = {TRIAL_FINISHED: "FINISHED", TRIAL_PRUNED: "KILLED", TRIAL_FAILED: "FAILED"}

# Model registry.
CHAMPION = "champion"
CHALLENGER = "challenger"


def registered_model_name(dataset: str) -> str:
    return f"vmrnn-{dataset}"


def default_experiment(dataset: str) -> str:
    return f"vmrnn-{dataset}"


def default_sweep_name(dataset: str, smoke: bool) -> str:
    return f"{dataset}-smoke" if smoke else f"{dataset}-sweep"


def model_artifact_path() -> str:
    """Where the training layer logs the best model inside a run."""
    from vmrnn.train.tracking import MODEL_ARTIFACT_PATH  # deferred: it imports torch, this module must not

    return MODEL_ARTIFACT_PATH


def default_storage_path() -> str:
    """Ray's own default (absolute, so it survives `ray job submit`'s temporary working dir)."""
    return os.environ.get("VMRNN_STORAGE_PATH") or os.path.expanduser("~/ray_results")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else MLflow's default store made absolute: sqlite:///<cwd>/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + os.path.join(os.getcwd(), "mlflow.db")


def smoke_cache_dir() -> str:
    """Where --smoke writes its synthetic data (reused by later smoke runs)."""
    base = os.environ.get("VMRNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmrnn")
    return os.path.join(base, "synthetic")


def smoke_data_dir(dataset: str) -> str:
    """The data of `--smoke` without --data-dir: small synthetic data in the real layout."""
    return os.path.join(smoke_cache_dir(), f"{dataset}-small-seed0")


# --smoke: a tiny model on small synthetic data, on CPU, in a few minutes on 2 cores.
SMOKE = {
    "num_samples": 3,
    "epochs": 2,
    "workers_per_trial": 2,
    "gpus_per_worker": 0.0,
    "cpus_per_worker": 0.5,
    "trial_cpus": 1.0,
    "max_train_batches": 4,
    "max_val_batches": 2,
    "grace_period": 1,
    "reduction_factor": 2,
}
