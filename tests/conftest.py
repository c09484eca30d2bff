"""Shared test set-up: loopback-only Ray, quiet telemetry, test helpers on sys.path, and fixtures for the
real servers tests start (from tests/procs.py): `mlflow_server`, `local_ray`, and `smoke_sweep` (the
README's main command, run once per test session for the tests that read what it leaves)."""

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Ray listens on 127.0.0.1 only with this set; never send usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

sys.path.insert(0, str(Path(__file__).parent))

from procs import (  # noqa: E402
    REPO,
    MlflowServer,
    kill_processes_mentioning,
    running_local_ray,
    running_mlflow_server,
)

__all__ = ["REPO"]


@pytest.fixture
def mlflow_server(tmp_path) -> MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with its own store in tmp_path, stopped after the test."""
    with running_mlflow_server(tmp_path / "mlflow-server") as server:
        yield server


@pytest.fixture(scope="module")
def local_ray() -> Path:
    """A local 2-CPU Ray in this process for the module's tests (its temp dir); every process of it is gone
    after the module."""
    with running_local_ray(num_cpus=2) as temp_dir:
        yield temp_dir


@pytest.fixture(scope="session")
def smoke_sweep(tmp_path_factory) -> dict:
    """`python sweeps/taxibj.py --smoke` in an empty folder, as after the README's set-up: embedded defaults
    (local Ray, ./mlflow.db, Tune state in ./ray_results), the venv never activated (its bin folder is not on
    PATH), HOME and TMPDIR of its own. Returns the folder, its store URI, the command, its environment and
    output, its time and the temporary folders it left. Tests may read the folder; one that changes it puts
    it back."""
    root = tmp_path_factory.mktemp("smoke-sweep")
    clone = root / "clone"
    clone.mkdir()
    tmp = Path(f"/tmp/vmrnn-smoke-{secrets.token_hex(4)}")  # short: Ray's unix socket paths live below it
    tmp.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING", "VMRNN_"))}
    path = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p and p != venv_bin)
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        VMRNN_CACHE_DIR=str(root / "cache"),
        PYTHONUNBUFFERED="1",
        HOME=str(root / "home"),
        PATH=path,
        TMPDIR=str(tmp),
    )
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the script sets it for its local Ray
    cmd = [sys.executable, str(REPO / "sweeps" / "taxibj.py"), "--smoke"]
    t0 = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_processes_mentioning(str(tmp))
    elapsed = time.monotonic() - t0
    leftovers = sorted(p.name for p in tmp.glob("vmrnn-mlflow-*"))
    shutil.rmtree(tmp, ignore_errors=True)
    env["TMPDIR"] = str(root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return {
        "root": root,
        "clone": clone,
        "uri": f"sqlite:///{clone / 'mlflow.db'}",
        "cmd": cmd,
        "env": env,
        "out": done.stdout,
        "err": done.stderr,
        "seconds": elapsed,
        "leftovers": leftovers,
    }
