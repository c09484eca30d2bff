"""Optuna's plots of a sweep, drawn from its trials and logged on the parent run: an Optuna study is rebuilt
from the trials as the TPE searcher saw them (`study_from_rows`), then plotted with Optuna's matplotlib backend.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import TYPE_CHECKING, Any

from vmrnn.tune import defaults as D
from vmrnn.tune.values import finite_float

if TYPE_CHECKING:
    from vmrnn.tracking.sweeps import TrialRow

log = logging.getLogger(__name__)
# Optuna, matplotlib and Ray are imported by the functions that draw: importing this module stays cheap.


def log_optuna_plots(client: Any, run_id: str, rows: list[TrialRow], space: dict[str, Any]) -> dict[str, str]:
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
        plots = {
            "optimization_history": lambda: ovm.plot_optimization_history(study),
            "param_importances": lambda: ovm.plot_param_importances(study),
        }
        for name, make in plots.items():
            if not complete:
                out[name] = "skipped: no completed trial"
                continue
            if name == "param_importances":
                varying = [k for k in space if len({repr(t.params.get(k)) for t in complete}) > 1]
                if len(complete) < 2 or not varying:
                    out[name] = (
                        "skipped: parameter importance needs at least 2 completed trials "
                        f"with different parameters (have {len(complete)})"
                    )
                    continue
            try:
                ax = make()
                fig = ax.figure if hasattr(ax, "figure") else ax[0].figure
                fig.set_size_inches(8, 5)
                fig.tight_layout()
                client.log_figure(run_id, fig, f"plots/{name}.png")
                plt.close(fig)
                out[name] = f"plots/{name}.png"
            except Exception as exc:  # e.g. importance on degenerate data
                out[name] = f"skipped: {type(exc).__name__}: {exc}"
    skipped = {k: v for k, v in out.items() if v.startswith("skipped")}
    if skipped:
        client.log_text(run_id, json.dumps(skipped, indent=2), "plots/skipped.json")
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
            study.add_trial(
                optuna.trial.create_trial(
                    state=state,
                    value=last if state == optuna.trial.TrialState.COMPLETE else None,
                    params=params,
                    distributions={k: distributions[k] for k in params},
                    intermediate_values={int(e): float(v) for e, v in row.history if finite_float(v) is not None},
                    user_attrs={"trial_id": row.trial_id, "status": row.status},
                )
            )
        except ValueError as exc:  # a value outside its distribution: leave the trial out of the plots
            log.warning("trial %s left out of the Optuna plots: %s", row.trial_id, exc)
    return study
