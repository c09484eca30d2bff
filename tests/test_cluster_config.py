"""cluster/gpu.yaml (AWS), cluster/gcp-gpu.yaml, cluster/install_kernels.sh and vmrnn.ops.check_kernels,
on a CPU machine.

- The cluster configs go through Ray's own preparation and validation (what `ray up` runs before
  it talks to the cloud), and Ray's autoscaler bin-packing says every node type holds a default trial.
- The commands in it parse, and the head's MLflow start-up does what it says.
- A local fake multi-node Ray cluster with the same node types (Ray's `fake_multinode` provider:
  worker "nodes" are extra raylets on this machine, GPUs are counted, not real) autoscales a GPU node
  for one trial's resources and runs the trial's worker there, with token auth on.

Relies on Ray 2.60.0 (pinned in pyproject.toml and in the configs' image tag), in particular
on these internal APIs: ray.autoscaler._private.util.prepare_config / validate_config,
ray.autoscaler._private.resource_demand_scheduler.get_bin_pack_residual / get_nodes_for,
ray._private.services.get_node_ip_address (also used by the configs), and the FakeMultiNodeProvider
(ray.autoscaler._private.fake_multi_node), whose example.yaml the wheel lacks.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'ray[default,tune,train]==2.60.0'")

from ray.autoscaler._private.node_provider_availability_tracker import NodeAvailabilitySummary  # noqa: E402
from ray.autoscaler._private.resource_demand_scheduler import (  # noqa: E402
    _default_utilization_scorer,
    get_bin_pack_residual,
    get_nodes_for,
)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

from procs import REPO, free_port  # noqa: E402

CONFIGS = {"aws": REPO / "cluster" / "gpu.yaml", "gcp": REPO / "cluster" / "gcp-gpu.yaml"}
INSTALL_KERNELS = REPO / "cluster" / "install_kernels.sh"
SHARED_SDISTS = REPO.parent / "shared" / "device" / "sdist"
GIB = 1024**3

# A default sweep trial as the sweeps request it: the Tune trial driver (it runs the TorchTrainer's fit)
# takes 1 CPU, plus WORKERS_PER_TRIAL Ray Train workers of 1 GPU and 4 CPUs each.
# TODO: take these from vmrnn.tune.defaults once it exports them. (vmrnn.tune.local_ray.plan_resources
# currently defaults to 1 CPU per GPU worker; 4 is the larger, safer assumption.)
TRIAL_DRIVER = {"CPU": 1.0}
WORKERS_PER_TRIAL = 1
WORKER = {"CPU": 4.0, "GPU": 1.0}


def trial_bundles(workers: int = WORKERS_PER_TRIAL) -> list[dict]:
    return [dict(TRIAL_DRIVER)] + [dict(WORKER) for _ in range(workers)]


def load_prepared(path: Path) -> dict:
    """The config as `ray up` sees it after its provider-independent steps (before any cloud call)."""
    prepared = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def provider(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def raw_config(provider) -> dict:
    return yaml.safe_load(CONFIGS[provider].read_text())


@pytest.fixture(scope="module")
def config(provider) -> dict:
    return load_prepared(CONFIGS[provider])


def worker_types(config: dict) -> dict:
    return {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}


# --- static: Ray's validation, resources, pins --------------------------------------------------


def test_config_passes_ray_prepare_and_validate(provider, config):
    types = config["available_node_types"]
    assert config["provider"]["type"] == provider
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["max_workers"] == 0
    assert worker_types(config), "no worker node types"
    for name, nt in types.items():
        assert 0 <= nt["min_workers"] <= nt["max_workers"], name
    assert sum(nt["min_workers"] for nt in types.values()) <= config["max_workers"]
    # merge_setup_commands ran: the common setup precedes the role-specific commands.
    assert config["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_every_node_type_declares_cpu_gpu_memory_in_bytes(config):
    head = config["head_node_type"]
    for name, nt in config["available_node_types"].items():
        res = nt["resources"]
        assert {"CPU", "GPU", "memory"} <= set(res), f"{name} must declare CPU, GPU and memory: {res}"
        assert res["CPU"] >= 1, name
        # memory is in bytes: anything under 1 GiB is a unit mistake (GiB written as bytes).
        assert isinstance(res["memory"], int) and res["memory"] >= GIB, f"{name}: memory {res['memory']!r}"
        if name == head:
            assert res["GPU"] == 0, "the head is a CPU node"
        else:
            assert res["GPU"] >= 1, f"{name} is a GPU worker type without GPUs"


def test_every_node_type_holds_the_default_trial(config):
    head = config["head_node_type"]
    for name, nt in worker_types(config).items():
        unfulfilled, _ = get_bin_pack_residual([dict(nt["resources"])], trial_bundles())
        assert unfulfilled == [], f"one {name} node cannot hold a default trial {trial_bundles()}"
        per_node = int(
            min(
                nt["resources"]["GPU"] // (WORKER["GPU"] * WORKERS_PER_TRIAL),
                nt["resources"]["CPU"] // (TRIAL_DRIVER["CPU"] + WORKER["CPU"] * WORKERS_PER_TRIAL),
            )
        )
        unfulfilled, _ = get_bin_pack_residual([dict(nt["resources"])], trial_bundles() * per_node)
        assert per_node >= 1 and unfulfilled == [], f"{name}: {per_node} trials per node do not pack"
    # The head runs trial drivers (and the sweep driver) but never a GPU worker.
    head_res = dict(config["available_node_types"][head]["resources"])
    assert get_bin_pack_residual([head_res], [dict(TRIAL_DRIVER)])[0] == []
    assert get_bin_pack_residual([head_res], [dict(WORKER)])[0] == [WORKER]


def test_autoscaler_adds_a_gpu_node_for_trial_workers(config):
    """Ray's own node-type choice for pending trial workers: GPU types only, within max_workers."""
    types = config["available_node_types"]
    # As the autoscaler calls it (ResourceDemandScheduler.get_nodes_to_launch), with no launch failures.
    scorer = functools.partial(
        _default_utilization_scorer, node_availability_summary=NodeAvailabilitySummary(node_availabilities={})
    )
    max_trials = sum(nt["max_workers"] * int(nt["resources"]["GPU"]) for nt in worker_types(config).values())
    for n_trials in (1, 4, min(max_trials, 16)):
        demand = [dict(WORKER) for _ in range(n_trials * WORKERS_PER_TRIAL)]
        to_add, residual = get_nodes_for(types, {}, config["head_node_type"], config["max_workers"], demand, scorer)
        assert residual == [], f"{n_trials} trials' workers do not fit a fully scaled cluster: {residual}"
        assert set(to_add) <= set(worker_types(config)), to_add
        for name, count in to_add.items():
            assert count <= types[name]["max_workers"], (name, count)
    to_add, _ = get_nodes_for(types, {}, config["head_node_type"], config["max_workers"], [dict(WORKER)], scorer)
    assert to_add == {"gpu_1x": 1}, f"one single-GPU worker should bring up one gpu_1x node, got {dict(to_add)}"


