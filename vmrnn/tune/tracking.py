"""MLflow side of a sweep: the parent run, the trial runs' final status, the results table and the
Optuna plots. The trial runs themselves are created and filled by the training layer (rank 0), found
here by their tag `vmrnn.run_key` = "<sweep>/<trial_id>".
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from vmrnn.tune import defaults as D
from vmrnn.tune.values import finite_float

log = logging.getLogger(__name__)


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
        rec: dict[str, Any] = {"trial_id": self.trial_id, "status": self.status,
                               "mlflow_run_id": self.mlflow_run_id, "model_uri": self.model_uri,
                               "epochs_done": self.epochs_done,
                               "best_val_mse": self.best_val_mse, "best_epoch": self.best_epoch}
        for key in D.REPORTED_METRICS:
            rec[f"last_{key}"] = finite_float(self.last.get(key))
        for key, value in sorted(self.params.items()):
            rec[f"param.{key}"] = value
        rec["error"] = self.error
        return rec


class Tracker:
    """An MlflowClient bound to one tracking URI and experiment."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: str | None = None

    # -- experiment and parent run ---------------------------------------------------------------
    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                artifact_location = None
                parsed = urlparse(self.tracking_uri)
                if parsed.scheme == "sqlite" and parsed.path not in ("", "/:memory:"):
                    # MLflow's default is ./mlruns of whichever process creates the experiment; pin it
                    # beside the database so that workers and later runs agree.
                    db = parsed.path[1:] if parsed.path.startswith("//") else parsed.path
                    artifact_location = os.path.join(os.path.dirname(os.path.abspath(db)), "mlruns")
                    os.makedirs(artifact_location, exist_ok=True)
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=artifact_location)
                except Exception:  # created concurrently
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    raise ValueError(f"MLflow experiment {self.experiment!r} is deleted; restore it "
                                     "(mlflow experiments restore) or pick another --experiment")
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def find_parent(self, sweep: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{D.TAG_SWEEP}` = {_quote(sweep)} AND tags.`{D.TAG_ROLE}` = "
                          f"{_quote(D.ROLE_SWEEP)}",
            order_by=["attributes.start_time ASC"], max_results=10)
        if len(runs) > 1:
            log.warning("%d parent runs are tagged %s=%s; using the oldest, %s", len(runs), D.TAG_SWEEP,
                        sweep, runs[0].info.run_id)
        return runs[0] if runs else None

    def get_or_create_parent(self, sweep: str, tags: dict[str, str]) -> tuple[str, bool]:
        """The sweep's parent run: found by tag (resume) or created once. Returns (run_id, created)."""
        run = self.find_parent(sweep)
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            self.client.set_tag(run.info.run_id, D.TAG_SWEEP_STATUS, "RUNNING")
            return run.info.run_id, False
        all_tags = {D.TAG_SWEEP: sweep, D.TAG_ROLE: D.ROLE_SWEEP, D.TAG_SWEEP_STATUS: "RUNNING", **tags}
        run = self.client.create_run(self.experiment_id, run_name=sweep, tags=all_tags)
        return run.info.run_id, True

    def stored_params(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.params)

    def log_params_once(self, run_id: str, params: dict[str, Any]) -> dict[str, tuple[str, str]]:
        """Log params not logged yet; return {key: (logged, new)} for the ones that differ."""
        from mlflow.entities import Param

        existing = self.stored_params(run_id)
        conflicts = {k: (existing[k], str(v)) for k, v in params.items()
                     if k in existing and existing[k] != str(v)[:6000]}
        new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(new), 100):
            self.client.log_batch(run_id, params=new[i:i + 100])
        return conflicts

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    def finish_parent(self, run_id: str, status: str, sweep_status: str) -> None:
        self.client.set_tag(run_id, D.TAG_SWEEP_STATUS, sweep_status)
        self.client.set_terminated(run_id, status=status)

    # -- trial runs -------------------------------------------------------------------------------
    def find_trial_run(self, sweep: str, trial_id: str):
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{D.TAG_RUN_KEY}` = {_quote(run_key(sweep, trial_id))}",
            order_by=["attributes.start_time ASC"], max_results=5)
        return runs[0] if runs else None

    def trial_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = {_quote(parent_run_id)}",
            max_results=5000)

    def mark_trial(self, *, sweep: str, trial_id: str, status: str, parent_run_id: str,
                   error: str | None = None, params: dict[str, Any] | None = None) -> str | None:
        """Give a trial's run its final status (idempotent). A trial that failed before the training
        layer opened its run gets a run here, so that every trial shows up under the parent."""
        run = self.find_trial_run(sweep, trial_id)
        if run is None:
            if status != D.TRIAL_FAILED:
                return None
            run = self.client.create_run(self.experiment_id, run_name=f"{sweep}-{trial_id}", tags={
                "mlflow.parentRunId": parent_run_id, D.TAG_RUN_KEY: run_key(sweep, trial_id),
                D.TAG_SWEEP: sweep, D.TAG_ROLE: D.ROLE_TRIAL, D.TAG_TRIAL_ID: trial_id})
            if params:
                self.log_params_once(run.info.run_id, {k: v for k, v in params.items()})
        run_id = run.info.run_id
        self.client.set_tag(run_id, D.TAG_TRIAL_STATUS, status)
        if error:
            self.client.set_tag(run_id, D.TAG_ERROR, error[:4900])
            self.client.log_text(run_id, error, "error.txt")
        mlflow_status = D.MLFLOW_STATUS.get(status)
        if mlflow_status and (run.info.status != mlflow_status or run.info.end_time is None):
            self.client.set_terminated(run_id, status=mlflow_status)
        return run_id

    def close_orphans(self, parent_run_id: str, known_trial_ids: set[str]) -> list[str]:
        """Runs under the parent left RUNNING by trials this sweep no longer knows (a driver that died
        before Tune saved its state): marked KILLED, so that nothing stays RUNNING forever."""
        closed = []
        for run in self.trial_runs(parent_run_id):
            tid = run.data.tags.get(D.TAG_TRIAL_ID) or run.data.tags.get(D.TAG_RUN_KEY, "").split("/")[-1]
            if run.info.status == "RUNNING" and tid not in known_trial_ids:
                self.client.set_tag(run.info.run_id, D.TAG_TRIAL_STATUS, "ORPHANED")
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
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as ovm

        out: dict[str, str] = {}
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = study_from_rows(rows, space)
        complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for the matplotlib backend
            plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
                     "param_importances": lambda: ovm.plot_param_importances(study)}
            for name, make in plots.items():
                if not complete:
                    out[name] = "skipped: no completed trial"
                    continue
                if name == "param_importances":
                    varying = [k for k in space if len({repr(t.params.get(k)) for t in complete}) > 1]
                    if len(complete) < 2 or not varying:
                        out[name] = ("skipped: parameter importance needs at least 2 completed trials "
                                     f"with different parameters (have {len(complete)})")
                        continue
                try:
                    ax = make()
                    fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                    fig.set_size_inches(8, 5)
                    fig.tight_layout()
                    self.client.log_figure(run_id, fig, f"plots/{name}.png")
                    plt.close(fig)
                    out[name] = f"plots/{name}.png"
                except Exception as exc:  # e.g. importance on degenerate data
                    out[name] = f"skipped: {type(exc).__name__}: {exc}"
        skipped = {k: v for k, v in out.items() if v.startswith("skipped")}
        if skipped:
            self.client.log_text(run_id, json.dumps(skipped, indent=2), "plots/skipped.json")
        return out


