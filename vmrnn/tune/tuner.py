"""The Tuner of a sweep: Optuna (TPE) proposes points, the official one first; ASHA stops weak trials on
val_mse; each trial (vmrnn.tune.trial.run_trial) fits a data-parallel Ray Train TorchTrainer."""

from __future__ import annotations

import os
from typing import Any

from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from vmrnn.tracking import tags
from vmrnn.tune import defaults as D
from vmrnn.tune.args import SweepPlace, join
from vmrnn.tune.local_ray import TrialResources
from vmrnn.tune.preflight import Checked
from vmrnn.tune.progress import ProgressTable, TrialStatusToMLflow, bind_sweep
from vmrnn.tune.scheduler import EpochASHA
from vmrnn.tune.trial import TrialSetup, run_trial


def trial_setup(
    dataset: str,
    place: SweepPlace,
    settings: dict[str, Any],
    checked: Checked,
    resources: TrialResources,
    parent_run_id: str,
) -> TrialSetup:
    """What every trial shares: the training options the sweep sets (over --set's), its resources."""
    base = {
        **checked.overrides,
        "dataset": dataset,
        "data_dir": settings["data_dir"],
        "preset": settings["preset"],
        "epochs": int(settings["epochs"]),
        "seed": int(settings["seed"]),
        "tracking_uri": place.tracking_uri,
        "experiment": place.experiment,
        "parent_run_id": parent_run_id,
        "device": "auto" if resources.use_gpu else "cpu",
    }
    # Smoke limits, unless --set gave them.
    if settings.get("max_train_batches"):
        base.setdefault("max_train_batches", int(settings["max_train_batches"]))
    if settings.get("max_val_batches"):
        base.setdefault("max_val_batches", int(settings["max_val_batches"]))
        base.setdefault("max_test_batches", int(settings["max_val_batches"]))
    if settings["smoke"]:
        base.setdefault("n_vis_samples", 2)
    return TrialSetup(
        sweep=place.name,
        base=base,
        num_workers=resources.workers,
        use_gpu=resources.use_gpu,
        resources_per_worker=resources.per_worker,
        train_storage_path=join(place.exp_path, "train_runs"),
        threads_per_worker=max(1, int(resources.per_worker.get("CPU", 1))),
        tags={tags.TAG_DATASET: dataset, tags.TAG_EVAL_DATA: checked.eval_data},
    )


def build_tuner(
    setup: TrialSetup,
    place: SweepPlace,
    settings: dict[str, Any],
    checked: Checked,
    resources: TrialResources,
    parent_run_id: str,
    *,
    restore: bool,
    retry_errored: bool,
    explicit_loggers: bool = True,
) -> tune.Tuner:
    """A new Tuner, or the sweep's saved one (`restore`: Tune's state at place.exp_path).

    A new Tuner carries Tune's CSV and JSON result loggers itself (the ResultGrid reads them) and Tune
    adds no others (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1): no TensorBoard event files nobody reads, and
    no "To visualize your results with TensorBoard" line. A Tuner restored from a sweep started without
    them (`explicit_loggers=False`) keeps Tune's defaults."""
    epochs, num_samples = int(settings["epochs"]), int(settings["num_samples"])
    if explicit_loggers:
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    else:
        os.environ.pop("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", None)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": resources.driver_cpus})
    bind_sweep(
        tracking_uri=place.tracking_uri,
        experiment=place.experiment,
        sweep=place.name,
        parent_run_id=parent_run_id,
        epochs=epochs,
        num_samples=num_samples,
    )
    if restore:
        return tune.Tuner.restore(
            place.exp_path, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored
        )
    searcher = OptunaSearch(
        metric=D.METRIC,
        mode=D.MODE,
        points_to_evaluate=[dict(checked.official), *checked.points],
        seed=int(settings["seed"]),
    )
    scheduler = EpochASHA(
        epochs=epochs, grace_period=int(settings["grace_period"]), reduction_factor=int(settings["reduction_factor"])
    )
    return tune.Tuner(
        trainable,
        param_space=dict(checked.space),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=resources.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=place.name,
            storage_path=place.storage_path,
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
            callbacks=[
                CSVLoggerCallback(),
                JsonLoggerCallback(),
                ProgressTable(epochs, num_samples, sweep=place.name),
                TrialStatusToMLflow(place.tracking_uri, place.experiment, place.name, parent_run_id, epochs),
            ],
        ),
    )