def test_image_and_pins_match_the_installed_ray_and_torch(raw_config):
    image = raw_config["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-cu\d+", image), (
        f"the image {image!r} must be rayproject/ray:<the local Ray {ray.__version__}>-pyXY-cuXYZ: "
        "the `ray` CLI that runs `ray up` and the cluster must run the same Ray"
    )
    setup = "\n".join(raw_config["setup_commands"])
    assert f"ray[default,tune,train]=={ray.__version__}" in setup
    torch_pin = re.search(r"torch==([0-9.]+)", setup)
    assert torch_pin, "setup_commands must pin torch (an unpinned torch drifts to another CUDA build)"
    import torch

    assert torch_pin.group(1) == torch.__version__.split("+")[0], "cluster and tests pin different torch versions"


def test_token_auth_mlflow_and_kernels_are_wired(raw_config):
    run_options = " ".join(raw_config["docker"]["run_options"])
    assert "RAY_AUTH_MODE=token" in run_options, "every process in the containers must use token auth"
    head_start = "\n".join(raw_config["head_start_ray_commands"])
    worker_start = "\n".join(raw_config["worker_start_ray_commands"])
    for start, tracking in ((head_start, "http://$VMRNN_HEAD_IP:5000"), (worker_start, "http://$RAY_HEAD_IP:5000")):
        assert "RAY_AUTH_MODE=token" in start
        assert f"MLFLOW_TRACKING_URI={tracking}" in start
        assert "VMRNN_STORAGE_PATH=$VMRNN_S3_PREFIX/" in start
    assert "ray start --head" in head_start and "--address=$RAY_HEAD_IP:6379" in worker_start
    assert re.search(r"mlflow server .*--backend-store-uri sqlite:////home/ray/vmrnn-mlflow/", head_start)
    assert '--artifacts-destination "$VMRNN_S3_PREFIX/mlflow"' in head_start
    assert raw_config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    for remote, local in raw_config["file_mounts"].items():
        if not local.startswith("~"):
            assert (REPO / local).exists(), f"file mount {remote}: {local} is not in the repository"
    assert any("cluster/install_kernels.sh" in c for c in raw_config["worker_setup_commands"])
    for cmd in (
        raw_config["initialization_commands"]
        + raw_config["setup_commands"]
        + raw_config["head_setup_commands"]
        + raw_config["worker_setup_commands"]
        + raw_config["head_start_ray_commands"]
        + raw_config["worker_start_ray_commands"]
    ):
        proc = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert proc.returncode == 0, f"not valid bash: {cmd}\n{proc.stderr}"


