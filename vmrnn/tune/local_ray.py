"""Start a local loopback Ray or join a cluster, and size a sweep to what the cluster has."""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import ray
from ray._private import ray_constants

import vmrnn


@dataclass(frozen=True)
class ClusterInfo:
    mode: str  # "local" (started here) | "cluster" (joined)
    address: str
    dashboard_url: str | None
    cpus: float
    gpus: float


def _package_root() -> str:
    """The directory that holds the imported `vmrnn` package (the repo root for a checkout)."""
    return str(Path(vmrnn.__file__).resolve().parent.parent)


def connect(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True) -> ClusterInfo:
    """Join the cluster at `address` / $RAY_ADDRESS (set by `ray job submit`), else start a local one.

    A local Ray listens on 127.0.0.1 only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), keeps its dashboard on
    (Train V2 cleans up placement groups through the State API it serves) and sends no usage stats
    unless told to. Its workers get this checkout on PYTHONPATH, so they import the same `vmrnn`.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    context = None
    if ray.is_initialized():
        mode = "cluster" if address else "local"
    elif address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
        mode = "cluster"
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Nothing preempts this machine's own Ray: skip Train's per-trial preemption-watcher actor.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # Train's controller sees a started worker group, an epoch's report (which Tune and ASHA wait
        # for) and a finished run only when it polls its workers (every 2 s by default): poll more often.
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Every trial starts ~7 worker processes (its actor, a queue, Train's controller, helpers, workers);
        # the raylet starts at most one per CPU at a time and warns once 4x that many exist. A few trials
        # at once on few CPUs are normal for a sweep: let more start together, and no warning for it.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(max(8, os.cpu_count() or 1)))
        if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].strip().lower() in ("0", "false"):
            # Ray read this variable when it was imported (before we could set it): tell this process
            # too, so that the node it starts takes 127.0.0.1 as its address, like its children will.
            ray_constants.ENABLE_RAY_CLUSTER = False
        root = _package_root()
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
        # address="local": always a fresh instance, never an unrelated `ray start` found in /tmp/ray.
        context = ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            dashboard_port=_dashboard_port(),
            log_to_driver=log_to_driver,
            logging_level=logging.WARNING,  # the sweep's header names the dashboard: no "Started a local Ray"
        )
        mode = "local"
    res = ray.cluster_resources()
    dashboard = getattr(context, "dashboard_url", None) or None
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    gcs = getattr(context, "address_info", {}).get("gcs_address") if context is not None else None
    return ClusterInfo(
        mode=mode,
        address=str(gcs or address or "local"),
        dashboard_url=dashboard,
        cpus=float(res.get("CPU", 0.0)),
        gpus=float(res.get("GPU", 0.0)),
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _dashboard_port() -> int:
    """Ray's usual 8265, or a free port when another Ray on this machine holds it."""
    if _port_free(8265):
        return 8265
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_if_local(info: ClusterInfo | None) -> None:
    if info is not None and info.mode == "local" and ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class TrialResources:
    workers: int
    use_gpu: bool
    per_worker: dict[str, float]  # Ray Train resources_per_worker
    driver_cpus: float  # the Tune trial's own actor (it runs the TorchTrainer's fit)
    max_concurrent: int
    note: str = ""  # why max_concurrent differs from what was asked

    def describe(self) -> str:
        per = ", ".join(f"{v:g} {k}" for k, v in self.per_worker.items())
        return (
            f"{self.workers} worker(s) x ({per}) + {self.driver_cpus:g} CPU trial driver; "
            f"{self.max_concurrent} trial(s) at a time"
        )


def plan_resources(
    cluster: ClusterInfo,
    *,
    workers_per_trial: int,
    gpus_per_worker: float | None,
    cpus_per_worker: float | None,
    max_concurrent: int | None,
    num_samples: int,
    driver_cpus: float = 1.0,
    can_grow: bool = True,
) -> TrialResources:
    """Per-trial resources and how many trials fit at once.

    GPUs: concurrency = floor(cluster GPUs / (gpus_per_worker x workers_per_trial)), also bounded by the
    CPUs (each trial needs its driver CPU plus cpus_per_worker per worker). CPU only: from the CPUs,
    counting the trial driver's CPU. An explicit max_concurrent wins on a cluster that `can_grow`
    (autoscaling: the extra trials' workers bring nodes up); on one that cannot (a local Ray) it is
    capped to what fits, because Tune reserves only each trial's driver CPU: trials started beyond what
    fits would hold the CPUs that the running trials' workers wait for, and every trial would hang.
    Never more than num_samples.
    """
    if workers_per_trial < 1:
        raise ValueError(f"--workers-per-trial must be >= 1; got {workers_per_trial}")
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if cluster.gpus >= 1 else 0.0
    use_gpu = gpus_per_worker > 0
    if use_gpu and cluster.gpus < gpus_per_worker * workers_per_trial:
        raise ValueError(
            f"a trial needs {gpus_per_worker * workers_per_trial:g} GPU(s) "
            f"({workers_per_trial} worker(s) x {gpus_per_worker:g}) but the cluster has "
            f"{cluster.gpus:g}; pass --gpus-per-worker 0 to train on CPUs"
        )
    if cpus_per_worker is None:
        cpus_per_worker = 1.0 if use_gpu else 0.5
    per_worker: dict[str, float] = {"CPU": float(cpus_per_worker)}
    if use_gpu:
        per_worker["GPU"] = float(gpus_per_worker)
    cpu_per_trial = driver_cpus + cpus_per_worker * workers_per_trial
    if cluster.cpus < cpu_per_trial:
        raise ValueError(
            f"a trial needs {cpu_per_trial:g} CPU(s) ({driver_cpus:g} for its driver + "
            f"{workers_per_trial} worker(s) x {cpus_per_worker:g}) but the cluster has "
            f"{cluster.cpus:g}; lower --workers-per-trial, --cpus-per-worker or --trial-cpus"
        )
    fits = math.floor(cluster.cpus / cpu_per_trial + 1e-9)
    if use_gpu:
        fits = min(fits, math.floor(cluster.gpus / (gpus_per_worker * workers_per_trial) + 1e-9))
    note = ""
    if max_concurrent is not None:
        if max_concurrent < 1:
            raise ValueError(f"--max-concurrent must be >= 1; got {max_concurrent}")
        if max_concurrent > fits and not can_grow:
            note = (
                f"--max-concurrent {max_concurrent}: this Ray has {cluster.cpus:g} CPU / {cluster.gpus:g} GPU "
                f"and cannot grow, so {max(1, fits)} trial(s) run at a time (each needs {cpu_per_trial:g} "
                "CPUs); the others wait in Tune's queue"
            )
        else:
            fits = max_concurrent
    return TrialResources(
        workers=workers_per_trial,
        use_gpu=use_gpu,
        per_worker=per_worker,
        driver_cpus=driver_cpus,
        max_concurrent=max(1, min(fits, num_samples)),
        note=note,
    )
