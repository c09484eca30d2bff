"""A trial's status is one rule, whoever asks: the live table (Tune's Trial), the MLflow marking (Tune's
callbacks) and the end of the sweep (the ResultGrid's Results) agree on every case. Rows are built from
real Tune Trial / Result objects and a real sqlite MLflow store; no Ray is started."""

from __future__ import annotations

import pandas as pd
import pytest
from ray.tune import Result
from ray.tune.experiment import Trial

from vmrnn.tracking import tags
from vmrnn.tracking.sweeps import SweepTracker, run_key
from vmrnn.tune import defaults as D
from vmrnn.tune.progress import ProgressTable, TrialStatusToMLflow, bind_sweep
from vmrnn.tune.results import rows_from_results, status_of_result, status_of_trial

EPOCHS = 3
SWEEP = "s"

# name: (Tune's status of the trial, val_mse reported per epoch, expected status)
CASES = {
    "finished": (Trial.TERMINATED, [0.9, 0.4, 0.5], D.TRIAL_FINISHED),
    "pruned": (Trial.TERMINATED, [2.0], D.TRIAL_PRUNED),  # ASHA stopped it after its first epoch
    "failed": (Trial.ERROR, [0.8], D.TRIAL_FAILED),
    "running": (Trial.RUNNING, [0.7, 0.6], D.TRIAL_RUNNING),
    "pending": (Trial.PENDING, [], D.TRIAL_PENDING),
}


def _reports(trial_id: str, values: list[float], ended: bool) -> list[dict]:
    """What the training layer reports per epoch (epoch 0-based), as Tune records it."""
    reports = [
        {
            "trial_id": trial_id,
            "epoch": e,
            "val_mse": v,
            "val_ssim": 0.5,
            "train_loss": v,
            "training_iteration": e + 1,
            "done": False,
        }
        for e, v in enumerate(values)
    ]
    if reports and ended:
        reports[-1]["done"] = True
    return reports


@pytest.fixture()
def trials():
    """{name: (Tune Trial, Result of the ResultGrid, expected status)} for every case."""
    out = {}
    for name, (status, values, expected) in CASES.items():
        trial = Trial("run_trial", config={"lr": 1e-3, "depth": 2}, stub=True)
        reports = _reports(trial.trial_id, values, ended=status in (Trial.TERMINATED, Trial.ERROR))
        for report in reports:
            trial.update_last_result(report)
        trial.set_status(status)
        metrics = {**reports[-1], "config": dict(trial.config)} if reports else {}
        result = Result(
            metrics=metrics,
            checkpoint=None,
            error=RuntimeError("worker died") if status == Trial.ERROR else None,
            path=f"/results/{SWEEP}/run_trial_{trial.trial_id}_0000{len(out)}_{len(out)}_lr=0.001_2026",
            metrics_dataframe=pd.DataFrame(reports) if reports else None,
        )
        out[name] = (trial, result, expected)
    return out


def test_the_table_and_the_result_grid_agree_on_every_status(trials):
    for name, (trial, result, expected) in trials.items():
        assert (status_of_trial(trial, EPOCHS), status_of_result(result, EPOCHS)) == (expected, expected), name
    table = ProgressTable(EPOCHS, num_samples=len(trials)).render([t for t, _, _ in trials.values()])
    for trial, _, expected in trials.values():
        assert f"  {trial.trial_id:<10} {expected:<9}" in table
    assert "best so far: val_mse 0.4 (trial" in table
    # Its last epoch reported, then the sweep stopped before Tune ended it: running while it lives (its
    # workers still log the model), finished in the results the Tuner returns.
    trial, result, _ = trials["running"]
    last = _reports(trial.trial_id, [0.7, 0.6, 0.5], ended=False)[-1]
    trial.update_last_result(last)
    assert status_of_trial(trial, EPOCHS) == D.TRIAL_RUNNING
    assert status_of_result(Result(last, None, None, result.path), EPOCHS) == D.TRIAL_FINISHED


def test_mlflow_marking_and_rows_from_results(trials, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "vmrnn-test")
    parent_id, _ = tracker.get_or_create_parent(SWEEP, tags={})
    # The training layer opened runs for the trials that trained; the finished one logged its model.
    runs = {}
    for name in ("finished", "pruned", "running"):
        tid = trials[name][0].trial_id
        runs[name] = tracker.client.create_run(
            tracker.experiment_id,
            tags={tags.TAG_RUN_KEY: run_key(SWEEP, tid), tags.TAG_TRIAL_ID: tid, "mlflow.parentRunId": parent_id},
        ).info.run_id
    tracker.client.set_tag(runs["finished"], tags.TAG_MODEL_URI, "models:/m-123")

    # Tune's callbacks, as the driver's Tuner calls them when a trial ends.
    bind_sweep(
        tracking_uri=uri,
        experiment="vmrnn-test",
        sweep=SWEEP,
        parent_run_id=parent_id,
        epochs=EPOCHS,
        num_samples=len(trials),
    )
    callback = TrialStatusToMLflow(uri, "vmrnn-test", SWEEP, parent_id, EPOCHS)
    callback.setup()
    every = [t for t, _, _ in trials.values()]
    for name in ("finished", "pruned"):
        callback.on_trial_complete(0, every, trials[name][0])
    callback.on_trial_error(0, every, trials["failed"][0])
    for name in ("finished", "pruned", "failed"):
        trial, _, expected = trials[name]
        run = tracker.find_trial_run(SWEEP, trial.trial_id)  # the failed trial gets a run here
        assert run.data.tags[tags.TAG_TRIAL_STATUS] == expected
        assert run.info.status == D.MLFLOW_STATUS[expected], name
    assert tracker.client.get_run(runs["running"]).info.status == "RUNNING"

    rows = rows_from_results([r for _, r, _ in trials.values()], EPOCHS, tracker, SWEEP)
    assert [r.trial_id for r in rows] == [t.trial_id for t in every]  # ids from results, else the path
    by_name = dict(zip(trials, rows))
    assert {n: r.status for n, r in by_name.items()} == {n: e for n, (_, _, e) in trials.items()}
    best = by_name["finished"]
    assert (best.epochs_done, best.best_val_mse, best.best_epoch, best.history) == (
        3,
        0.4,
        2,
        [(0, 0.9), (1, 0.4), (2, 0.5)],
    )
    assert best.best_metrics == {"val_mse": 0.4, "val_ssim": 0.5, "train_loss": 0.4, "epoch": 1.0}
    assert (best.mlflow_run_id, best.model_uri) == (runs["finished"], "models:/m-123")
    assert by_name["pruned"].model_uri is None and by_name["pruned"].epochs_done == 1
    assert by_name["failed"].error == "RuntimeError: worker died"
    assert by_name["failed"].mlflow_run_id == tracker.find_trial_run(SWEEP, trials["failed"][0].trial_id).info.run_id
    pending = by_name["pending"]
    assert (pending.epochs_done, pending.best_val_mse, pending.mlflow_run_id, pending.params) == (0, None, None, {})