def test_head_ip_snippet_prints_this_nodes_address(raw_config):
    """The head computes its MLflow URI with the function Ray uses for $RAY_HEAD_IP (Ray 2.60 internal)."""
    head_start = "\n".join(raw_config["head_start_ray_commands"])
    snippet = re.search(r'VMRNN_HEAD_IP=\$\(python -c "([^"]+)"\)', head_start).group(1)
    out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    socket.inet_aton(out.stdout.strip())  # an IPv4 address


def test_head_starts_mlflow_once_and_refuses_the_placeholder_bucket(raw_config, tmp_path):
    mlflow_cmd = next(c for c in raw_config["head_start_ray_commands"] if "mlflow server" in c)
    # Run it here with a stand-in `mlflow` on PATH, its directory in tmp_path, and a health URL on a
    # closed port (so an unrelated server on :5000 of this machine cannot answer).
    cmd = mlflow_cmd.replace("/home/ray/vmrnn-mlflow", str(tmp_path)).replace(
        "127.0.0.1:5000/health", f"127.0.0.1:{free_port()}/health"
    )
    shim = tmp_path / "bin" / "mlflow"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}", "PYTHON": sys.executable}
    env.pop("VMRNN_S3_PREFIX", None)
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "VMRNN_S3_PREFIX" in proc.stderr, proc
    assert not (tmp_path / "argv").exists()

    placeholder = re.search(r"VMRNN_S3_PREFIX=(\S+)", " ".join(raw_config["docker"]["run_options"])).group(1)
    env["VMRNN_S3_PREFIX"] = placeholder
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "EDIT-ME" in placeholder, "the shipped placeholder bucket must be refused"

    env["VMRNN_S3_PREFIX"] = "s3://my-bucket/vmrnn"
    proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 10
    while not (tmp_path / "argv").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:1] == ["server"]
    assert argv[argv.index("--artifacts-destination") + 1] == "s3://my-bucket/vmrnn/mlflow"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow.db"
    assert argv[argv.index("--port") + 1] == "5000"


# --- cluster/install_kernels.sh and vmrnn.ops.check_kernels (the parts a CPU can run) -----------


