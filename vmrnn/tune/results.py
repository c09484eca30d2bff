"""A sweep's trials as we report them: their status (one rule, used by the live table, the MLflow
marking and the summary) and the rows built from Tune's ResultGrid."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from vmrnn.tracking import tags
from vmrnn.tracking.sweeps import SweepTracker, TrialRow
from vmrnn.tune import defaults as D
from vmrnn.tune.scheduler import epochs_done
from vmrnn.tune.values import finite_float


def trial_status(
    result: dict[str, Any] | None, epochs: int, *, failed: bool = False, ended: bool = False, started: bool = False
) -> str:
    """Our status of a trial: FAILED on an error; once it ended, FINISHED after its last epoch, else
    PRUNED (ASHA stopped it: Tune ends those as TERMINATED with done=True too, so only the epoch of its
    last `result` tells them apart); RUNNING once started; else PENDING."""
    if failed:
        return D.TRIAL_FAILED
    if ended:
        done = epochs_done(result)
        return D.TRIAL_FINISHED if done is not None and done >= epochs else D.TRIAL_PRUNED
    return D.TRIAL_RUNNING if started else D.TRIAL_PENDING


def status_of_trial(trial: Any, epochs: int) -> str:
    """The status of a live Tune `Trial` (what the driver's callbacks see)."""
    status = getattr(trial, "status", "PENDING")
    return trial_status(
        trial.last_result,
        epochs,
        failed=status == "ERROR",
        ended=status == "TERMINATED",
        started=status in ("RUNNING", "PAUSED"),
    )


def status_of_result(result: Any, epochs: int) -> str:
    """The status of a `Result` of the ResultGrid: a trial whose driver stopped mid-run (a resumed sweep
    that is interrupted again) has metrics but no done flag: RUNNING, unless it reached its last epoch."""
    metrics = dict(result.metrics or {})
    done = epochs_done(metrics)
    return trial_status(
        metrics,
        epochs,
        failed=result.error is not None,
        ended=bool(metrics.get("done")) or (done is not None and done >= epochs),
        started=bool(metrics),
    )


def _trial_id_from_path(path: str) -> str:
    """Tune's trial folder is <trainable>_<trial_id>_<index>_<params>_<date>."""
    found = re.search(r"run_trial_([0-9a-f]+)_\d+_", os.path.basename(path.rstrip("/")))
    return found.group(1) if found else os.path.basename(path.rstrip("/"))


def _history(df) -> tuple[list[tuple[int, float]], dict[str, float]]:
    """(epoch, val_mse) of every reported epoch, and the reported metrics of the best epoch."""
    history: list[tuple[int, float]] = []
    best_epoch_metrics: dict[str, float] = {}
    if df is None or not len(df) or D.METRIC not in df.columns:
        return history, best_epoch_metrics
    ep_col = D.TIME_ATTR if D.TIME_ATTR in df.columns else "training_iteration"
    for ep, val in zip(df[ep_col].tolist(), df[D.METRIC].tolist()):
        if finite_float(val) is not None and finite_float(ep) is not None:
            history.append((int(ep), float(val)))
    finite = df[df[D.METRIC].notna()]
    if len(finite):
        best_row = finite.loc[finite[D.METRIC].idxmin()]
        best_epoch_metrics = {
            k: float(best_row[k]) for k in D.REPORTED_METRICS if k in best_row and finite_float(best_row[k]) is not None
        }
        best_epoch_metrics[D.TIME_ATTR] = float(best_row.get(D.TIME_ATTR, 0) or 0)
    return history, best_epoch_metrics


def rows_from_results(grid: Iterable, epochs: int, tracker: SweepTracker, sweep: str) -> list[TrialRow]:
    """One row per trial of the ResultGrid, in Tune's order (the order the trials were created), with
    the trial's MLflow run and logged model when the training layer made them."""
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(str(result.path))
        history, best_epoch_metrics = _history(result.metrics_dataframe)
        row = TrialRow(
            trial_id=trial_id,
            status=status_of_result(result, epochs),
            params=dict(result.config or {}),
            epochs_done=epochs_done(metrics) or 0,
            best_val_mse=min((v for _, v in history), default=None),
            best_epoch=int(best_epoch_metrics[D.TIME_ATTR]) + 1 if best_epoch_metrics else None,
            last={k: metrics[k] for k in D.REPORTED_METRICS if k in metrics},
            history=history,
            best_metrics=best_epoch_metrics,
            error=(f"{type(result.error).__name__}: {result.error}" if result.error else None),
        )
        run = tracker.find_trial_run(sweep, trial_id)
        row.mlflow_run_id = run.info.run_id if run else None
        row.model_uri = run.data.tags.get(tags.TAG_MODEL_URI) if run else None
        rows.append(row)
    return rows
