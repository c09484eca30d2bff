"""The end of a sweep: every trial's final status in MLflow, the results table and plots on the parent
run, the best model registered, and the summary printed."""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from typing import Any

from vmrnn import commands
from vmrnn.tracking import tags
from vmrnn.tracking.experiments import ui_hint
from vmrnn.tracking.registry import Registration, register_best
from vmrnn.tracking.sweeps import SweepTracker, TrialRow
from vmrnn.tracking.uris import absolute_tracking_uri, default_tracking_uri, strip_credentials
from vmrnn.tune import defaults as D
from vmrnn.tune.args import SweepPlace
from vmrnn.tune.results import rows_from_results
from vmrnn.tune.trial import TrialSetup, trial_train_config

log = logging.getLogger("vmrnn.tune")


@dataclass
class SweepOutcome:
    rows: list[TrialRow]
    best: TrialRow | None
    registration: Registration | None
    registration_note: str
    interrupted: bool
    plots: dict[str, str]
    finished_before: bool = False  # the sweep had finished already: nothing ran, nothing was logged

    @classmethod
    def already_finished(cls) -> SweepOutcome:
        return cls(
            rows=[],
            best=None,
            registration=None,
            registration_note="",
            interrupted=False,
            plots={},
            finished_before=True,
        )


def finish(
    grid,
    *,
    dataset: str,
    place: SweepPlace,
    settings: dict[str, Any],
    tracker: SweepTracker,
    parent_id: str,
    space: dict[str, Any],
    setup: TrialSetup,
    eval_data: str,
    register: bool,
    t_start: float,
) -> SweepOutcome:
    """After Tuner.fit: honest trial statuses, results table, plots, registry, summary."""
    name = place.name
    rows = rows_from_results(grid, int(settings["epochs"]), tracker, name)
    for row in rows:
        if row.status in D.MLFLOW_STATUS:
            try:
                run_id = tracker.mark_trial(
                    sweep=name,
                    trial_id=row.trial_id,
                    status=row.status,
                    parent_run_id=parent_id,
                    error=row.error,
                    params=row.params,
                )
                row.mlflow_run_id = row.mlflow_run_id or run_id
            except Exception as exc:
                log.warning("could not record trial %s in MLflow: %s", row.trial_id, exc)
    orphans = tracker.close_orphans(parent_id, {r.trial_id for r in rows})
    interrupted = any(r.status in (D.TRIAL_RUNNING, D.TRIAL_PENDING) for r in rows) or len(rows) < int(
        settings["num_samples"]
    )

    tracker.log_results_table(parent_id, rows)
    plots = tracker.log_optuna_plots(parent_id, rows, space)
    best, candidates = pick_best(rows)
    if best is not None:
        log_best(tracker, parent_id, best, rows)
    registration, note = None, ""
    if interrupted:
        note = "sweep interrupted: nothing registered yet; re-run the same command to resume"
    elif best is None:
        note = "no trial produced a result: nothing to register"
    elif not register:
        note = "registration skipped (--no-register)"
    elif not candidates:
        note = "no trial logged a model (see the trial runs' vmrnn.failure_reason): nothing to register"
    else:
        registration, best, note = register_first(
            candidates, tracker, dataset=dataset, sweep=name, setup=setup, eval_data=eval_data
        )
        if registration is not None:
            tracker.client.set_tag(
                parent_id, tags.TAG_REGISTERED, f"{registration.name}/{registration.version}@{registration.alias}"
            )
    if interrupted:
        tracker.client.set_tag(parent_id, tags.TAG_SWEEP_STATUS, "INTERRUPTED")
        tracker.client.set_terminated(parent_id, status="KILLED")
    else:
        tracker.finish_parent(
            parent_id, "FINISHED" if best is not None else "FAILED", "FINISHED" if best is not None else "FAILED"
        )
    outcome = SweepOutcome(
        rows=rows, best=best, registration=registration, registration_note=note, interrupted=interrupted, plots=plots
    )
    print_summary(name, dataset, outcome, tracker, parent_id, orphans, time.time() - t_start)
    return outcome


def pick_best(rows: list[TrialRow]) -> tuple[TrialRow | None, list[TrialRow]]:
    """The best trial by its best-epoch val_mse, finished before pruned, and the ones whose run holds a
    model in that order (the training layer logs the best weights when a run ends, so ASHA-pruned trials
    normally have none): the best is the first of those when there is one."""
    scored = sorted(
        (
            r
            for r in rows
            if r.best_val_mse is not None and r.mlflow_run_id and r.status in (D.TRIAL_FINISHED, D.TRIAL_PRUNED)
        ),
        key=lambda r: (r.status != D.TRIAL_FINISHED, r.best_val_mse),
    )
    candidates = [r for r in scored if r.model_uri]
    return (candidates[0] if candidates else (scored[0] if scored else None)), candidates


def log_best(tracker: SweepTracker, parent_id: str, best: TrialRow, rows: list[TrialRow]) -> None:
    """The best trial's metrics, params and ids on the parent run, with the trial counts."""
    metrics = {f"best_{k}": v for k, v in best.best_metrics.items()}
    metrics["best_val_mse"] = best.best_val_mse
    metrics.update({"best_epoch": best.best_epoch} if best.best_epoch else {})  # counted from 1, as the console
    metrics.update(
        {
            "trials_finished": sum(r.status == D.TRIAL_FINISHED for r in rows),
            "trials_pruned": sum(r.status == D.TRIAL_PRUNED for r in rows),
            "trials_failed": sum(r.status == D.TRIAL_FAILED for r in rows),
        }
    )
    for key, value in metrics.items():
        tracker.client.log_metric(parent_id, key, float(value))
    tracker.client.set_tag(parent_id, tags.TAG_BEST_TRIAL_ID, best.trial_id)
    tracker.client.set_tag(parent_id, tags.TAG_BEST_RUN_ID, best.mlflow_run_id)
    conflicts = tracker.log_params_once(parent_id, {f"best.{k}": v for k, v in best.params.items()})
    if conflicts:
        log.warning("the best trial changed since a previous end of this sweep: %s", conflicts)
    tracker.log_json(
        parent_id,
        {"trial_id": best.trial_id, "mlflow_run_id": best.mlflow_run_id, "params": best.params, "metrics": metrics},
        "results/best.json",
    )