def _install_kernels(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(INSTALL_KERNELS), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_install_kernels_rejects_bad_arguments():
    assert _install_kernels("--help").returncode == 0
    bad = _install_kernels("--no-such-flag")
    assert bad.returncode != 0 and "unknown argument" in bad.stderr
    bad = _install_kernels("--dry-run", "--arch", "sm89")
    assert bad.returncode != 0 and "--arch" in bad.stderr
    import torch

    if not torch.cuda.is_available():
        no_gpu = _install_kernels("--dry-run")
        assert no_gpu.returncode != 0 and "no CUDA GPU is visible" in no_gpu.stderr


@pytest.mark.skipif(not SHARED_SDISTS.is_dir(), reason=f"no source archives at {SHARED_SDISTS}")
def test_install_kernels_restricts_the_sdists_to_the_requested_architecture():
    proc = _install_kernels("--dry-run", "--arch", "8.9", "--with-causal-conv1d", "--sdist-dir", str(SHARED_SDISTS))
    assert proc.returncode == 0, proc.stderr
    plans = [line for line in proc.stdout.splitlines() if "-> nvcc" in line]
    assert len(plans) == 2 and plans[0].split(":")[1].strip().startswith("mamba_ssm"), proc.stdout
    for line in plans:
        assert line.endswith("-> nvcc -gencode arch=compute_89,code=sm_89"), line


def test_install_kernels_refuses_an_unknown_setup_py_layout(tmp_path):
    src = tmp_path / "mamba_ssm-9.9.9"
    src.mkdir()
    (src / "setup.py").write_text("from setuptools import setup\nsetup(name='mamba_ssm')\n")
    subprocess.run(["tar", "czf", str(tmp_path / "mamba_ssm-9.9.9.tar.gz"), "-C", str(tmp_path), src.name], check=True)
    proc = _install_kernels("--dry-run", "--arch", "90", "--sdist-dir", str(tmp_path))
    assert proc.returncode != 0 and "layout not recognised" in proc.stderr, proc


def test_check_kernels_exits_non_zero_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: this checks the CPU-machine behaviour")
    proc = subprocess.run(
        [sys.executable, "-m", "vmrnn.ops.check_kernels"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2, proc
    assert "no CUDA GPU" in proc.stderr


def test_check_kernels_comparisons_pass_equal_and_catch_unequal_implementations(capsys):
    from vmrnn.ops import check_kernels as ck
    from vmrnn.ops.selective_scan import selective_scan

    same = ck.check_selective_scan("cpu", candidate="torch")
    assert {"forward", "du", "ddelta", "dA", "dB", "dC", "dD", "ddelta_bias"} <= set().union(*(c.errors for c in same))
    # the same code twice: equal up to rounding (MKL picks its thread count by load, so GEMMs can round apart)
    assert ck._report("mamba_ssm", same, 1e-3, 0.0) and max(c.worst for c in same) < 1e-3
    off = ck.check_selective_scan("cpu", candidate=lambda *a, **k: selective_scan(*a, backend="torch", **k) * 1.01)
    assert not ck._report("mamba_ssm", off, 1e-3, 0.0)

    assert ck._report("causal_conv1d", ck.check_causal_conv1d(ck._conv1d_reference, "cpu"), 1e-3, 0.0)
    flipped = lambda x, w, b, activation=None: ck._conv1d_reference(x, w.flip(-1), b, activation)  # noqa: E731
    assert not ck._report("causal_conv1d", ck.check_causal_conv1d(flipped, "cpu"), 1e-3, 0.0)
    out = capsys.readouterr().out
    assert "FAIL" in out and "PASS" in out and "elapsed" in out


# --- a fake multi-node Ray cluster with the config's node types ---------------------------------


def fake_multinode_config(config: dict, gcs_address: str) -> tuple[dict, dict]:
    """(autoscaler config for Ray's fake_multinode provider, head resources) from the real config.

    Same node-type names and CPU/GPU counts. Differences, all forced by the fake provider: the head
    type must be called ray.head.default; "memory" is dropped (the provider passes a node type's
    resources to RayParams.resources, which rejects it; the static tests check memory); each fake
    node gets a small object store; and the bounds are min 0 / max 1 per type, so the GPU node comes
    from the trial's demand and at most one extra raylet runs on this 2-core machine.
    """
    node_types = {
        "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
    }
    for name, nt in worker_types(config).items():
        res = {k: v for k, v in nt["resources"].items() if k != "memory"}
        res["object_store_memory"] = 100 * 1024**2
        node_types[name] = {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": 1}
    head = {
        k: v for k, v in config["available_node_types"][config["head_node_type"]]["resources"].items() if k != "memory"
    }
    node_types["ray.head.default"]["resources"] = dict(head)
    fake = {
        "cluster_name": "vmrnn-fake",
        "max_workers": len(node_types) - 1,
        "upscaling_speed": config["upscaling_speed"],
        "idle_timeout_minutes": config["idle_timeout_minutes"],
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "auth": {},
        "docker": {},
        "available_node_types": node_types,
        "head_node_type": "ray.head.default",
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }
    return fake, head


def _session_processes(sid: int) -> list[int]:
    """Live processes of session `sid` (the head was started as its leader, so these are ours)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _stop_session(head: subprocess.Popen, grace_s: float = 15.0) -> list[int]:
    """Stop the head (it stops its own processes), then kill what is left of its session.

    Returns the pids still alive afterwards (should be none). Only processes that this test started
    are signalled: members of the session the head leads, by id.
    """
    sid = head.pid
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + grace_s
    sig = signal.SIGTERM
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        sig = signal.SIGKILL  # a second round is not polite any more
    if head.poll() is None:
        head.kill()
        head.wait(timeout=5)
    return _session_processes(sid)


DRIVER = textwrap.dedent("""
    import json, os, sys, time, urllib.error, urllib.request
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cfg = json.loads(sys.argv[1])
    out = {}
    t0 = time.monotonic()
    ray.init(address=cfg["gcs_address"], log_to_driver=False)
    out["nodes_at_start"] = len([n for n in ray.nodes() if n["Alive"]])

    @ray.remote
    def where():
        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_type": os.environ.get("RAY_NODE_TYPE_NAME", "head"),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                "mlflow": os.environ.get("MLFLOW_TRACKING_URI")}

    # One trial: its driver (a CPU task, as Tune's function trainable) and its Ray Train worker group
    # (a PACK placement group, as Train's workers), each worker running where Train would run it.
    out["driver"] = ray.get(where.options(num_cpus=cfg["driver"]["CPU"]).remote(), timeout=60)
    pg = placement_group([cfg["worker"]] * cfg["workers"], strategy="PACK")
    out["pg_ready"] = pg.wait(timeout_seconds=cfg["timeout_s"])
    out["pg_wait_s"] = round(time.monotonic() - t0, 1)
    if out["pg_ready"]:
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        out["worker"] = ray.get(where.options(num_cpus=cfg["worker"]["CPU"], num_gpus=cfg["worker"]["GPU"],
                                              scheduling_strategy=strategy).remote(), timeout=60)
        out["worker_node_resources"] = next(n["Resources"] for n in ray.nodes()
                                            if n["NodeID"] == out["worker"]["node_id"])

    # The job server refuses requests without the token and runs a job submitted with it.
    try:
        urllib.request.urlopen(cfg["dashboard"] + "/api/jobs/", timeout=10)
        out["anonymous_status"] = 200
    except urllib.error.HTTPError as e:
        out["anonymous_status"] = e.code
    from ray.job_submission import JobStatus, JobSubmissionClient
    for attempt in range(30):  # the job server may still be starting behind the open port
        try:
            client = JobSubmissionClient(cfg["dashboard"])
            break
        except Exception:
            if attempt == 29:
                raise
            time.sleep(1)
    job = client.submit_job(
        entrypoint="python -c \\"import os; print('MLFLOW=' + os.environ['MLFLOW_TRACKING_URI'])\\"")
    deadline = time.monotonic() + cfg["timeout_s"]
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} \\
            and time.monotonic() < deadline:
        time.sleep(0.5)
    out["job_status"] = str(client.get_job_status(job))
    out["job_logs"] = client.get_job_logs(job)[-2000:]
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fake_multinode_cluster_runs_a_trial_worker_on_an_autoscaled_gpu_node(tmp_path):
    config = load_prepared(CONFIGS["aws"])
    # A short private temp dir (Ray's socket paths have a length limit), never /tmp/ray of anyone else.
    temp_dir = Path(tempfile.mkdtemp(prefix="vmrnn-fake-", dir="/tmp"))
    gcs_port, dash_port, agent_port, client_port = (free_port() for _ in range(4))
    gcs_address = f"127.0.0.1:{gcs_port}"
    fake, head_res = fake_multinode_config(config, gcs_address)
    validate_config(fake)
    fake_path = tmp_path / "fake_cluster.yaml"
    fake_path.write_text(yaml.safe_dump(fake))
    token_path = tmp_path / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    tracking = "http://127.0.0.1:5999"  # a marker: nothing listens there, the test only reads it back

    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback only
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_FAKE_CLUSTER": "1",  # required by the fake_multinode provider
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token",  # as on the real cluster; the token comes from a file of this test's
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        "MLFLOW_TRACKING_URI": tracking,
    }
    env.pop("RAY_ADDRESS", None)
    ray_cli = str(Path(sys.executable).with_name("ray"))
    head_cmd = [
        ray_cli,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs_port}",
        f"--temp-dir={temp_dir}",
        f"--autoscaling-config={fake_path}",
        f"--num-cpus={int(head_res['CPU'])}",
        f"--num-gpus={int(head_res['GPU'])}",
        "--object-store-memory=104857600",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(head_cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    driver_cfg = {
        "gcs_address": gcs_address,
        "dashboard": f"http://127.0.0.1:{dash_port}",
        "timeout_s": 90,
        "driver": TRIAL_DRIVER,
        "worker": WORKER,
        "workers": WORKERS_PER_TRIAL,
    }
    result, proc = None, None
    try:
        # Wait (bounded) for the job server: the GCS and the dashboard are both up then.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", dash_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert head.poll() is None, f"ray start exited: {(tmp_path / 'head.log').read_text()[-3000:]}"
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, json.dumps(driver_cfg)],
            env=env,
            capture_output=True,
            text=True,
            timeout=200,
            cwd=tmp_path,
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        assert line, f"driver failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        result = json.loads(line[len("RESULT ") :])
    finally:
        left = _stop_session(head)
        log.close()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
    assert left == [], f"processes of the fake cluster still alive: {left}"

    print(f"fake cluster: {json.dumps(result)}")
    assert result["nodes_at_start"] == 1, "only the head should run before any demand (min_workers 0)"
    assert result["driver"]["node_type"] == "head", "the trial driver (1 CPU) fits on the head"
    assert result["pg_ready"], f"no GPU node came up for the trial's workers within 90 s: {result}"
    worker = result["worker"]
    gpu_types = worker_types(config)
    assert worker["node_type"] in gpu_types, worker
    declared = gpu_types[worker["node_type"]]["resources"]
    assert result["worker_node_resources"]["GPU"] == declared["GPU"]
    assert result["worker_node_resources"]["CPU"] == declared["CPU"]
    assert len(worker["gpu_ids"]) == WORKER["GPU"], worker
    assert worker["mlflow"] == tracking, "the node environment (MLFLOW_TRACKING_URI) reaches the trial workers"
    assert result["anonymous_status"] == 401, "the job server must refuse requests without the token"
    assert result["job_status"] == "SUCCEEDED", result
    assert f"MLFLOW={tracking}" in result["job_logs"], "a submitted job sees the node's MLFLOW_TRACKING_URI"
