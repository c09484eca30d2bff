"""Names and defaults shared by the sweep machinery: metric, trial statuses, smoke settings, storage (the
MLflow tag names are vmrnn.tracking.tags)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from vmrnn.tracking import uris

# The metric every sweep optimises, and its direction. The training layer reports it once per epoch.
METRIC = "val_mse"
MODE = "min"
TIME_ATTR = "epoch"  # ASHA's clock: the training layer's epoch counter (0-based; see scheduler.py)
REPORTED_METRICS = ("val_mse", "val_mae", "val_ssim", "val_psnr", "train_loss")

TRIAL_RUNNING = "RUNNING"
TRIAL_FINISHED = "FINISHED"
TRIAL_PRUNED = "PRUNED"
TRIAL_FAILED = "FAILED"
TRIAL_PENDING = "PENDING"
# MLflow run status per trial status. Early stopping by ASHA is a normal outcome, not a crash: a pruned trial's
# run is FINISHED, with the tags vmrnn.trial_status=PRUNED and vmrnn.pruned_at_epoch (vmrnn.tracking.sweeps).
MLFLOW_STATUS = {TRIAL_FINISHED: "FINISHED", TRIAL_PRUNED: "FINISHED", TRIAL_FAILED: "FAILED"}


def registered_model_name(dataset: str) -> str:
    return f"vmrnn-{dataset}"


def default_sweep_name(dataset: str, smoke: bool) -> str:
    return f"{dataset}-smoke" if smoke else f"{dataset}-sweep"


def default_storage_path(tracking_uri: str) -> str:
    """Where Tune keeps a sweep's state unless told: $VMRNN_STORAGE_PATH; else `ray_results` beside a local
    MLflow store (its sqlite database, or a file: store's folder), so that the state lives, moves and is
    deleted with the runs it reports to (each checkout its own); else (a tracking server) Ray's own
    ~/ray_results. Always absolute."""
    if os.environ.get("VMRNN_STORAGE_PATH"):
        return os.environ["VMRNN_STORAGE_PATH"]
    db = uris.sqlite_path(tracking_uri)
    if db is not None:
        return str(db.parent / "ray_results")
    if tracking_uri.startswith("file:"):
        return str(Path(url2pathname(urlsplit(tracking_uri).path)).parent / "ray_results")
    return os.path.expanduser("~/ray_results")


def smoke_cache_dir() -> str:
    """Where --smoke writes its synthetic data (reused by later smoke runs)."""
    base = os.environ.get("VMRNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vmrnn"
    )
    return os.path.join(base, "synthetic")


def smoke_data_dir(dataset: str) -> str:
    """The data of `--smoke` without --data-dir: small synthetic data in the real layout."""
    return os.path.join(smoke_cache_dir(), f"{dataset}-small-seed0")


# --smoke: a tiny model on small synthetic data, on CPU, in a few minutes on 2 cores. A trial takes 1 CPU
# (0.5 for its driver, which mostly waits, and 2 workers x 0.25), so 2 cores run two at once: most of a
# smoke trial is start-up (Ray Train's controller and worker processes), which then overlaps another
# trial's epochs.
SMOKE = {
    "num_samples": 3,
    "epochs": 2,
    "workers_per_trial": 2,
    "gpus_per_worker": 0.0,
    "cpus_per_worker": 0.25,
    "trial_cpus": 0.5,
    "max_train_batches": 4,
    "max_val_batches": 2,
    "grace_period": 1,
    "reduction_factor": 2,
}
