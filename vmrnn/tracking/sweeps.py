"""MLflow side of a sweep: `SweepTracker` (the parent run, the trial runs' final status, the results table
and the Optuna plots), and `TrialRow`, one trial as those see it. The trial runs themselves are created and
filled by the training layer (`vmrnn.tracking.runs`, rank 0), found here by their tag
`vmrnn.run_key` = "<sweep>/<trial_id>".
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from vmrnn.tracking import tags as T
from vmrnn.tracking import uris
from vmrnn.tracking.experiments import ensure_experiment
from vmrnn.tracking.sweep_plots import log_optuna_plots
from vmrnn.tune import defaults as D
from vmrnn.tune.values import finite_float

log = logging.getLogger(__name__)
# MLflow and pyarrow are imported inside the methods that use them: importing this module does not import them.


def _quote(value: str) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def run_key(sweep: str, trial_id: str) -> str:
    return f"{sweep}/{trial_id}"


@dataclass
class TrialRow:
    """One trial of a sweep as the results table, the plots and the summary see it."""

    trial_id: str
    status: str  # FINISHED | PRUNED | FAILED | RUNNING | PENDING
    params: dict[str, Any]
    epochs_done: int = 0
    best_val_mse: float | None = None
    best_epoch: int | None = None
    last: dict[str, float] = field(default_factory=dict)  # last reported metrics
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val_mse)
    best_metrics: dict[str, float] = field(default_factory=dict)  # reported metrics at the best epoch
    error: str | None = None
    mlflow_run_id: str | None = None
    model_uri: str | None = None  # set when the training layer logged the trial's best model

    def to_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "trial_id": self.trial_id,
            "status": self.status,
            "mlflow_run_id": self.mlflow_run_id,
            "model_uri": self.model_uri,
            "epochs_done": self.epochs_done,
            "best_val_mse": self.best_val_mse,
            "best_epoch": self.best_epoch,
        }
        for key in D.REPORTED_METRICS:
            rec[f"last_{key}"] = finite_float(self.last.get(key))
        for key, value in sorted(self.params.items()):
            rec[f"param.{key}"] = value
        rec["error"] = self.error
        return rec


class SweepTracker:
    """An MlflowClient bound to one tracking URI and experiment, for a sweep's parent and trial runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = uris.client(tracking_uri)
        self._experiment_id: str | None = None

    # -- experiment and parent run ---------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        """Found or created by the rule every run follows (vmrnn.tracking.experiments)."""
        if self._experiment_id is None:
            self._experiment_id = ensure_experiment(self.tracking_uri, self.experiment, hint="")
        return self._experiment_id

    def find_parent(self, sweep: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{T.TAG_SWEEP}` = {_quote(sweep)} AND tags.`{T.TAG_ROLE}` = {_quote(T.ROLE_SWEEP)}",
            order_by=["attributes.start_time ASC"],
            max_results=10,
        )
        if len(runs) > 1:
            log.warning(
                "%d parent runs are tagged %s=%s; using the oldest, %s",
                len(runs),
                T.TAG_SWEEP,
                sweep,
                runs[0].info.run_id,
            )
        return runs[0] if runs else None

    def get_or_create_parent(self, sweep: str, tags: dict[str, str]) -> tuple[str, bool]:
        """The sweep's parent run: found by tag (resume) or created once. Returns (run_id, created)."""
        run = self.find_parent(sweep)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            self.client.set_tag(run.info.run_id, T.TAG_SWEEP_STATUS, "RUNNING")
            return run.info.run_id, False
        all_tags = {T.TAG_SWEEP: sweep, T.TAG_ROLE: T.ROLE_SWEEP, T.TAG_SWEEP_STATUS: "RUNNING", **tags}
        run = self.client.create_run(self.experiment_id, run_name=sweep, tags=all_tags)
        return run.info.run_id, True

    def stored_params(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.params)

    def log_params_once(self, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params not logged yet; return {key: (logged, new)} for the ones that differ."""
        from mlflow.entities import Param

        existing = self.stored_params(run_id)
        conflicts = {
            k: (existing[k], str(v))
            for k, v in params.items()
            if k in existing and existing[k] != str(v)[: T.MAX_PARAM_LEN]
        }
        new = [Param(k, str(v)[: T.MAX_PARAM_LEN]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i : i + 100])
        return conflicts

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def finish_parent(self, run_id: str, status: str, sweep_status: str) -> None:
        self.client.set_tag(run_id, T.TAG_SWEEP_STATUS, sweep_status)
        self.client.set_terminated(run_id, status=status)

    # -- trial runs -------------------------------------------------------------------------------
    def find_trial_run(self, sweep: str, trial_id: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{T.TAG_RUN_KEY}` = {_quote(run_key(sweep, trial_id))}",
            order_by=["attributes.start_time ASC"],
            max_results=5,
        )
        return runs[0] if runs else None

    def trial_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{T.TAG_PARENT_RUN}` = {_quote(parent_run_id)}", max_results=5000
        )

    def mark_trial(
        self,
        *,
        sweep: str,
        trial_id: str,
        status: str,
        parent_run_id: str,
        error: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> str | None:
        """Give a trial's run its final status (idempotent; MLflow status by D.MLFLOW_STATUS: a pruned trial's
        run is FINISHED and tagged PRUNED with the epoch it stopped after). A trial that failed before the
        training layer opened its run gets a run here, so that every trial shows up under the parent."""
        run = self.find_trial_run(sweep, trial_id)
        if run is None:
            if status != D.TRIAL_FAILED:
                return None
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"{sweep}-{trial_id}",
                tags={
                    T.TAG_PARENT_RUN: parent_run_id,
                    T.TAG_RUN_KEY: run_key(sweep, trial_id),
                    T.TAG_SWEEP: sweep,
                    T.TAG_ROLE: T.ROLE_TRIAL,
                    T.TAG_TRIAL_ID: trial_id,
                },
            )
            if params:
                self.log_params_once(run.info.run_id, {k: v for k, v in params.items()})
        run_id = run.info.run_id
        self.client.set_tag(run_id, T.TAG_TRIAL_STATUS, status)
        if status == D.TRIAL_PRUNED and T.TAG_PRUNED_AT_EPOCH not in run.data.tags:
            self._record_pruned_epoch(run_id)
        if error:
            self.client.set_tag(run_id, T.TAG_ERROR, error[:4900])
            self.client.log_text(run_id, error, "error.txt")
        mlflow_status = D.MLFLOW_STATUS.get(status)
        if mlflow_status and (run.info.status != mlflow_status or run.info.end_time is None):
            self.client.set_terminated(run_id, status=mlflow_status)
        return run_id

    def _record_pruned_epoch(self, run_id: str) -> None:
        """The epoch ASHA stopped the trial after: the last one its run has metrics of (MLflow steps count epochs
        from 1), as a tag and a metric, so that a pruned run reads as stopped early, not as a crash."""
        steps = [m.step for m in self.client.get_metric_history(run_id, D.METRIC)]
        if steps:
            self.client.set_tag(run_id, T.TAG_PRUNED_AT_EPOCH, str(max(steps)))
            self.client.log_metric(run_id, "pruned_at_epoch", float(max(steps)), step=max(steps))

    def close_orphans(self, parent_run_id: str, known_trial_ids: set[str]) -> list[str]:
        """Runs under the parent left RUNNING by trials this sweep no longer knows (a driver that died
        before Tune saved its state): marked KILLED, so that nothing stays RUNNING forever."""
        closed = []
        for run in self.trial_runs(parent_run_id):
            tid = run.data.tags.get(T.TAG_TRIAL_ID) or run.data.tags.get(T.TAG_RUN_KEY, "").split("/")[-1]
            if run.info.status == "RUNNING" and tid not in known_trial_ids:
                self.client.set_tag(run.info.run_id, T.TAG_TRIAL_STATUS, "ORPHANED")
                self.client.set_terminated(run.info.run_id, status="KILLED")
                closed.append(run.info.run_id)
        return closed

    # -- end of sweep -----------------------------------------------------------------------------
    def log_results_table(self, run_id: str, rows: list[TrialRow]) -> str:
        import pyarrow as pa
        import pyarrow.parquet as pq

        records = [r.to_record() for r in rows]
        # A column's type comes from its values; params of one key share a type across trials.
        table = pa.Table.from_pylist(records) if records else pa.table({"trial_id": pa.array([], pa.string())})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "trials.parquet")
            pq.write_table(table, path)
            self.client.log_artifact(run_id, path, "results")
        return "results/trials.parquet"

    def log_optuna_plots(self, run_id: str, rows: list[TrialRow], space: dict[str, Any]) -> dict[str, str]:
        """Optuna's optimisation-history and parameter-importance plots, as PNGs on the parent run.

        Returns {plot: artifact path or "skipped: <why>"}.
        """
        return log_optuna_plots(self.client, run_id, rows, space)
