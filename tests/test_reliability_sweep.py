"""Faults during sweeps, secrets, and load, on a real `ray start --head` (token auth) and a real
`mlflow server`, both on 127.0.0.1, with sweeps submitted by `ray job submit` (no mocks).

- test_sweep_survives_a_killed_worker_a_killed_driver_and_a_diverging_trial: one smoke sweep (4 trials x
  3 epochs) in which
  * trial 1 (the official point) loses a Ray Train worker to SIGKILL in the middle of its run: the
    worker group restarts from the last checkpoint, the trial finishes, and its MLflow run holds every
    epoch exactly once;
  * trial 2 (`--point lr=1e10,warmup_epochs=0`) diverges: FAILED in Tune (TrainingDiverged) and in MLflow
    (run FAILED, `vmrnn.failure_reason` and `vmrnn.error` name the divergence);
  * the job's driver process is SIGKILLed while trial 3 trains (not `ray job stop`); the same command
    submitted again resumes: trials 1-2 are not re-run, trial 3 continues its MLflow run from its
    checkpoint, the Optuna study continues (one study of 4 trials, the official point once), no MLflow
    run is duplicated, one champion is registered;
  * secret-looking environment variables set on every Ray process never reach MLflow params or tags;
  * the champion forecasts through `vmrnn predict --model models:/vmrnn-taxibj@champion`.
  After both jobs no Ray actor or placement group is left alive, and no process once the cluster stops.
- test_more_trials_than_cpus_queue_and_nothing_leaks: `python sweeps/taxibj.py` with its own local Ray
  (2 CPUs) asked for 20 one-epoch trials at once (--max-concurrent 20; each trial needs 0.5 CPU): Tune
  queues them (never more than 4 trials' runs at once), 20 finished child runs, and no process of that Ray is
  left after the script exits.
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from procs import (
    BIN,
    REPO,
    MlflowServer,
    RayHead,
    job_status,
    kill_processes_mentioning,
    minimal_working_dir,
    processes_mentioning,
    ray_job,
    ray_temp_dir,
    running_mlflow_server,
    running_ray_head,
    scrubbed_env,
    stop_group,
    wait_for,
)
from vmrnn.tracking import tags

pytestmark = pytest.mark.slow

# Secret-looking variables in the environment of every Ray process (drivers, trial actors, workers).
CANARY = secrets.token_hex(6)
SECRET_ENV = {
    "AWS_SECRET_ACCESS_KEY": f"aws-{CANARY}",
    "VMRNN_TEST_TOKEN": f"tok-{CANARY}",
    "DB_PASSWORD": f"pw-{CANARY}",
    "VMRNN_TEST_API_KEY": f"key-{CANARY}",
}


@dataclass
class Cluster:
    root: Path
    env: dict
    mlflow: MlflowServer
    head: RayHead
    workdir: Path

    @property
    def uri(self) -> str:
        return self.mlflow.uri

    @property
    def address(self) -> str:
        return self.head.address

    def submit(self, job_id: str, *script_args: str) -> None:
        cmd = ["--working-dir", str(self.workdir), "--no-wait", "--", "python", "sweeps/taxibj.py", *script_args]
        deadline = time.monotonic() + 120
        while True:
            proc = ray_job(self.env, self.address, "submit", "--submission-id", job_id, *cmd)
            # The job server answers before the node's agent has registered (slow on a loaded machine); Ray
            # says to try again later.
            if "No available agent to submit job" not in proc.stderr or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def wait_job(self, job_id: str, timeout: float) -> str:
        return wait_for(
            lambda: (s := job_status(self.env, self.address, job_id)) in ("SUCCEEDED", "FAILED", "STOPPED") and s,
            timeout,
            interval=3,
            what=f"job {job_id} to end",
        )

    def logs(self, job_id: str) -> str:
        return ray_job(self.env, self.address, "logs", job_id, timeout=60).stdout

    def ray_list(self, what: str, *filters: str) -> list[dict]:
        args = [str(BIN / "ray"), "list", what, "--address", self.address, "--format", "json", "--limit", "1000"]
        for f in filters:
            args += ["--filter", f]
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if "No resource in the cluster" in proc.stdout:  # what it prints instead of an empty list
            return []
        for line in proc.stdout.splitlines():  # the JSON list (other lines: Ray's notices)
            if line.startswith("["):
                return json.loads(line)
        raise AssertionError(f"`ray list {what}` printed no JSON list: {proc.stdout[-500:]!r} {proc.stderr[-500:]!r}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real `mlflow server` serving artifacts and a `ray start --head` with token auth, both on 127.0.0.1;
    every Ray process sees SECRET_ENV."""
    root = tmp_path_factory.mktemp("rel")
    env = scrubbed_env(
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), VMRNN_CACHE_DIR=str(root / "cache"), **SECRET_ENV
    )
    with running_mlflow_server(root / "mlflow", serve_artifacts=True) as mlflow, running_ray_head(root, env) as head:
        yield Cluster(root, env, mlflow, head, minimal_working_dir(root / "src"))


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _trial_runs(client, sweep: str) -> list:
    exp = client.get_experiment_by_name("vmrnn-taxibj")
    if exp is None:
        return []
    return client.search_runs(
        [exp.experiment_id],
        filter_string=(f"tags.`vmrnn.sweep` = '{sweep}' and tags.`vmrnn.role` = 'trial'"),
        order_by=["start_time ASC"],
    )


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _driver_pids(marker: str) -> list[int]:
    """The job's driver: the `python sweeps/taxibj.py` process (not its /bin/sh parent, not Ray's actors)."""
    return [
        pid
        for pid, cmd in processes_mentioning(marker)
        if "sweeps/taxibj.py" in cmd and cmd.split()[0].endswith(("python", "python3"))
    ]