def study_from_rows(rows: list[TrialRow], space: dict[str, Any]):
    """An Optuna study holding the sweep's trials as the TPE searcher saw them: each trial completes
    with its last reported val_mse (an ASHA-pruned trial with the value it was stopped at, as Ray's
    OptunaSearch tells it), errored ones FAIL; intermediate values are the per-epoch val_mse."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    distributions = OptunaSearch.convert_search_space(space)
    study = optuna.create_study(direction="minimize" if D.MODE == "min" else "maximize")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study.set_metric_names([D.METRIC])
    except Exception:
        pass
    for row in rows:
        if row.status in (D.TRIAL_PENDING, D.TRIAL_RUNNING):
            continue
        params = {k: row.params[k] for k in distributions if k in row.params}
        if len(params) != len(distributions):
            continue
        last = finite_float(row.last.get(D.METRIC))
        state = optuna.trial.TrialState.COMPLETE if last is not None else optuna.trial.TrialState.FAIL
        try:
            study.add_trial(optuna.trial.create_trial(
                state=state, value=last if state == optuna.trial.TrialState.COMPLETE else None,
                params=params, distributions={k: distributions[k] for k in params},
                intermediate_values={int(e): float(v) for e, v in row.history if finite_float(v) is not None},
                user_attrs={"trial_id": row.trial_id, "status": row.status}))
        except ValueError as exc:  # a value outside its distribution: leave the trial out of the plots
            log.warning("trial %s left out of the Optuna plots: %s", row.trial_id, exc)
    return study
