"""What a sweep prints while it runs (a compact live table) and what Tune callbacks tell MLflow."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from ray.tune import Callback

from vmrnn.tracking.sweeps import SweepTracker
from vmrnn.train.phases import phases
from vmrnn.tune import defaults as D
from vmrnn.tune.results import status_of_trial, trial_status
from vmrnn.tune.scheduler import epochs_done
from vmrnn.tune.values import finite_float

log = logging.getLogger(__name__)


# The sweep the driver is running now. Tune pickles callbacks with the experiment, so a restored sweep
# gets the callbacks as they were first built; they re-read these at setup (e.g. a new tracking URI).
_CURRENT: dict[str, Any] = {}


def bind_sweep(**values: Any) -> None:
    _CURRENT.clear()
    _CURRENT.update(values)


def trial_best(trial) -> float | None:
    analysis = getattr(trial, "metric_analysis", None) or {}
    return finite_float((analysis.get(D.METRIC) or {}).get("min"))


def _fmt(value: float | None, width: int = 10) -> str:
    return f"{value:>{width}.5g}" if value is not None else f"{'-':>{width}}"


class ProgressTable(Callback):
    """A compact table of the trials (trial, status, epoch, val MSE, best so far, and what a trial without a
    result yet is doing: "starting 2 workers (12 s)"), printed when a trial starts or ends, at most every
    `interval_s` seconds on new results, and while a trial starts: at most every `phase_interval_s` when it
    moves on to its next phase (vmrnn.train.phases), else every 3 x `phase_interval_s`."""

    def __init__(
        self,
        epochs: int,
        num_samples: int,
        interval_s: float = 10.0,
        stream=None,
        sweep: str = "",
        phase_interval_s: float = 5.0,
    ):
        self.epochs = epochs
        self.num_samples = num_samples
        self.interval_s = interval_s
        self.phase_interval_s = phase_interval_s
        self.sweep = sweep
        self._stream = stream
        self._last_print = 0.0
        self._last_poll = 0.0
        self._started: set[str] = set()  # trials whose actor started (Tune tells before it marks them RUNNING)
        self._phases: dict[str, tuple[str, float]] = {}
        self._shown_phases: dict[str, str] = {}

    def __getstate__(self):  # sys.stdout is not picklable (Tune saves callbacks with the experiment)
        state = dict(self.__dict__)
        state["_stream"] = None
        return state

    def setup(self, **info):
        self.epochs = int(_CURRENT.get("epochs", self.epochs))
        self.num_samples = int(_CURRENT.get("num_samples", self.num_samples))
        self.sweep = str(_CURRENT.get("sweep", getattr(self, "sweep", "")))
        for name, default in (("_started", set()), ("_phases", {}), ("_shown_phases", {})):
            setattr(self, name, type(default)())  # also on a table restored from an older sweep
        self.phase_interval_s = getattr(self, "phase_interval_s", 5.0)
        self._last_poll = 0.0

    def _status(self, t) -> str:
        status = status_of_trial(t, self.epochs)
        return D.TRIAL_RUNNING if status == D.TRIAL_PENDING and t.trial_id in self._started else status

    def _phase(self, t, status: str) -> str:
        """What a running trial without a result yet is doing, and for how long."""
        if status != D.TRIAL_RUNNING or epochs_done(t.last_result or {}):
            return ""
        phase, since = self._phases.get(t.trial_id, ("starting", 0.0))
        return f"  {phase} ({max(0.0, time.time() - since):.0f} s)" if since else f"  {phase}"

    def render(self, trials: list) -> str:
        rows = []
        best_all: tuple[float, str] | None = None
        counts: dict[str, int] = {}
        for t in trials:
            status = self._status(t)
            counts[status] = counts.get(status, 0) + 1
            last = t.last_result or {}
            epoch = epochs_done(last)
            best = trial_best(t)
            if best is not None and (best_all is None or best < best_all[0]):
                best_all = (best, t.trial_id)
            rows.append(
                f"  {t.trial_id:<10} {status:<9} {(f'{int(epoch)}/{self.epochs}' if epoch else '-'):>7} "
                f"{_fmt(finite_float(last.get(D.METRIC)))} {_fmt(best)}{self._phase(t, status)}"
            )
        head = f"[sweep {time.strftime('%H:%M:%S')}] {len(trials)}/{self.num_samples} trials: " + ", ".join(
            f"{n} {s.lower()}" for s, n in sorted(counts.items())
        )
        lines = [head, f"  {'trial':<10} {'status':<9} {'epoch':>7} {'val_mse':>10} {'best':>10}", *rows]
        if best_all is not None:
            lines.append(f"  best so far: val_mse {best_all[0]:.5g} (trial {best_all[1]})")
        return "\n".join(lines)

    def _print(self, trials: list, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_print < self.interval_s:
            return
        self._last_print = now
        stream = self._stream or sys.stdout
        print(self.render(trials), file=stream, flush=True)

    def _poll_phases(self, trials: list) -> dict[str, str]:
        """The starting trials' phases, read at most every 2 s ({} between reads)."""
        now = time.monotonic()
        if not self.sweep or now - self._last_poll < 2.0:
            return {}
        self._last_poll = now
        starting = [t for t in trials if self._status(t) == D.TRIAL_RUNNING and not epochs_done(t.last_result or {})]
        if not starting:
            return {}
        self._phases = phases(self.sweep)
        return {t.trial_id: self._phases.get(t.trial_id, ("starting", 0.0))[0] for t in starting}

    def on_step_end(self, iteration, trials, **info):
        current = self._poll_phases(trials)
        moved = any(self._shown_phases.get(k) != v for k, v in current.items())
        quiet_for = time.monotonic() - self._last_print
        # A new phase (at most every phase_interval_s), or the same one still going (every 3 phase intervals).
        if current and (quiet_for >= 3 * self.phase_interval_s or (moved and quiet_for >= self.phase_interval_s)):
            self._print(trials, force=True)
            self._shown_phases.update(current)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.add(trial.trial_id)
        self._print(trials, force=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._print(trials, force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(trials, force=True)

    def on_experiment_end(self, trials, **info):
        self._print(trials, force=True)


def trial_error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    if path:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            pass
    try:
        err = trial.get_error()
    except Exception:
        err = None
    return str(err) if err else "the trial failed (no error message recorded)"


class TrialStatusToMLflow(Callback):
    """Give each trial's MLflow run its final status as soon as Tune decides it: FINISHED (also a trial
    pruned by ASHA, tagged vmrnn.trial_status=PRUNED) or FAILED (with the error). The end of the sweep
    does it again for every trial, so a failure here is only logged."""

    def __init__(self, tracking_uri: str, experiment: str, sweep: str, parent_run_id: str, epochs: int):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.sweep = sweep
        self.parent_run_id = parent_run_id
        self.epochs = epochs
        self._tracker = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tracker"] = None
        return state

    def setup(self, **info):
        for key in ("tracking_uri", "experiment", "sweep", "parent_run_id", "epochs"):
            if key in _CURRENT:
                setattr(self, key, _CURRENT[key])
        self._tracker = None

    def _mark(self, trial, status: str, error: str | None = None) -> None:
        try:
            if self._tracker is None:
                self._tracker = SweepTracker(self.tracking_uri, self.experiment)
            self._tracker.mark_trial(
                sweep=self.sweep,
                trial_id=trial.trial_id,
                status=status,
                parent_run_id=self.parent_run_id,
                error=error,
                params=dict(trial.config or {}),
            )
        except Exception as exc:  # never let bookkeeping stop the sweep
            log.warning("could not record trial %s as %s in MLflow: %s", trial.trial_id, status, exc)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._mark(trial, trial_status(trial.last_result, self.epochs, ended=True))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._mark(trial, trial_status(trial.last_result, self.epochs, failed=True), trial_error_text(trial))
