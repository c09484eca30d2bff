"""Process helpers for tests that start real servers (Ray head, MLflow server, jobs, scripts).

Everything binds to 127.0.0.1, every wait is bounded, and teardown only touches what the test started
(its own process group, or processes naming the test's unique temp dir).
"""

from __future__ import annotations

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

from conftest import REPO

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
    for pid, _ in processes_mentioning(marker):
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
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


def dead_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    return free_port()


def scrubbed_env(**extra: str) -> dict[str, str]:
    """This environment without a Ray address or MLflow URI of the caller's, loopback-only Ray, no
    telemetry; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def processes_mentioning(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose command line names `marker`."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd:
            found.append((int(entry.name), cmd))
    return found
