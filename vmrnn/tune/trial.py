"""One sweep trial: a Tune function trainable that builds and fits a Ray Train TorchTrainer.

Ray 2.60 runs Train V2, where `Tuner(TorchTrainer(...))` is not supported: each trial is a plain Tune
function whose TorchTrainer reports its workers' metrics to Tune through `TuneReportCallback`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray import tune

from vmrnn.tracking import tags
from vmrnn.tracking.sweeps import run_key
from vmrnn.train.config import TrainConfig
from vmrnn.train.phases import clear_phase, set_phase
from vmrnn.tune.spaces import split_params


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares (passed with tune.with_parameters)."""

    sweep: str
    base: dict[str, Any]  # TrainConfig fields common to all trials (dataset, data_dir, epochs, MLflow, ...)
    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]
    train_storage_path: str  # Ray Train run dirs: <this>/train-<trial_id>
    tags: dict[str, str] = field(default_factory=dict)
    max_failures: int = 1  # worker-group restarts (from the last checkpoint) before the trial fails
    threads_per_worker: int = 1  # torch threads of a CPU worker


def trial_train_config(setup: TrialSetup, params: dict[str, Any], trial_id: str) -> TrainConfig:
    """The TrainConfig of one trial, not resolved yet: the shared base, the sampled point, and the trial's
    MLflow identity (child of the sweep's parent run, continued across restarts through
    run_key = <sweep>/<trial_id>)."""
    train, model = split_params(params)
    d = dict(setup.base)
    d.update(train)
    d["model"] = {**dict(setup.base.get("model") or {}), **model}
    d["run_key"] = run_key(setup.sweep, trial_id)
    d["run_name"] = f"{setup.sweep}-{trial_id}"
    d["tags"] = {
        **dict(setup.base.get("tags") or {}),
        **setup.tags,
        tags.TAG_SWEEP: setup.sweep,
        tags.TAG_ROLE: tags.ROLE_TRIAL,
        tags.TAG_TRIAL_ID: trial_id,
    }
    return TrainConfig.from_dict(d)


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: fit one data-parallel TorchTrainer; its workers' reports become the trial's.

    The trial's config is resolved once, here (build_trainer), and its workers get it resolved."""
    trial_id = tune.get_context().get_trial_id()
    key = run_key(setup.sweep, trial_id)
    set_phase(key, "loading the training layer")
    # Deferred: Ray Train (and torch.distributed) load in the trial's own process, not in the sweep driver.
    import ray.train
    from ray.tune.integration.ray_train import TuneReportCallback

    from vmrnn.train.ray_train import build_trainer, raise_if_failed

    set_phase(key, "building its trainer")
    cfg = trial_train_config(setup, config, trial_id)
    # Same name and storage on a restart (a resumed sweep): Ray Train V2 picks up the run's latest
    # checkpoint, and the training layer continues the same MLflow run (run_key).
    run_config = ray.train.RunConfig(
        name=f"train-{trial_id}",
        storage_path=setup.train_storage_path,
        failure_config=ray.train.FailureConfig(max_failures=setup.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        callbacks=[TuneReportCallback()],
    )
    trainer = build_trainer(
        cfg,
        num_workers=setup.num_workers,
        use_gpu=setup.use_gpu,
        resources_per_worker=dict(setup.resources_per_worker),
        run_config=run_config,
        threads_per_worker=setup.threads_per_worker,
        check=False,  # the sweep checked the data and the MLflow store before Ray started
    )
    set_phase(key, f"starting {setup.num_workers} worker{'s' if setup.num_workers > 1 else ''}")
    try:
        result = trainer.fit()
    finally:
        clear_phase(key)
    error = getattr(result, "error", None)
    if error is not None:  # a Train failure must fail the trial, not end it as if it finished
        raise error
    # The workers return (rather than raise) on a NaN/inf loss and on bad input, so that Ray does not
    # retry what would fail again: fail the trial here with that reason (it was not pruned).
    raise_if_failed(getattr(result, "return_value", None))