def register_first(
    candidates: list[TrialRow], tracker: SweepTracker, *, dataset: str, sweep: str, setup: TrialSetup, eval_data: str
) -> tuple[Registration | None, TrialRow, str]:
    """Register the first candidate whose model loads; returns (registration, the trial registered, note)."""
    errors: list[str] = []
    for cand in candidates:
        try:
            registration = register_best(
                tracker.tracking_uri,
                dataset=dataset,
                run_id=cand.mlflow_run_id,
                val_mse=float(cand.best_val_mse),
                metrics=cand.best_metrics,
                config=_full_config(setup, cand),
                sweep=sweep,
                trial_id=cand.trial_id,
                eval_data=eval_data,
            )
        except Exception as exc:  # no model logged under that run (e.g. pruned before the first save)
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if cand is not candidates[0]:
            log.warning(
                "the best trial %s has no loadable model (%s); registered trial %s instead",
                candidates[0].trial_id,
                errors[0] if errors else "?",
                cand.trial_id,
            )
        return registration, cand, ""
    return None, candidates[0], f"could not register any trial's model: {errors[:2]}"


def _full_config(setup: TrialSetup, row: TrialRow) -> dict[str, Any]:
    """The trial's training config (what the registered model was trained with), minus the tracking URI
    (it may hold credentials) and per-run MLflow identity."""
    try:
        d = trial_train_config(setup, row.params, row.trial_id).to_dict()
    except Exception:
        return _config_for_tag(row.params)
    for key in ("tracking_uri", "parent_run_id", "run_key", "run_name", "tags"):
        d.pop(key, None)
    return d


def _config_for_tag(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def look_line(tracker: SweepTracker, parent_id: str) -> str:
    hint = ui_hint(tracker.tracking_uri, tracker.experiment_id, parent_id)
    return (
        f"MLflow: parent run {parent_id} in experiment {tracker.experiment!r} "
        f"(results/trials.parquet, plots/*.png); look with: {hint}"
    )


def predict_command(model_uri: str, tracking_uri: str) -> str:
    """`vmrnn predict` on a registered model, as it runs from here (the store named unless it is the
    default one of this folder, which `vmrnn predict` finds by itself)."""
    store = ""
    if tracking_uri != absolute_tracking_uri(default_tracking_uri()):
        store = f" --tracking-uri {shlex.quote(strip_credentials(tracking_uri))}"
    return f"{commands.tool('vmrnn', 'vmrnn')} predict --model {model_uri}{store} --input x.npy --out y.npy"


def print_summary(
    name: str,
    dataset: str,
    outcome: SweepOutcome,
    tracker: SweepTracker,
    parent_id: str,
    orphans: list[str],
    elapsed: float,
) -> None:
    rows = outcome.rows
    counts = {
        s: sum(r.status == s for r in rows)
        for s in (D.TRIAL_FINISHED, D.TRIAL_PRUNED, D.TRIAL_FAILED, D.TRIAL_RUNNING, D.TRIAL_PENDING)
    }
    lines = [
        "",
        f"=== sweep {name} ({dataset}) {'interrupted' if outcome.interrupted else 'done'} in "
        f"{elapsed:.0f} s: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
    ]
    lines.append(f"  {'trial':<10} {'status':<9} {'epochs':>6} {'best val_mse':>13}  params")
    for r in sorted(rows, key=lambda r: (r.best_val_mse is None, r.best_val_mse or 0)):
        mse = f"{r.best_val_mse:.5g}" if r.best_val_mse is not None else "-"
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(r.params.items()))
        lines.append(f"  {r.trial_id:<10} {r.status:<9} {r.epochs_done:>6} {mse:>13}  {params}")
        if r.error:
            lines.append(f"  {'':<10} error: {r.error.strip().splitlines()[-1][:200]}")
    best = outcome.best
    if best is not None:
        bm = best.best_metrics
        lines.append(
            f"best trial {best.trial_id} (best after epoch {best.best_epoch}): "
            + ", ".join(f"{k} {bm[k]:.5g}" for k in D.REPORTED_METRICS if k in bm)
        )
        lines.append("  config: " + json.dumps(_config_for_tag(best.params), sort_keys=True))
        lines.append(f"  MLflow run: {best.mlflow_run_id}")
    if outcome.registration is not None:
        reg = outcome.registration
        if reg.alias == tags.CHAMPION:
            lines.append(f"registered: {reg.name} version {reg.version} is the champion ({reg.reason})")
        else:
            lines.append(
                f"registered: {reg.name} version {reg.version} is a CHALLENGER: {reg.reason}; "
                f"the champion stays version {reg.previous_champion}"
            )
        lines.append(f"  predict: {predict_command(f'models:/{reg.name}@{reg.alias}', tracker.tracking_uri)}")
    elif outcome.registration_note:
        lines.append(outcome.registration_note)
    for plot, where in outcome.plots.items():
        if where.startswith("skipped"):
            lines.append(f"  plot {plot}: {where}")
    if orphans:
        lines.append(f"  closed {len(orphans)} trial run(s) left RUNNING by an earlier driver: {orphans}")
    lines.append(look_line(tracker, parent_id))
    print("\n".join(lines), flush=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