def _checkpointed(train_runs: Path, trial_id: str, epoch: int) -> bool:
    """Ray Train has registered the trial's checkpoint of `epoch` (counted from 1; what a restart resumes from)."""
    snapshot = train_runs / f"train-{trial_id}" / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and f"checkpoint_epoch{epoch:04d}_" in snapshot.read_text()


def _optuna_study(exp_dir: Path):
    """The Optuna study inside Tune's newest saved searcher state."""
    # By the start time in the name: Ray syncs the experiment folder at the end, so every file gets about
    # the same mtime, in any order.
    files = sorted(glob.glob(str(exp_dir / "searcher-state-*.pkl")))
    assert files, f"no searcher state in {exp_dir}"
    with open(files[-1], "rb") as f:
        state = pickle.load(f)  # noqa: S301 (a file this test's own sweep wrote)

    def find(obj, depth=0):
        if depth > 4:
            return None
        d = obj if isinstance(obj, dict) else getattr(obj, "__dict__", {})
        if "_ot_study" in d:
            return d["_ot_study"]
        for v in d.values():
            if isinstance(v, dict) or hasattr(v, "__dict__"):
                found = find(v, depth + 1)
                if found is not None:
                    return found
        return None

    study = find(state)
    assert study is not None, f"no Optuna study in {files[-1]}"
    return study


def _scan_for_secrets(client) -> list[str]:
    """Every param and tag of every run (and every model version tag) that names or holds a secret."""
    found = []
    names = {k.lower() for k in SECRET_ENV}
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], max_results=1000):
            items = [("param", k, v) for k, v in run.data.params.items()]
            items += [("tag", k, v) for k, v in run.data.tags.items()]
            for kind, k, v in items:
                if CANARY in str(v) or CANARY in k or k.lower() in names or k.lower().split(".")[-1] in names:
                    found.append(f"run {run.info.run_id} {kind} {k}={str(v)[:80]}")
    for mv in client.search_model_versions(max_results=1000):
        for k, v in (mv.tags or {}).items():
            if CANARY in str(v) or CANARY in k:
                found.append(f"model version {mv.name}/{mv.version} tag {k}")
    return found


