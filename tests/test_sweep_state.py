"""Where a sweep keeps its state and when that state and the MLflow store agree (vmrnn.tune.state), the
commands the sweep prints (vmrnn.commands), and the progress table's start-up phases; without Ray.

The same rules end to end, with real Ray and MLflow: tests/test_sweep_e2e.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmrnn import commands
from vmrnn.tracking import tags
from vmrnn.tune import defaults as D
from vmrnn.tune import progress
from vmrnn.tune.args import SweepError, SweepPlace
from vmrnn.tune.progress import ProgressTable
from vmrnn.tune.state import check_agreement, finished_sweep, read_binding, write_binding


# ------------------------------------------------------------------------------------------ storage
def test_default_tune_state_lives_beside_a_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("VMRNN_STORAGE_PATH", raising=False)
    assert D.default_storage_path(f"sqlite:///{tmp_path}/mlflow.db") == str(tmp_path / "ray_results")
    assert D.default_storage_path((tmp_path / "store" / "mlruns").as_uri()) == str(tmp_path / "store" / "ray_results")
    assert D.default_storage_path("http://127.0.0.1:5000") == os.path.expanduser("~/ray_results")
    monkeypatch.setenv("VMRNN_STORAGE_PATH", "s3://bucket/sweeps")
    assert D.default_storage_path(f"sqlite:///{tmp_path}/mlflow.db") == "s3://bucket/sweeps"


# ------------------------------------------------------------------------------------------ agreement
def _place(tmp_path: Path, uri: str = "") -> SweepPlace:
    storage = tmp_path / "ray_results"
    return SweepPlace(
        name="s",
        storage_path=str(storage),
        exp_path=str(storage / "s"),
        tracking_uri=uri or f"sqlite:///{tmp_path}/mlflow.db",
        experiment="vmrnn-taxibj",
    )


def _parent(run_id: str = "r1", status: str = "RUNNING", sweep_status: str = "RUNNING", **more) -> SimpleNamespace:
    run_tags = {tags.TAG_SWEEP: "s", tags.TAG_SWEEP_STATUS: sweep_status, **more.pop("tags", {})}
    return SimpleNamespace(
        info=SimpleNamespace(run_id=run_id, status=status),
        data=SimpleNamespace(tags=run_tags, metrics=more.pop("metrics", {}), params=more.pop("params", {})),
    )


def test_tune_state_resumes_only_with_the_parent_run_it_reported_to(tmp_path):
    place = _place(tmp_path)
    assert read_binding(place.exp_path) is None
    write_binding(place, "r1", explicit_loggers=True)
    binding = read_binding(place.exp_path)
    assert binding["parent_run_id"] == "r1" and binding["tracking_uri"] == place.tracking_uri

    assert check_agreement(place, _parent("r1"), True, binding) is True  # resume
    assert check_agreement(place, None, False, None) is False  # a new sweep
    assert check_agreement(place, _parent("r1"), True, None) is True  # state of an older vmrnn: resume

    # This store lost the sweep (mlflow.db deleted): say which folder to delete, or --name.
    with pytest.raises(SweepError) as err:
        check_agreement(place, None, True, binding)
    assert f"rm -r {shlex.quote(place.exp_path)} to start the sweep afresh" in str(err.value)
    assert "--name NEW" in str(err.value) and "\n" not in str(err.value)
    # ... or has another sweep of that name (a new parent run).
    with pytest.raises(SweepError, match="belongs to parent run r1 .* is parent run r2"):
        check_agreement(place, _parent("r2"), True, binding)

    # The state reported to another store (a second checkout pointed at the first one's state).
    other = _place(tmp_path, f"sqlite:///{tmp_path}/other/mlflow.db")
    with pytest.raises(SweepError, match=f"pass --tracking-uri sqlite:///{tmp_path}/mlflow.db to resume it"):
        check_agreement(other, None, True, binding)


def test_a_store_whose_sweep_keeps_its_state_elsewhere_names_the_storage_path(tmp_path):
    from ray import tune

    elsewhere = tmp_path / "home" / "ray_results" / "s"
    place = _place(tmp_path)
    parent = _parent("r1", tags={tags.TAG_TUNE_PATH: str(elsewhere)})
    assert not tune.Tuner.can_restore(str(elsewhere))
    assert check_agreement(place, parent, False, None) is False  # no state anywhere: trials start afresh
    elsewhere.mkdir(parents=True)
    (elsewhere / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    with pytest.raises(SweepError, match=f"pass --storage-path {tmp_path / 'home' / 'ray_results'} to resume it"):
        check_agreement(place, parent, False, None)


def test_a_finished_sweep_is_told_from_its_parent_run():
    assert finished_sweep(None) is None
    assert finished_sweep(_parent(status="RUNNING", sweep_status="RUNNING")) is None
    assert finished_sweep(_parent(status="KILLED", sweep_status="INTERRUPTED")) is None
    done = finished_sweep(
        _parent(
            status="FINISHED",
            sweep_status="FINISHED",
            metrics={"trials_finished": 2.0, "trials_pruned": 1.0, "trials_failed": 0.0},
            tags={tags.TAG_REGISTERED: "vmrnn-taxibj/7@champion"},
        )
    )
    assert done.message() == "sweep s already finished (3 trials, champion v7); use --name to start another"
    done = finished_sweep(_parent(status="FINISHED", sweep_status="FINISHED", params={"sweep.num_samples": "4"}))
    assert done.message() == "sweep s already finished (4 trials, nothing registered); use --name to start another"


# ------------------------------------------------------------------------------------------ commands
def _venv(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "proj" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("python", "mlflow", "vmrnn"):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_printed_commands_run_from_the_users_shell(tmp_path):
    bin_dir = _venv(tmp_path)
    py, proj = str(bin_dir / "python"), str(tmp_path / "proj")
    # The venv never activated: its scripts by path, relative to the working directory inside it.
    assert commands.tool("mlflow", "mlflow", executable=py, search_path="/usr/bin:/bin", cwd=proj) == ".venv/bin/mlflow"
    assert commands.tool("mlflow", "mlflow", executable=py, search_path="/usr/bin", cwd=str(tmp_path / "else")) == str(
        bin_dir / "mlflow"
    )
    # Activated (its bin folder on PATH): bare names.
    assert commands.tool("vmrnn", "vmrnn", executable=py, search_path=f"{bin_dir}:/usr/bin", cwd=proj) == "vmrnn"
    assert commands.python(executable=py, search_path=f"{bin_dir}:/usr/bin", cwd=proj) == "python"
    # No console script in the environment (a checkout run without `pip install -e .`): `python -m`.
    (bin_dir / "vmrnn").unlink()
    assert (
        commands.tool("vmrnn", "vmrnn", executable=py, search_path="/usr/bin", cwd=proj) == ".venv/bin/python -m vmrnn"
    )


def test_this_environments_mlflow_runs_as_printed_without_the_venv_on_path(tmp_path):
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    line = commands.tool("mlflow", "mlflow", search_path=path, cwd=str(tmp_path))
    assert line == f"{venv_bin}/mlflow"
    ran = subprocess.run(
        ["bash", "-c", f"{line} --version"],
        env=dict(os.environ, PATH=path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0 and "mlflow" in ran.stdout.lower(), ran.stderr


# ------------------------------------------------------------------------------------------ progress table
def _trial(trial_id: str, status: str = "PENDING", last_result: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, status=status, last_result=last_result or {}, metric_analysis={})


def test_the_table_says_what_a_starting_trial_is_doing(monkeypatch):
    table = ProgressTable(epochs=2, num_samples=2, sweep="s")
    a, b = _trial("a"), _trial("b")
    table.on_trial_start(0, [a, b], a)  # Tune calls this before it marks the trial RUNNING
    lines = table.render([a, b]).splitlines()
    assert lines[2].split()[:2] == ["a", "RUNNING"] and lines[2].endswith("starting")
    assert lines[3].split()[:2] == ["b", "PENDING"] and not lines[3].endswith("starting")

    monkeypatch.setattr(progress, "phases", lambda sweep: {"a": ("starting 2 workers", 0.0)})
    table._last_print = table._last_poll = 0.0
    printed = []
    monkeypatch.setattr(table, "_print", lambda trials, force=False: printed.append(table.render(trials)))
    a.status = "RUNNING"
    table.on_step_end(1, [a, b])
    assert printed and "starting 2 workers" in printed[-1].splitlines()[2]
    # Once it reports, the table shows its epoch instead.
    a.last_result = {"epoch": 0, "val_mse": 0.5}
    assert "starting" not in table.render([a, b]).splitlines()[2]
