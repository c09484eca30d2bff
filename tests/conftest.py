"""Shared test set-up: loopback-only Ray, quiet telemetry, test helpers on sys.path, and fixtures for the
real servers tests start (from tests/procs.py): `mlflow_server`, `local_ray`."""

import os
import sys
from pathlib import Path

import pytest

# Ray listens on 127.0.0.1 only with this set; never send usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

sys.path.insert(0, str(Path(__file__).parent))

from procs import REPO, MlflowServer, running_local_ray, running_mlflow_server  # noqa: E402

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
