"""Shared set-up for tests that start real servers: free loopback ports, a real `mlflow server`, a
`ray start --head` cluster, an in-process local Ray, `ray job` calls, and bounded waits.

Everything binds to 127.0.0.1, every wait is bounded, and teardown only touches what the test started
(its own process group and session, or processes naming the test's unique temp dir). tests/conftest.py
turns the servers into fixtures (`mlflow_server`, `local_ray`); the `running_*` context managers are for
set-ups a fixture cannot express (a module-scoped cluster with its own environment).
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------- ports, waits, environment


def free_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate, timeout: float, interval: float = 1.0, what: str = "condition", proc: subprocess.Popen | None = None
):
    """predicate()'s first truthy value, polled every `interval` s; a TimeoutError after `timeout` s, or a
    RuntimeError as soon as `proc` (the process that should make it true) has exited."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} while waiting for {what}")
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_exc})" if last_exc else "")
    )


def http_ok(url: str, timeout: float = 3.0) -> bool:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return resp.status == 200


def scrubbed_env(**extra: str) -> dict[str, str]:
    """This environment without a Ray address or MLflow URI of the caller's, loopback-only Ray, no
    telemetry; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING"))}
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.update(extra)
    return env


def run_interpreted(script: str | Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a test file as a script with Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is
    imported, hence a subprocess) and the checkout first on PYTHONPATH."""
    path = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=timeout)


def ray_temp_dir() -> Path:
    """A fresh temp dir for one Ray (not yet created): short, because of Ray's unix socket path limit, and
    unique, so that every process of that Ray names it and nothing else does."""
    return Path(f"/tmp/vmrnn-rt-{secrets.token_hex(4)}")


# ---------------------------------------------------------------------- processes


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


def stop_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group we started (start_new_session=True), then SIGKILL what is left."""
    if proc is None or not _group_alive(proc):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(proc):
            time.sleep(0.2)
        if not _group_alive(proc):
            break
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(proc: subprocess.Popen) -> bool:
    proc.poll()  # reap the leader: a zombie still counts as a member of its group
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------- a real `mlflow server`


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (lean: 1 worker, no job execution) with a SQLite store in
    `root`; it can be stopped and started again on the same port and store (an outage).

    serve_artifacts=True: the server stores and serves the artifacts (`--artifacts-destination`, as on the
    cluster); False: clients write them to a local folder themselves (`--default-artifact-root`)."""

    def __init__(self, root: Path, port: int | None = None, serve_artifacts: bool = False) -> None:
        self.root = root
        self.port = port or free_port()
        self.serve_artifacts = serve_artifacts
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90.0) -> MlflowServer:
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        artifacts = [
            "--artifacts-destination" if self.serve_artifacts else "--default-artifact-root",
            str(self.root / "artifacts"),
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--workers",
                    "1",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    *artifacts,
                ],
                cwd=self.root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for(
                lambda: http_ok(f"{self.uri}/health"),
                timeout,
                interval=0.3,
                what="mlflow server /health",
                proc=self.proc,
            )
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(
                f"mlflow server did not start: {exc}; its log ({self.log_path}):\n" + self.log_path.read_text()[-3000:]
            ) from None
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Short grace: the server does not exit on SIGTERM while clients keep connections open."""
        stop_group(self.proc, grace=grace)
        self.proc = None


@contextmanager
def running_mlflow_server(root: Path, serve_artifacts: bool = False) -> Iterator[MlflowServer]:
    server = MlflowServer(root, serve_artifacts=serve_artifacts).start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------- Ray


@dataclass
class RayHead:
    """A `ray start --head --block` in its own process group, dashboard and job server on 127.0.0.1."""

    proc: subprocess.Popen
    dashboard_port: int
    temp_dir: Path

    @property
    def address(self) -> str:  # for `ray job` / `ray list --address`
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        """What stopping the head does by itself (tests check that it leaves no process behind)."""
        stop_group(self.proc, grace=20)

    def remove(self) -> None:
        """Stop the head, then kill whatever of this Ray is left (processes naming its temp dir)."""
        self.stop()
        kill_processes_mentioning(str(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(root: Path, env: dict[str, str], num_cpus: int = 2) -> RayHead:
    """A head node of `num_cpus` CPUs and no GPU; returns once its job server answers.

    Every port Ray would otherwise take at a fixed default (GCS 6379, dashboard 8265, its agent 52365, the
    client server 10001) is a free one: another Ray on this machine must not take the job agent's port.
    Its processes get RAY_ADDRESS of this head: Ray's State API, called without an address inside Ray Train's
    detached PlacementGroupCleaner, refuses to guess when several Rays run on one machine (a shared test
    machine; a cluster node runs one), and the cleaner then never exits."""
    gcs_port, dash_port, agent_port, client_port = (free_port() for _ in range(4))
    temp_dir = ray_temp_dir()
    head_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs_port}")
    with open(root / "ray-head.log", "ab") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--num-cpus",
                str(num_cpus),
                "--num-gpus",
                "0",
                "--port",
                str(gcs_port),
                "--dashboard-port",
                str(dash_port),
                "--include-dashboard",
                "true",
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-agent-listen-port",
                str(agent_port),
                "--ray-client-server-port",
                str(client_port),
                "--temp-dir",
                str(temp_dir),
                "--disable-usage-stats",
            ],
            env=head_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    head = RayHead(proc, dash_port, temp_dir)
    try:
        wait_for(
            lambda: ray_job(env, head.address, "list", timeout=30).returncode == 0,
            120,
            interval=2,
            what="the Ray job server",
            proc=proc,
        )
    except (TimeoutError, RuntimeError) as exc:
        head.remove()
        raise RuntimeError(
            f"ray start --head did not come up: {exc}; its log:\n" + (root / "ray-head.log").read_text()[-3000:]
        ) from None
    return head


@contextmanager
def running_ray_head(root: Path, env: dict[str, str], num_cpus: int = 2) -> Iterator[RayHead]:
    head = start_ray_head(root, env, num_cpus)
    try:
        yield head
    finally:
        head.remove()


@contextmanager
def running_local_ray(num_cpus: int = 2) -> Iterator[Path]:
    """`ray.init` of a local Ray in this process (loopback only: conftest sets it) in its own temp dir, with
    the dashboard (Train V2 needs its State API); yields the temp dir. Shut down, and every process of that
    Ray gone, afterwards."""
    import ray  # deferred: only the tests that start Ray pay for the import

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")  # a loaded 2-core machine
    temp_dir = ray_temp_dir()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        _temp_dir=str(temp_dir),
    )
    try:
        yield temp_dir
    finally:
        ray.shutdown()
        kill_processes_mentioning(str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_job(env: dict[str, str], address: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    sub, *rest = args  # `--address` before any `-- entrypoint`
    return subprocess.run(
        [str(BIN / "ray"), "job", sub, "--address", address, *rest],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def job_status(env, address, job_id) -> str:
    proc = ray_job(env, address, "status", job_id, timeout=60)
    out = proc.stdout + proc.stderr
    found = re.search(r"Status for job '[^']*': (\w+)", out)
    if found:
        return found.group(1)
    for pattern, status in (
        (r"Job '[^']*' succeeded", "SUCCEEDED"),
        (r"Job '[^']*' was stopped", "STOPPED"),
        (r"Job '[^']*' failed", "FAILED"),
    ):
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
