"""The README's first training run, exactly as written (its `vmrnn data synth` and `vmrnn train` lines, read
from README.md), in an empty folder: real Ray Train with 2 workers at the recipe's batch size, MLflow's
default ./mlflow.db. Then what a user sees of it: epochs counted from 1 everywhere (console, MLflow, the
checkpoint's metrics.json), the experiment marked as model training, a lean logged model, and no
temporary folders left behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from procs import BIN, kill_processes_mentioning
from vmrnn.tracking.uris import pinned_tracking_uri

pytestmark = pytest.mark.slow

FIRST_RUN = "# A first run on synthetic data"


def readme_first_run() -> list[str]:
    """The command lines under the README's first-run comment, up to the blank line that ends them."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(FIRST_RUN))
    commands = []
    for line in lines[start + 1 :]:
        if not line.strip() or line.startswith("```"):
            break
        commands.append(line.strip())
    return commands


def as_run_here(command: str) -> str:
    """The README calls the set-up venv's programs by path (.venv/bin/...); here that venv is this one."""
    return command.replace(".venv/bin/", f"{BIN}/")


def test_readme_lists_the_first_run():
    commands = readme_first_run()
    assert [c.split()[:3] for c in commands] == [
        [".venv/bin/vmrnn", "data", "synth"],
        [".venv/bin/vmrnn", "train", "--dataset"],
    ]
    assert "--workers 2" in commands[1]


@pytest.mark.timeout(600)
def test_readme_first_run_as_written(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    tmp = Path(f"/tmp/vmrnn-readme-{secrets.token_hex(4)}")  # short: Ray's unix socket paths live below it
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(
        HOME=str(home),
        TMPDIR=str(tmp),
        PYTHONPATH=str(REPO),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    outputs = []
    try:
        for command in readme_first_run():
            done = subprocess.run(
                ["bash", "-c", as_run_here(command)], cwd=work, env=env, capture_output=True, text=True, timeout=480
            )
            assert done.returncode == 0, f"{command}\n{(done.stdout + done.stderr)[-4000:]}"
            outputs.append(done.stdout + done.stderr)
    finally:
        kill_processes_mentioning(str(tmp))
    leftovers = sorted(p.name for p in tmp.glob("vmrnn-mlflow-*"))
    shutil.rmtree(tmp, ignore_errors=True)
    assert not leftovers, f"temporary folders left behind: {leftovers}"

    # Epochs counted from 1: the console's best epoch is MLflow's best_epoch, its steps are 1 and 2.
    best = int(re.search(r"^best epoch\s+(\d+)", outputs[-1], re.M).group(1))
    assert best in (1, 2)
    assert "epoch 1/2" in outputs[-1] and "epoch 2/2" in outputs[-1]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("vmrnn-taxibj")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["vmrnn.world_size"] == "2"
    # ... and the printed link opens MLflow's UI on that run in its model-training view
    assert f"#/experiments/{exp.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in outputs[-1]
    assert run.data.metrics["best_epoch"] == best and run.data.tags["vmrnn.best_epoch"] == str(best)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_mse")) == [1, 2]
    checkpoint = Path(re.search(r"^checkpoint\s+(\S+)", outputs[-1], re.M).group(1))
    history = json.loads((checkpoint / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["best_epoch"] == best

    # A lean model: one input sample, not a batch, in the logged model.
    model_uri = run.data.tags["vmrnn.model_uri"]
    with pinned_tracking_uri(uri):  # models:/m-... resolve through the process's tracking URI
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    assert mlflow.models.Model.load(local).load_input_example(local).shape == (1, 4, 2, 32, 32)
    sizes = {p.name: p.stat().st_size for p in local.glob("*.json")}
    assert sizes and max(sizes.values()) < 100_000, sizes
