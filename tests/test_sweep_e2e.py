"""End-to-end sweeps on CPU with real components only: a real Ray head + `ray job submit`, a real MLflow
server, the real training layer, the real registry and `vmrnn predict`.

- test_job_submit_sweep_resumes_registers_and_predicts: `ray start --head` (dashboard on, token auth) and
  `mlflow server` (lean, SQLite) on 127.0.0.1; `ray job submit --working-dir <copy> -- python
  sweeps/taxibj.py --smoke ...`; the job is stopped (its driver dies) once a trial has finished, then the
  same command is submitted again and must resume: finished trials are not re-run, no MLflow run is
  duplicated, statuses are honest, the parent run has its plots and results table, the best model is
  registered with alias champion, and `vmrnn predict --model models:/vmrnn-taxibj@champion` works.
- test_smoke_sweep_on_embedded_defaults: the README's main command (`python sweeps/taxibj.py --smoke`) in
  an empty folder: local Ray started by the script, MLflow's default ./mlflow.db; running it again finds
  the finished sweep and changes nothing.

Servers are torn down by process group (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                       + (f" (last error: {last_exc})" if last_exc else ""))


def http_ok(url: str, timeout: float = 3.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return resp.status == 200


def stop_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group we started (start_new_session=True), then SIGKILL what is left."""
    if proc is None or proc.poll() is not None and not _group_alive(proc.pid):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        if not _group_alive(proc.pid):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_processes_mentioning(marker: str) -> list[int]:
    """SIGKILL leftover processes whose command line names `marker` (a temp dir unique to one test), i.e.
    processes this test started that left its process group (Ray workers)."""
    killed = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """A lean MLflow tracking server (1 worker, no job execution) with a SQLite store, serving artifacts."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(root / "mlflow-server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--workers", "1", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "mlartifacts")],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is None and http_ok(f"http://127.0.0.1:{port}/health"), 90,
                 what="mlflow server /health")
    except Exception:
        stop_group(proc)
        raise RuntimeError("mlflow server did not start:\n" + (root / "mlflow-server.log").read_text()[-3000:])
    return proc


def start_ray_head(root: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, Path]:
    """`ray start --head --block` (its own process group) with the dashboard and job server on 127.0.0.1."""
    gcs_port, dash_port = free_port(), free_port()
    temp_dir = Path(f"/tmp/vmrnn-rt-{secrets.token_hex(4)}")  # short: Ray's unix socket paths
    log = open(root / "ray-head.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
         "--port", str(gcs_port), "--dashboard-port", str(dash_port), "--include-dashboard", "true",
         "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir), "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, dash_port, temp_dir


def ray_job(env: dict[str, str], address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    sub, *rest = args  # `--address` before any `-- entrypoint`
    return subprocess.run([str(BIN / "ray"), "job", sub, "--address", address, *rest], env=env,
                          capture_output=True, text=True, timeout=timeout)


def job_status(env, address, job_id) -> str:
    proc = ray_job(env, address, "status", job_id, timeout=60)
    out = proc.stdout + proc.stderr
    found = re.search(r"Status for job '[^']*': (\w+)", out)
    if found:
        return found.group(1)
    for pattern, status in ((r"Job '[^']*' succeeded", "SUCCEEDED"), (r"Job '[^']*' was stopped", "STOPPED"),
                            (r"Job '[^']*' failed", "FAILED")):
        if re.search(pattern, out):
            return status
    return "UNKNOWN"


def minimal_working_dir(dest: Path) -> Path:
    """What a user's `--working-dir .` uploads once .gitignore drops .venv, mlruns, data...: the package
    and the entry scripts (here copied, so that the test does not depend on what else is in the repo)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "vmrnn", dest / "vmrnn", ignore=ignore)
    shutil.copytree(REPO / "sweeps", dest / "sweeps", ignore=ignore)
    shutil.copy(REPO / ".gitignore", dest / ".gitignore")
    return dest


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
    assert parent.info.status == "FINISHED" and parent.data.tags[D.TAG_SWEEP_STATUS] == "FINISHED"
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
    keys = [c.data.tags[D.TAG_RUN_KEY] for c in children]
    assert len(children) == n_trials and len(set(keys)) == n_trials, "one child run per trial, no duplicates"
    assert set(keys) == {f"{sweep}/{r['trial_id']}" for r in table}
    by_trial = {r["trial_id"]: r for r in table}
    for child in children:
        row = by_trial[child.data.tags[D.TAG_TRIAL_ID]]
        assert child.data.tags[D.TAG_TRIAL_STATUS] == row["status"]
        assert child.info.status == D.MLFLOW_STATUS[row["status"]]  # FINISHED / KILLED (pruned)
        assert {"val_mse", "val_mae", "val_ssim", "val_psnr", "train_loss"} <= set(child.data.metrics)
        assert child.data.metrics["val_mse"] > 0
    best_run_id = parent.data.tags["vmrnn.best_run_id"]
    return {"client": client, "parent": parent, "best_run_id": best_run_id, "table": table}


