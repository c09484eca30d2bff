"""Whether a sweep's Tune state and its MLflow store agree, before anything runs.

Tune's experiment folder (<storage>/<name>) is bound to the sweep's parent run: a small file in it,
`vmrnn-sweep.json`, names the tracking store and the parent run the state reported to. A sweep resumes
Tune state only when that is the parent run it finds in its own store; any other combination (state
that reported elsewhere, state whose store is gone, a store whose sweep keeps its state somewhere else)
is one SweepError that says what to do. A finished sweep is recognised from its parent run alone.
"""

from __future__ import annotations

import json
import posixpath
import shlex
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from ray import tune

from vmrnn.tracking import tags
from vmrnn.tracking.uris import strip_credentials
from vmrnn.tune.args import SweepError, SweepPlace

BINDING_FILE = "vmrnn-sweep.json"


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), path


def read_binding(exp_path: str) -> dict[str, str] | None:
    """What `write_binding` wrote in this Tune experiment folder (None: no such file, or unreadable)."""
    fs, path = _fs(exp_path)
    try:
        with fs.open_input_stream(posixpath.join(path, BINDING_FILE)) as f:
            data = json.loads(f.read().decode())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_binding(place: SweepPlace, parent_run_id: str, *, explicit_loggers: bool) -> None:
    """Bind the Tune experiment folder to the parent run (and store) it reports to."""
    fs, path = _fs(place.exp_path)
    fs.create_dir(path, recursive=True)
    body = {
        "sweep": place.name,
        "tracking_uri": strip_credentials(place.tracking_uri),
        "experiment": place.experiment,
        "parent_run_id": parent_run_id,
        "explicit_loggers": explicit_loggers,
    }
    with fs.open_output_stream(posixpath.join(path, BINDING_FILE)) as f:
        f.write(json.dumps(body, indent=1).encode())


def can_restore(exp_path: str) -> bool:
    return tune.Tuner.can_restore(exp_path)


def _restorable_elsewhere(path: str) -> bool:
    """Tune state at a place only the parent run's tag names (a cloud URI may be out of reach here)."""
    try:
        return can_restore(path)
    except Exception:
        return False


def explicit_loggers(binding: dict[str, Any] | None, restore: bool) -> bool:
    """Whether the Tuner carries its own CSV and JSON result loggers (and Tune must add none, so no
    TensorBoard logger either): every new Tuner does; a restored one keeps the callbacks it was saved
    with, so only when its folder says it was built that way."""
    return not restore or bool((binding or {}).get("explicit_loggers"))


# ------------------------------------------------------------------------------------ finished sweeps
@dataclass(frozen=True)
class FinishedSweep:
    name: str
    parent_run_id: str
    trials: int
    registered: str  # "champion v3", "challenger v4" or "nothing registered"

    def message(self) -> str:
        done = f"{self.trials} trials, {self.registered}"
        return f"sweep {self.name} already finished ({done}); use --name to start another"


def finished_sweep(parent: Any) -> FinishedSweep | None:
    """The parent run's account of a sweep that ended normally (None while it has not)."""
    if parent is None or parent.info.status != "FINISHED" or parent.data.tags.get(tags.TAG_SWEEP_STATUS) != "FINISHED":
        return None
    metrics, params = parent.data.metrics, parent.data.params
    counted = [metrics[k] for k in ("trials_finished", "trials_pruned", "trials_failed") if k in metrics]
    if counted:
        trials = int(sum(counted))
    else:
        try:
            trials = int(json.loads(params.get("sweep.num_samples", "0")))
        except ValueError:
            trials = 0
    registered = "nothing registered"
    name_version, _, alias = parent.data.tags.get(tags.TAG_REGISTERED, "").partition("@")
    if alias:
        registered = f"{alias} v{name_version.rpartition('/')[2]}"
    return FinishedSweep(parent.data.tags.get(tags.TAG_SWEEP, ""), parent.info.run_id, trials, registered)


def failed_trials(parent: Any) -> int:
    return int(parent.data.metrics.get("trials_failed", 0)) if parent is not None else 0


# ------------------------------------------------------------------------------------- agreement
def _delete_hint(path: str) -> str:
    return f"delete {path}" if "://" in path else f"rm -r {shlex.quote(path)}"


def check_agreement(place: SweepPlace, parent: Any, restorable: bool, binding: dict[str, str] | None) -> bool:
    """Whether to restore Tune's state at place.exp_path (True) or start the Tuner afresh (False), given
    the parent run found in this store (or None); a disagreement is a SweepError naming the fix."""
    uri = strip_credentials(place.tracking_uri)
    name, exp_path = place.name, place.exp_path
    parent_id = parent.info.run_id if parent is not None else None
    if restorable:
        bound_uri, bound_run = (binding or {}).get("tracking_uri"), (binding or {}).get("parent_run_id")
        if parent_id is not None and (bound_run is None or bound_run == parent_id):
            return True  # the state of this store's sweep (a state without the file: written by an older vmrnn)
        if bound_uri and bound_uri != uri:
            raise SweepError(
                f"the Tune state of sweep {name!r} at {exp_path} reported to MLflow {bound_uri} (parent run "
                f"{bound_run}), not to {uri}: pass --tracking-uri {shlex.quote(bound_uri)} to resume it, or "
                "--name NEW to start another sweep"
            )
        what = f"parent run {bound_run}" if bound_run else "a parent run"
        raise SweepError(
            f"the Tune state of sweep {name!r} at {exp_path} belongs to {what} that MLflow {uri} does not "
            f"have{' (its sweep ' + repr(name) + ' is parent run ' + parent_id + ')' if parent_id else ''}: "
            f"{_delete_hint(exp_path)} to start the sweep afresh, or pass --name NEW to start another"
        )
    if parent is not None:
        recorded = parent.data.tags.get(tags.TAG_TUNE_PATH)
        if recorded and recorded.rstrip("/") != exp_path.rstrip("/") and _restorable_elsewhere(recorded):
            storage = recorded.rstrip("/").rpartition("/")[0]
            raise SweepError(
                f"sweep {name!r} (parent run {parent_id}) keeps its Tune state at {recorded}, not at "
                f"{exp_path}: pass --storage-path {shlex.quote(storage)} to resume it"
            )
    return False
