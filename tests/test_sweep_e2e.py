"""The README's main command, end to end on CPU with real components only.

test_smoke_sweep_on_embedded_defaults: `python sweeps/taxibj.py --smoke` in an empty folder, as after the
README's set-up (the session's `smoke_sweep`, conftest.py; the venv never activated: its bin folder is not on
PATH): local Ray started by the script,
MLflow's default ./mlflow.db with the Tune state beside it in ./ray_results, the real training layer and
registry. Then, without starting Ray again:
- the commands the summary prints (`mlflow ui ...`, `vmrnn predict ...`) run as printed from a shell;
- the same command again says the sweep already finished and changes nothing in MLflow;
- Tune state whose MLflow store is gone (a deleted mlflow.db, or a second checkout pointed at the first
  one's state) is refused in one line that says what to do.

A sweep submitted with `ray job submit` to a `ray start` head and a real `mlflow server`, whose driver is
killed and which is then resumed, registered and used by `vmrnn predict`, is
tests/test_reliability_sweep.py::test_sweep_survives_a_killed_worker_a_killed_driver_and_a_diverging_trial.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from procs import free_port, http_ok, stop_group, wait_for
from vmrnn.tracking import tags

pytestmark = pytest.mark.slow
VENV_BIN = str(Path(sys.executable).parent)


def check_sweep_in_mlflow(uri: str, sweep: str, n_trials: int) -> dict:
    """The MLflow layout of a finished sweep; returns what later checks need."""
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from vmrnn.tune import defaults as D

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name("vmrnn-taxibj")
    parents = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`vmrnn.sweep` = '{sweep}' and tags.`vmrnn.role` = 'sweep'"
    )
    assert len(parents) == 1, "one parent run per sweep, reused on resume"
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[tags.TAG_SWEEP_STATUS] == "FINISHED"
    assert parent.data.params["sweep.smoke"] == "true" and parent.data.params["space.lr"].startswith("loguniform")
    assert parent.data.metrics["best_val_mse"] > 0
    arts = {a.path for d in ("plots", "results") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "results/trials.parquet",
        "results/best.json",
    } <= arts, arts
    png = client.download_artifacts(parent.info.run_id, "plots/optimization_history.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(client.download_artifacts(parent.info.run_id, "results/trials.parquet")).to_pylist()
    assert len(table) == n_trials and len({r["trial_id"] for r in table}) == n_trials
    assert {r["status"] for r in table} <= {D.TRIAL_FINISHED, D.TRIAL_PRUNED}
    assert any(r["status"] == D.TRIAL_FINISHED for r in table)

    children = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
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


def _printed(out: str, marker: str) -> str:
    """The command the sweep printed after `marker` on one of its lines."""
    lines = [line.split(marker, 1)[1].strip() for line in out.splitlines() if marker in line]
    assert lines, f"no line with {marker!r} in:\n{out[-3000:]}"
    return lines[-1]


@pytest.mark.timeout(900)
def test_smoke_sweep_on_embedded_defaults(smoke_sweep, tmp_path):
    clone, env, cmd, elapsed = smoke_sweep["clone"], smoke_sweep["env"], smoke_sweep["cmd"], smoke_sweep["seconds"]
    out, err = smoke_sweep["out"], smoke_sweep["err"]
    assert "sweep taxibj-smoke" in out and "trial" in out and "best so far" in out  # the live table
    assert "registered: vmrnn-taxibj version 1 is the champion" in out
    # Quiet: no TensorBoard advice, no MLflow registration chatter, no database set-up notes.
    for noise in (
        "TensorBoard",
        "already exists. Creating a new version",
        "Created version",
        "has no artifacts",
        "Creating initial MLflow database tables",
        "maximum expected startup concurrency",
    ):
        assert noise not in out + err, noise
    # The state lives beside the store it reports to (each checkout its own).
    assert (clone / "mlflow.db").is_file() and (clone / "mlruns").is_dir()
    assert (clone / "ray_results" / "taxibj-smoke").is_dir() and not (Path(env["HOME"]) / "ray_results").exists()
    print(f"smoke sweep: {elapsed:.0f} s")
    assert elapsed < 400, f"--smoke took {elapsed:.0f} s"

    uri = f"sqlite:///{clone / 'mlflow.db'}"
    got = check_sweep_in_mlflow(uri, "taxibj-smoke", n_trials=3)
    check_champion(got["client"], got["best_run_id"], "taxibj-smoke")
    client, parent = got["client"], got["parent"]
    n_runs = len(client.search_runs([parent.info.experiment_id]))

    # The printed commands, run as printed from a shell without the venv on PATH.
    ui, _, link = _printed(out, "look with: ").partition(", then open ")
    assert ui == f"{VENV_BIN}/mlflow ui --backend-store-uri {uri}", ui
    page = f"runs/{parent.info.run_id}?workflowType=machine_learning"  # the parent run, model-training view
    assert link == f"http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}/{page}", link
    port = free_port()
    server = subprocess.Popen(
        ["bash", "-c", ui],
        cwd=clone,
        env=dict(env, MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/health"), 120, what="the printed `mlflow ui`")
        search = f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=vmrnn-taxibj"
        assert http_ok(search)
    finally:
        stop_group(server)
    predict = _printed(out, "predict: ")
    assert predict.startswith(f"{VENV_BIN}/vmrnn predict --model models:/vmrnn-taxibj@champion "), predict
    np.save(clone / "x.npy", np.random.default_rng(0).random((1, 4, 2, 32, 32), dtype=np.float32))
    ran = subprocess.run(["bash", "-c", predict], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert np.load(clone / "y.npy").shape == (1, 4, 2, 32, 32)

    # The same command again: the sweep is finished; nothing runs, nothing is logged again.
    t0 = time.monotonic()
    again = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert again.stdout.splitlines()[0] == (
        "sweep taxibj-smoke already finished (3 trials, champion v1); use --name to start another"
    ), again.stdout
    assert "Started a local Ray" not in again.stdout + again.stderr and time.monotonic() - t0 < 120
    after = client.get_run(parent.info.run_id)
    assert after.info.end_time == parent.info.end_time and after.info.status == "FINISHED"
    assert len(client.get_metric_history(parent.info.run_id, "best_val_mse")) == 1
    assert len(client.search_runs([parent.info.experiment_id])) == n_runs
    assert len(client.search_model_versions("name = 'vmrnn-taxibj'")) == 1

    # A second checkout pointed at this one's Tune state, with its own (empty) store: one line, what to do.
    other = tmp_path / "other"
    other.mkdir()
    state = clone / "ray_results"
    shared = subprocess.run(
        [*cmd, "--storage-path", str(state)], cwd=other, env=env, capture_output=True, text=True, timeout=300
    )
    assert shared.returncode == 2, shared.stdout + shared.stderr
    error = shared.stderr.strip().splitlines()
    assert len(error) == 1 and f"pass --tracking-uri {uri} to resume it" in error[0], shared.stderr
    assert not (other / "ray_results").exists()

    # The store deleted to start over, its Tune state left behind: one line naming the folder to remove.
    # (The store is moved aside and put back afterwards: other tests read this session's sweep.)
    shutil.move(clone / "mlflow.db", tmp_path / "mlflow.db")
    shutil.move(clone / "mlruns", tmp_path / "mlruns")
    try:
        orphan = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.move(tmp_path / "mlflow.db", clone / "mlflow.db")
        shutil.move(tmp_path / "mlruns", clone / "mlruns")
    assert orphan.returncode == 2, orphan.stdout + orphan.stderr
    error = orphan.stderr.strip().splitlines()
    remove = f"rm -r {shlex.quote(str(state / 'taxibj-smoke'))} to start the sweep afresh"
    assert len(error) == 1 and remove in error[0], orphan.stderr
