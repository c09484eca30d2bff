"""Every name vmrnn writes into MLflow (run tags, the model's artifact path, model-version tags, registry
aliases), and the rule that keeps secrets out of params and tags.
"""

from __future__ import annotations

import re

from vmrnn.tracking.uris import strip_credentials

# ---- on every training run (vmrnn.tracking.runs; a sweep's trial runs are training runs)
TAG_RUN_KEY = "vmrnn.run_key"  # finds the run again after a restart; "<sweep>/<trial_id>" in a sweep
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own: nests a trial run under its sweep's parent run
TAG_DATASET = "vmrnn.dataset"
TAG_PRESET = "vmrnn.preset"
TAG_MODEL_URI = "vmrnn.model_uri"  # models:/m-... of the logged best model
TAG_MODEL_FORMAT = "vmrnn.model_format"  # pt2 | pickle: how that model was saved
TAG_BEST_EPOCH = "vmrnn.best_epoch"
TAG_WORLD_SIZE = "vmrnn.world_size"  # data-parallel workers of the run (1: one process)
TAG_EXECUTION = "vmrnn.execution"  # what ran on the worker: ExecutionConfig.describe(), e.g. bf16+fused+norm+graphs
TAG_FAILURE = "vmrnn.failure_reason"
TAG_PREVIOUS_FAILURE = "vmrnn.previous_failure"  # the failure a restart continued from
TAG_RESTARTS = "vmrnn.restarts"  # times the run was continued after a stop (worker failure, resume)
TAG_RESUMED_FROM_EPOCH = "vmrnn.resumed_from_epoch"
TAG_PARAM_CHANGED = "vmrnn.param_changed."  # + param key: a param's new value (MLflow params are immutable)
MODEL_ARTIFACT_PATH = "model"  # the best model's name in its run: runs:/<run_id>/model

# ---- on a sweep's runs (vmrnn.tracking.sweeps)
TAG_SWEEP = "vmrnn.sweep"  # the sweep name, on the parent and on every trial run
TAG_ROLE = "vmrnn.role"  # ROLE_SWEEP on the parent, ROLE_TRIAL on the trial runs
ROLE_SWEEP = "sweep"
ROLE_TRIAL = "trial"
TAG_TRIAL_ID = "vmrnn.trial_id"
TAG_TRIAL_STATUS = "vmrnn.trial_status"  # RUNNING | FINISHED | PRUNED | FAILED | ORPHANED
TAG_PRUNED_AT_EPOCH = "vmrnn.pruned_at_epoch"  # a PRUNED trial's last epoch (counted from 1); also a metric
TAG_ERROR = "vmrnn.error"
TAG_SWEEP_STATUS = "vmrnn.sweep_status"  # RUNNING | FINISHED | INTERRUPTED | FAILED
TAG_EVAL_DATA = "vmrnn.eval_data"  # "real" | "synthetic": what val_mse was measured on (also on model versions)
TAG_TUNE_PATH = "vmrnn.tune_path"  # the parent's Tune experiment folder
TAG_BEST_TRIAL_ID = "vmrnn.best_trial_id"
TAG_BEST_RUN_ID = "vmrnn.best_run_id"
TAG_REGISTERED = "vmrnn.registered"  # <name>/<version>@<alias> registered from the sweep

# ---- on registered model versions (vmrnn.tracking.registry)
VERSION_METRIC_TAGS = ("val_mse", "val_mae", "val_ssim", "val_psnr")
TAG_VERSION_CONFIG = "config"  # the training config, JSON
TAG_ALIAS_DECISION = "vmrnn.alias_decision"  # why the version got its alias
CHAMPION = "champion"
CHALLENGER = "challenger"

# ---- secrets: never in params or tags
SECRET_RE = re.compile(r"(secret|token|passw|credential|api[_-]?key|access[_-]?key|private[_-]?key|auth)", re.I)
MAX_PARAM_LEN = 6000


def is_secret_key(key: str) -> bool:
    """A key whose value must not be logged (token, password, api_key, ...)."""
    return bool(SECRET_RE.search(key))


def redact(key: str, value: str) -> str:
    """What may be logged of `value` under `key`: *** for a secret-looking key, a URI without its
    credentials, at most MAX_PARAM_LEN characters."""
    if is_secret_key(key):
        return "***"
    if "://" in value:
        value = strip_credentials(value)
    return value[:MAX_PARAM_LEN]
