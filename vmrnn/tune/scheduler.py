"""ASHA on the training layer's epoch counter, with two adjustments for trials that are Ray Train runs.

- The training layer reports `epoch` 0-based; ASHA counts completed epochs (1-based), so grace_period 1
  means "after the first epoch" and max_t is the number of epochs.
- A trial is never stopped on its final epoch's result: it is ending anyway, and stopping it would kill
  its workers while rank 0 logs the best model to MLflow and closes the run. A trial at its final epoch
  still counts at the rung (its value is recorded), it just finishes normally.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from vmrnn.tune import defaults as D


def epochs_done(result: dict[str, Any] | None) -> int | None:
    """Completed epochs from a reported result (the training layer's `epoch` is 0-based)."""
    if not result or result.get(D.TIME_ATTR) is None:
        return None
    try:
        return int(result[D.TIME_ATTR]) + 1
    except (TypeError, ValueError):
        return None


class EpochASHA(ASHAScheduler):
    def __init__(
        self, *, epochs: int, grace_period: int, reduction_factor: float, metric: str = D.METRIC, mode: str = D.MODE
    ):
        super().__init__(
            time_attr=D.TIME_ATTR,
            metric=metric,
            mode=mode,
            max_t=epochs,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
        self.epochs = epochs

    @staticmethod
    def _shift(result: dict[str, Any]) -> dict[str, Any]:
        done = epochs_done(result)
        return result if done is None else {**result, D.TIME_ATTR: done}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get("diverged"):  # NaN metrics: not a rung value; the trial fails by itself (FAILED)
            return TrialScheduler.CONTINUE
        result = self._shift(result)
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(D.TIME_ATTR, 0) >= self.epochs:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE  # the final epoch: let it log its model and finish
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        if trial.trial_id not in self._trial_info:  # e.g. restored after the scheduler saw it complete
            return
        super().on_trial_complete(tune_controller, trial, self._shift(result))

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._trial_info.pop(trial.trial_id, None)
