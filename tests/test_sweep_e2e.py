from vmrnn.tracking import tags
"""The README's main command, end to end on CPU with real components only.

- test_smoke_sweep_on_embedded_defaults: `python sweeps/taxibj.py --smoke` in an empty folder: local Ray
  started by the script, MLflow's default ./mlflow.db, the real training layer and registry; running it
  again finds the finished sweep and changes nothing.

A sweep submitted with `ray job submit` to a `ray start` head and a real `mlflow server`, whose driver is
killed and which is then resumed, registered and used by `vmrnn predict`, is
tests/test_reliability_sweep.py::test_sweep_survives_a_killed_worker_a_killed_driver_and_a_diverging_trial.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

def check_sweep_in_mlflow(uri: str, sweep: str, n_trials: int) -> dict:
    """The MLflow layout of a finished sweep; returns what later checks need."""
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from vmrnn.tune import defaults as D

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("vmrnn-taxibj")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`vmrnn.sweep` = '{sweep}' and "
                                                                   "tags.`vmrnn.role` = 'sweep'")
    assert len(parents) == 1, "one parent run per sweep, reused on resume"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[tags.TAG_SWEEP_STATUS] == "FINISHED"
    assert parent.data.params["sweep.smoke"] == "true" and parent.data.params["space.lr"].startswith("loguniform")
    assert parent.data.metrics["best_val_mse"] > 0
    arts = {a.path for d in ("plots", "results") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"plots/optimization_history.png", "plots/param_importances.png", "results/trials.parquet",
            "results/best.json"} <= arts, arts
    png = client.download_artifacts(parent.info.run_id, "plots/optimization_history.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(client.download_artifacts(parent.info.run_id, "results/trials.parquet")).to_pylist()
    assert len(table) == n_trials and len({r["trial_id"] for r in table}) == n_trials
    assert {r["status"] for r in table} <= {D.TRIAL_FINISHED, D.TRIAL_PRUNED}
    assert any(r["status"] == D.TRIAL_FINISHED for r in table)

    children = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    keys = [c.data.tags[tags.TAG_RUN_KEY] for c in children]
    assert len(children) == n_trials and len(set(keys)) == n_trials, "one child run per trial, no duplicates"
    assert set(keys) == {f"{sweep}/{r['trial_id']}" for r in table}
    by_trial = {r["trial_id"]: r for r in table}
    for child in children:
        row = by_trial[child.data.tags[tags.TAG_TRIAL_ID]]
        assert child.data.tags[tags.TAG_TRIAL_STATUS] == row["status"]
        assert child.info.status == D.MLFLOW_STATUS[row["status"]]  # FINISHED / KILLED (pruned)
        assert {"val_mse", "val_mae", "val_ssim", "val_psnr", "train_loss"} <= set(child.data.metrics)
        assert child.data.metrics["val_mse"] > 0
    best_run_id = parent.data.tags[tags.TAG_BEST_RUN_ID]
    return {"client": client, "parent": parent, "best_run_id": best_run_id, "table": table}


def check_champion(client, best_run_id: str, sweep: str) -> None:
    from vmrnn.tune import defaults as D

    name = D.registered_model_name("taxibj")
    champion = client.get_model_version_by_alias(name, tags.CHAMPION)
    assert champion.run_id == best_run_id
    assert champion.tags[tags.TAG_SWEEP] == sweep and float(champion.tags["val_mse"]) > 0
    assert champion.tags[tags.TAG_EVAL_DATA] == "synthetic" and json.loads(champion.tags["config"])["preset"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len([v for v in versions if v.run_id == best_run_id]) == 1, "the run is registered once"


@pytest.mark.timeout(600)
def test_smoke_sweep_on_embedded_defaults(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", VMRNN_STORAGE_PATH=str(tmp_path / "ray_results"),
               VMRNN_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the script sets it for its local Ray
    cmd = [sys.executable, str(REPO / "sweeps" / "taxibj.py"), "--smoke"]
    t0 = time.monotonic()
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    elapsed = time.monotonic() - t0
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    out = first.stdout
    assert "sweep taxibj-smoke" in out and "trial" in out and "best so far" in out  # the live table
    assert "registered: vmrnn-taxibj version 1 is the champion" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}" in out
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "mlruns").is_dir()
    assert elapsed < 300, f"--smoke took {elapsed:.0f} s"

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    got = check_sweep_in_mlflow(uri, "taxibj-smoke", n_trials=3)
    check_champion(got["client"], got["best_run_id"], "taxibj-smoke")
    n_runs = len(got["client"].search_runs([got["parent"].info.experiment_id]))

    # The same command again: the finished sweep is found (Tuner.restore), nothing runs, nothing is added.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "(resuming)" in again.stdout and "already the champion" in again.stdout
    got2 = check_sweep_in_mlflow(uri, "taxibj-smoke", n_trials=3)
    assert len(got2["client"].search_runs([got["parent"].info.experiment_id])) == n_runs
    assert got2["best_run_id"] == got["best_run_id"]
    assert len(got2["client"].search_model_versions("name = 'vmrnn-taxibj'")) == 1
