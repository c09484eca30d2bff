"""Security: what we start listens on 127.0.0.1 only and keeps Ray's token authentication on;
checkpoints load with `torch.load(weights_only=True)` (a pickled object is refused, never run); nothing
secret-looking reaches MLflow params or tags.

The malicious-checkpoint refusals through every loader and CLI command are cases of
tests/test_reliability_inputs.py; the sweep-level secret scan (environment of every Ray process) is in
tests/test_reliability_sweep.py.
"""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from procs import REPO, kill_processes_mentioning, ray_temp_dir, scrubbed_env, stop_group
from test_train_helpers import tiny_cfg, write_taxibj

# A local Ray started the way `sweeps/*.py` (vmrnn.tune.local_ray.connect) and `vmrnn train`
# (vmrnn.train.ray_train.init_local_ray) start it; it prints its dashboard URL and waits for a line.
_START = {
    "sweeps": "from vmrnn.tune import local_ray; local_ray.connect(num_cpus=1, log_to_driver=False)",
    "vmrnn train": "from vmrnn.train.ray_train import init_local_ray; init_local_ray(num_cpus=1, log_to_driver=False)",
}
_SCRIPT = """
import json, sys
{start}
import ray
from ray._private.worker import get_dashboard_url
print(json.dumps({{"dashboard": get_dashboard_url()}}), flush=True)
sys.stdin.readline()
ray.shutdown()
"""


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _descendants(pid: int) -> set[int]:
    kids, out, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(kids.get(p, []))
    return out


def _listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, local address, port) of every TCP socket in LISTEN state held by `pids` (from /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            hexip, hexport = local.split(":")
            if v6:
                if hexip.startswith("0000000000000000FFFF0000"):  # ::ffff:a.b.c.d, an IPv4-mapped address
                    v4 = hexip[24:]
                    ip = ".".join(str(int(v4[i : i + 2], 16)) for i in (6, 4, 2, 0))
                else:
                    ip = (
                        "::1"
                        if hexip == "00000000000000000000000001000000"
                        else ("::" if set(hexip) == {"0"} else hexip)
                    )
            else:
                ip = ".".join(str(int(hexip[i : i + 2], 16)) for i in (6, 4, 2, 0))
            found.append((inodes[inode], ip, int(hexport, 16)))
    return found


def _http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (loopback)
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("who", sorted(_START))
def test_local_ray_listens_on_loopback_only_and_requires_its_token(who, tmp_path):
    home = tmp_path / "home"  # Ray writes the new cluster's token to ~/.ray/auth_token: ours, not the user's
    home.mkdir()
    ray_tmp = ray_temp_dir()
    env = scrubbed_env(HOME=str(home), PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_tmp))
    for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(k, None)  # the defaults our code starts Ray with, not the test suite's
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT.format(start=_START[who])],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # bounded by the test timeout; the script prints once Ray is up
        assert line, f"{who}: the local Ray did not start"
        dashboard = json.loads(line)["dashboard"]
        dashboard = dashboard if "://" in dashboard else f"http://{dashboard}"
        time.sleep(2)  # every Ray process has opened its ports by now
        sockets = _listening(_descendants(proc.pid))
        assert len(sockets) >= 3, sockets  # GCS, raylet, dashboard, ... were found
        exposed = [s for s in sockets if s[1] not in ("127.0.0.1", "::1")]
        assert exposed == [], f"{who}: Ray listens beyond loopback: {exposed}"
        # Token authentication is on: the dashboard / job API refuses a request without the token.
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert _http_status(f"{dashboard}/api/jobs/") == 401
        assert _http_status(f"{dashboard}/api/jobs/", token="not-the-token") in (401, 403)
        assert _http_status(f"{dashboard}/api/jobs/", token=token) == 200
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        stop_group(proc)
        kill_processes_mentioning(str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _torch_load_calls(root: Path) -> list[tuple[str, int, bool]]:
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                out.append((str(path.relative_to(REPO)), node.lineno, safe))
    return out


def test_every_torch_load_is_weights_only_and_nothing_binds_all_interfaces():
    calls = _torch_load_calls(REPO / "vmrnn") + _torch_load_calls(REPO / "sweeps")
    assert calls, "the checkpoint loaders were found"
    assert [c for c in calls if not c[2]] == []
    # No code path of ours (package, sweep scripts) binds a server to every interface.
    for root in (REPO / "vmrnn", REPO / "sweeps"):
        for path in root.rglob("*.py"):
            assert "0.0.0.0" not in path.read_text(), path


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_no_secret_reaches_mlflow_params_or_tags(tmp_path, monkeypatch, mlflow_server):
    """Secret-looking environment variables, config tags and URI credentials of a real training run
    against a real `mlflow server`: none of their values (or the variables' names) is a param or tag."""
    from mlflow.tracking import MlflowClient

    from vmrnn.train.loop import train

    canary = secrets.token_hex(6)
    env = {
        "AWS_SECRET_ACCESS_KEY": f"aws-{canary}",
        "VMRNN_TEST_TOKEN": f"tok-{canary}",
        "DB_PASSWORD": f"pw-{canary}",
        "VMRNN_TEST_API_KEY": f"key-{canary}",
        "MLFLOW_TRACKING_PASSWORD": f"mlpw-{canary}",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    uri = mlflow_server.uri.replace("http://", f"http://vmrnn:uri-{canary}@")  # credentials in the URI
    data = write_taxibj(tmp_path / "data")
    cfg = tiny_cfg(
        data,
        epochs=1,
        max_train_batches=1,
        tracking=True,
        tracking_uri=uri,
        experiment="t-sec",
        log_model=False,
        log_images=False,
        checkpoint_dir=str(tmp_path / "ck"),
        tags={"team": "vision", "api_token": f"tag-{canary}", "db_passwd": f"tagpw-{canary}"},
        data_options={"val_fraction": 0.1},
    )
    res = train(cfg)
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(res.run_id)
    items = [("param", k, v) for k, v in run.data.params.items()] + [("tag", k, v) for k, v in run.data.tags.items()]
    assert run.data.params["tags.team"] == "vision"  # ordinary values are logged ...
    assert run.data.params["tags.api_token"] == "***" and run.data.tags["api_token"] == "***"  # ... these not
    assert run.data.tags["db_passwd"] == "***"
    leaked = [f"{kind} {k}={v[:60]}" for kind, k, v in items if canary in v or canary in k or k.upper() in env]
    assert leaked == []
    assert "vmrnn:" not in run.data.params["tracking_uri"] and "@" not in run.data.params["tracking_uri"]