@pytest.mark.timeout(900)
def test_sweep_survives_a_killed_worker_a_killed_driver_and_a_diverging_trial(cluster):
    from vmrnn.tune import defaults as D

    sweep, epochs = "faults", 3
    storage = cluster.root / "ray_results"
    # 8 batches an epoch (smoke: 4): time to kill a worker between the first and the last checkpoint.
    args = (
        "--smoke",
        "--epochs",
        str(epochs),
        "--num-samples",
        "4",
        "--point",
        "lr=1e10,warmup_epochs=0",
        "--set",
        "max_train_batches=8",
        "--trial-cpus",
        "1",
        "--cpus-per-worker",
        "0.5",  # one trial at a time
        "--name",
        sweep,
        "--tracking-uri",
        cluster.uri,
        "--storage-path",
        str(storage),
    )
    client = _client(cluster.uri)
    cluster.submit("faults-1", *args)
    try:
        # -- fault 1: SIGKILL a Ray Train worker of trial 1 while it trains its second epoch (the first
        # one's checkpoint registered).
        train_runs = storage / sweep / "train_runs"

        def first_epoch_checkpointed():
            runs = _trial_runs(client, sweep)
            return runs and _checkpointed(train_runs, runs[0].data.tags[tags.TAG_TRIAL_ID], 1) and runs[0]

        trial1 = wait_for(first_epoch_checkpointed, 300, interval=0.3, what="trial 1's first checkpoint")
        # The workers' process titles (`ray::RayTrainWorker...`), read from /proc: `ray list actors`
        # takes seconds, in which a smoke trial can finish.
        workers = sorted(
            pid for pid, cmd in processes_mentioning("RayTrainWorker") if cmd.startswith("ray::RayTrainWorker")
        ) or [int(a["pid"]) for a in cluster.ray_list("actors", "class_name=RayTrainWorker", "state=ALIVE")]
        assert workers, "trial 1 has live Ray Train workers"
        os.kill(workers[-1], signal.SIGKILL)
        epochs_before_kill = _steps(client, trial1.info.run_id, "val_mse")
        assert len(epochs_before_kill) < epochs, "the worker was killed before the trial's last epoch"

        # -- trial 1 finishes after the restart; trial 2 (lr=1e10) diverges; then trial 3 starts.
        def statuses():
            return [r.data.tags.get(tags.TAG_TRIAL_STATUS) for r in _trial_runs(client, sweep)]

        wait_for(
            lambda: statuses()[:2] == [D.TRIAL_FINISHED, D.TRIAL_FAILED],
            420,
            interval=2,
            what=f"trial 1 FINISHED and trial 2 FAILED (now {statuses()})",
        )
        exp_dir = storage / sweep
        wait_for(
            lambda: any(
                "TERMINATED" in p.read_text() and "ERROR" in p.read_text()
                for p in exp_dir.glob("experiment_state-*.json")
            ),
            120,
            what="Tune's saved state with trials 1 and 2 ended",
        )

        # -- fault 2: SIGKILL the job's driver while trial 3 trains (its first epoch is in MLflow).
        def third_trial_checkpointed():
            runs = _trial_runs(client, sweep)
            return len(runs) >= 3 and _checkpointed(train_runs, runs[2].data.tags[tags.TAG_TRIAL_ID], 1)

        wait_for(third_trial_checkpointed, 300, interval=0.3, what="trial 3's first checkpoint")
        drivers = _driver_pids(str(storage))
        assert len(drivers) == 1, drivers
        os.kill(drivers[0], signal.SIGKILL)
        assert cluster.wait_job("faults-1", 120) == "FAILED"
        # Ray ends a dead driver's actors (trial runners, Train controllers and workers) by itself.
        wait_for(
            lambda: not cluster.ray_list("actors", "class_name=RayTrainWorker", "state=ALIVE"),
            120,
            interval=2,
            what="the dead driver's Ray Train workers to go",
        )
    finally:
        (cluster.root / "job-faults-1.log").write_text(cluster.logs("faults-1"))

    # -- the same command again: resumes and finishes.
    t_resubmit = time.time() * 1000
    cluster.submit("faults-2", *args)
    status = cluster.wait_job("faults-2", 480)
    logs = cluster.logs("faults-2")
    (cluster.root / "job-faults-2.log").write_text(logs)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "(resuming)" in logs and "(resumed)" in logs and "is the champion" in logs

    # MLflow: one parent, one run per trial, nothing duplicated, honest statuses.
    exp = client.get_experiment_by_name("vmrnn-taxibj")
    all_runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`vmrnn.sweep` = '{sweep}'")
    parents = [r for r in all_runs if r.data.tags.get(tags.TAG_ROLE) == tags.ROLE_SWEEP]
    trials = _trial_runs(client, sweep)
    assert len(parents) == 1 and len(all_runs) == 1 + 4 and len(trials) == 4
    keys = [r.data.tags[tags.TAG_RUN_KEY] for r in trials]
    assert len(set(keys)) == 4 and all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags[tags.TAG_SWEEP_STATUS] == "FINISHED"

    t1, t2, t3 = trials[0], trials[1], trials[2]
    # Trial 1: restarted once from a checkpoint (the killed worker), finished before the resubmission
    # (not re-run), every epoch logged exactly once.
    assert t1.data.tags[tags.TAG_TRIAL_STATUS] == D.TRIAL_FINISHED and t1.info.status == "FINISHED"
    assert t1.data.tags["vmrnn.restarts"] == "1"
    assert int(t1.data.tags["vmrnn.resumed_from_epoch"]) >= 0  # from a checkpoint, not from scratch
    assert "vmrnn.failure_reason" not in t1.data.tags and t1.info.end_time < t_resubmit
    assert float(t1.data.params["lr"]) == 4e-4  # the official point
    for key in ("val_mse", "val_ssim", "train_loss", "lr", "epoch_time_s"):
        assert _steps(client, t1.info.run_id, key) == list(range(1, epochs + 1)), key  # epochs count from 1

    # Trial 2: diverged; failed with the reason in MLflow and in Ray Tune.
    assert float(t2.data.params["lr"]) == 1e10
    assert t2.info.status == "FAILED" and t2.data.tags[tags.TAG_TRIAL_STATUS] == D.TRIAL_FAILED
    assert "TrainingDiverged" in t2.data.tags["vmrnn.failure_reason"]
    assert "diverged" in t2.data.tags["vmrnn.failure_reason"] and "TrainingDiverged" in t2.data.tags[tags.TAG_ERROR]
    assert t2.info.end_time < t_resubmit
    tune_errors = [p.read_text() for p in exp_dir.glob("*/error.txt")]
    assert any("TrainingDiverged" in e and "at epoch 1," in e for e in tune_errors), tune_errors

    # Trial 3: its driver died mid-trial; resumed from its checkpoint into the same MLflow run.
    assert t3.data.tags["vmrnn.restarts"] == "1" and t3.info.status in ("FINISHED", "KILLED")
    assert int(t3.data.tags["vmrnn.resumed_from_epoch"]) >= 0
    done3 = len(_steps(client, t3.info.run_id, "val_mse"))
    for key in ("val_mse", "train_loss", "lr"):
        assert _steps(client, t3.info.run_id, key) == list(range(1, done3 + 1)), key
    for run in trials:  # no epoch logged twice anywhere
        for key in ("val_mse", "train_loss"):
            steps = _steps(client, run.info.run_id, key)
            assert len(steps) == len(set(steps)), (run.info.run_id, key, steps)

    # Optuna: one study went on across the driver's death: 4 trials, the official point once, then ours.
    study = _optuna_study(exp_dir)
    assert len(study.trials) == 4, [t.params for t in study.trials]
    lrs = [t.params.get("lr") for t in study.trials]
    assert lrs[:2] == [4e-4, 1e10] and lrs.count(4e-4) == 1
    assert str(study.trials[1].state).endswith("FAIL")

    # One champion: the best trial's run, registered once.
    champion = client.get_model_version_by_alias("vmrnn-taxibj", tags.CHAMPION)
    assert champion.run_id == parent.data.tags[tags.TAG_BEST_RUN_ID] != t2.info.run_id
    assert len(client.search_model_versions("name = 'vmrnn-taxibj'")) == 1
    # ... and it forecasts through the CLI, loaded from the registry on the tracking server.
    x = np.random.default_rng(0).random((2, 4, 2, 32, 32), dtype=np.float32)
    np.save(cluster.root / "x.npy", x)
    pred = subprocess.run(
        [
            str(BIN / "vmrnn"),
            "predict",
            "--model",
            "models:/vmrnn-taxibj@champion",
            "--input",
            str(cluster.root / "x.npy"),
            "--out",
            str(cluster.root / "y.npy"),
        ],
        env=dict(cluster.env, MLFLOW_TRACKING_URI=cluster.uri),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert pred.returncode == 0, pred.stderr[-3000:]
    y = np.load(cluster.root / "y.npy")
    assert y.shape == (2, 4, 2, 32, 32) and np.isfinite(y).all() and 0 <= y.min() and y.max() <= 1

    # Secrets in the environment of every process never reached MLflow.
    assert _scan_for_secrets(client) == []

    # Nothing of the two jobs is left in the cluster: no live actor, no placement group holding resources;
    # and stopping the cluster leaves no process behind.
    # Ray Train V2 creates one detached, 0-CPU `AutoscalingCoordinator` per cluster, reused by every later
    # job (Ray's own singleton, not ours): at most one may outlive the jobs. Its detached
    # `PlacementGroupCleaner` of a run exits by itself once it sees the run's controller gone (it polls):
    # allowed a minute for that, nothing else.
    deadline = time.monotonic() + 60
    while True:
        alive = cluster.ray_list("actors", "state=ALIVE")
        coordinators = [a for a in alive if a.get("class_name") == "_AutoscalingCoordinatorActor"]
        others = [a for a in alive if a not in coordinators]
        exiting = [a for a in others if a.get("class_name") == "PlacementGroupCleaner"]
        if not exiting or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(coordinators) <= 1, coordinators
    assert others == [], [(a.get("class_name"), a.get("pid")) for a in others]
    assert cluster.ray_list("placement-groups", "state=CREATED") == []
    cluster.head.stop()
    wait_for(
        lambda: not processes_mentioning(str(cluster.head.temp_dir)),
        60,
        interval=1,
        what="every process of the stopped cluster to exit",
    )


@pytest.mark.timeout(900)
def test_more_trials_than_cpus_queue_and_nothing_leaks(tmp_path):
    """`python sweeps/taxibj.py` on this machine (its own local Ray of 2 CPUs) asked to run 3 trials at
    once, each needing 1 CPU (2 fit): they queue, all 3 finish, and nothing of that Ray outlives the script."""
    from vmrnn.tune import defaults as D

    sweep, n = "load", 3
    marker = ray_temp_dir()  # the local Ray's temp dir: every process of that Ray names this path
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = scrubbed_env(RAY_TMPDIR=str(marker), VMRNN_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [
        sys.executable,
        str(REPO / "sweeps" / "taxibj.py"),
        "--smoke",
        "--epochs",
        "1",
        "--num-samples",
        str(n),
        "--workers-per-trial",
        "1",
        "--cpus-per-worker",
        "0.5",
        "--trial-cpus",
        "0.5",
        # not what this test is about, and most of a tiny trial's CPU time (torch.export, matplotlib)
        "--set",
        "log_model=false",
        "--set",
        "log_images=false",
        "--set",
        "test_at_end=false",
        "--max-concurrent",
        str(n),
        "--name",
        sweep,
        "--tracking-uri",
        uri,
        "--storage-path",
        str(tmp_path / "ray_results"),
        "--no-register",
    ]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=780)
    finally:
        stop_group(proc)
        leftovers = processes_mentioning(str(marker))
        kill_processes_mentioning(str(marker))
        shutil.rmtree(marker, ignore_errors=True)
    (tmp_path / "sweep.log").write_text(out)
    assert proc.returncode == 0, out[-4000:]
    assert f"--max-concurrent {n}: this Ray has 2 CPU" in out and "2 trial(s) run at a time" in out, out[:3000]

    client = _client(uri)
    runs = _trial_runs(client, sweep)
    assert len(runs) == n and len({r.data.tags[tags.TAG_RUN_KEY] for r in runs}) == n
    assert all(r.data.tags[tags.TAG_TRIAL_STATUS] == D.TRIAL_FINISHED and r.info.status == "FINISHED" for r in runs)
    assert not any("vmrnn.model_uri" in r.data.tags for r in runs)  # `--set log_model=false` reached every trial
    # Never more trials at once than fit (2 x 1 CPU on 2 CPUs): the most runs open at one moment.
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs])
    open_runs = peak = 0
    for _, step in events:
        open_runs += step
        peak = max(peak, open_runs)
    assert 1 <= peak <= 2, f"{peak} trial runs at once on 2 CPUs"
    # The script shut its Ray down: no process of that Ray (raylet, GCS, workers, actors) outlived it.
    assert leftovers == [], leftovers