def check_champion(client, best_run_id: str, sweep: str) -> None:
    from vmrnn.tune import defaults as D

    name = D.registered_model_name("taxibj")
    champion = client.get_model_version_by_alias(name, D.CHAMPION)
    assert champion.run_id == best_run_id
    assert champion.tags[D.TAG_SWEEP] == sweep and float(champion.tags["val_mse"]) > 0
    assert champion.tags[D.TAG_EVAL_DATA] == "synthetic" and json.loads(champion.tags["config"])["preset"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len([v for v in versions if v.run_id == best_run_id]) == 1, "the run is registered once"


@pytest.mark.timeout(600)
def test_job_submit_sweep_resumes_registers_and_predicts(tmp_path):
    sweep = "e2e-job"
    mlflow_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),  # same for start and submit
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this venv's, as a user's
               VMRNN_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    mlflow_proc = ray_proc = temp_dir = address = None
    try:
        mlflow_proc = start_mlflow_server(tmp_path, mlflow_port)
        uri = f"http://127.0.0.1:{mlflow_port}"
        ray_proc, dash_port, temp_dir = start_ray_head(tmp_path, env)
        address = f"http://127.0.0.1:{dash_port}"
        wait_for(lambda: ray_job(env, address, "list", timeout=30).returncode == 0, 120, interval=2,
                 what="the Ray job server")
        workdir = minimal_working_dir(tmp_path / "src")
        cmd = ["--working-dir", str(workdir), "--no-wait", "--", "python", "sweeps/taxibj.py", "--smoke",
               "--name", sweep, "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray_results")]

        # 1st submission: stop the job (its driver dies) once a trial has finished and Tune saved it.
        assert ray_job(env, address, "submit", "--submission-id", "sweep-1", *cmd).returncode == 0
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)

        def a_trial_finished():
            exp = client.get_experiment_by_name("vmrnn-taxibj")
            return exp and client.search_runs([exp.experiment_id], filter_string=(
                f"tags.`vmrnn.sweep` = '{sweep}' and tags.`vmrnn.trial_status` = 'FINISHED'"))

        finished = wait_for(a_trial_finished, 300, interval=2, what="a finished trial of job 1")
        first_id = finished[0].data.tags["vmrnn.trial_id"]
        state_dir = tmp_path / "ray_results" / sweep
        wait_for(lambda: any("TERMINATED" in p.read_text() for p in state_dir.glob("experiment_state-*.json")),
                 60, what="Tune's saved state with the finished trial")
        assert job_status(env, address, "sweep-1") in ("RUNNING", "PENDING")
        ray_job(env, address, "stop", "sweep-1", timeout=60)
        wait_for(lambda: job_status(env, address, "sweep-1") in ("STOPPED", "FAILED"), 60, interval=2,
                 what="job 1 to stop")

        # 2nd submission of the same command: resumes.
        assert ray_job(env, address, "submit", "--submission-id", "sweep-2", *cmd).returncode == 0
        wait_for(lambda: job_status(env, address, "sweep-2") in ("SUCCEEDED", "FAILED", "STOPPED"), 420,
                 interval=3, what="job 2 to end")
        logs = ray_job(env, address, "logs", "sweep-2").stdout
        assert job_status(env, address, "sweep-2") == "SUCCEEDED", logs[-4000:]
        assert "(resuming)" in logs and "(resumed)" in logs
        assert "is the champion" in logs and "mlflow" in logs.lower()

        got = check_sweep_in_mlflow(uri, sweep, n_trials=3)
        runs_of_first = [c for c in got["client"].search_runs(
            [got["parent"].info.experiment_id], filter_string=f"tags.`vmrnn.run_key` = '{sweep}/{first_id}'")]
        assert len(runs_of_first) == 1 and runs_of_first[0].info.status == "FINISHED"
        check_champion(got["client"], got["best_run_id"], sweep)

        # The champion forecasts through the CLI.
        x = np.random.default_rng(0).random((2, 4, 2, 32, 32), dtype=np.float32)
        np.save(tmp_path / "x.npy", x)
        pred = subprocess.run([str(BIN / "vmrnn"), "predict", "--model", "models:/vmrnn-taxibj@champion",
                               "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")],
                              env=dict(env, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=180)
        assert pred.returncode == 0, pred.stderr[-3000:]
        y = np.load(tmp_path / "y.npy")
        assert y.shape == (2, 4, 2, 32, 32) and np.isfinite(y).all() and 0 <= y.min() and y.max() <= 1
    finally:
        if address is not None and ray_proc is not None and ray_proc.poll() is None:
            for job_id in ("sweep-1", "sweep-2"):  # kept beside the test's other logs
                try:
                    logs = ray_job(env, address, "logs", job_id, timeout=30).stdout
                    (tmp_path / f"job-{job_id}.log").write_text(logs)
                except Exception:
                    pass
        stop_group(ray_proc, grace=20)
        if temp_dir is not None:
            kill_processes_mentioning(str(temp_dir))
            shutil.rmtree(temp_dir, ignore_errors=True)
        stop_group(mlflow_proc)


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
