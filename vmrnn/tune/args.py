"""A sweep's arguments: the command line, the settings a sweep is started (and resumed) with, and where
its state lives (Tune's experiment folder, the MLflow store)."""

from __future__ import annotations

import argparse
import json
import os
import textwrap
from dataclasses import dataclass
from typing import Any

from vmrnn import commands
from vmrnn.data.remote import is_remote
from vmrnn.tracking import experiments, uris
from vmrnn.tracking.uris import absolute_tracking_uri
from vmrnn.tune import defaults as D
from vmrnn.tune.spaces import SweepSpec


class SweepError(Exception):
    """A mistake in what was asked for: printed as one line, exit status 2."""


# Settings that define a sweep. They are logged on the parent run as params `sweep.<key>`; resuming a
# sweep takes omitted flags from there and refuses flags that contradict them (Tune cannot change a
# running sweep's shape).
SWEEP_SETTINGS = (
    "dataset",
    "smoke",
    "preset",
    "data_dir",
    "epochs",
    "num_samples",
    "workers_per_trial",
    "gpus_per_worker",
    "cpus_per_worker",
    "trial_cpus",
    "grace_period",
    "reduction_factor",
    "seed",
    "max_train_batches",
    "max_val_batches",
    "points",
    "overrides",
)

# Training options the sweep itself sets for every trial: `--set` may not change them.
SWEEP_OWNED = (
    "dataset",
    "data_dir",
    "preset",
    "epochs",
    "seed",
    "tracking",
    "tracking_uri",
    "experiment",
    "parent_run_id",
    "run_key",
    "run_name",
    "device",
)


def build_parser(spec: SweepSpec, prog: str | None = None) -> argparse.ArgumentParser:
    name = spec.dataset
    py, ray = commands.python(), commands.tool("ray")  # as the user's shell runs them (a venv not activated)
    p = argparse.ArgumentParser(
        prog=prog or f"sweeps/{name}.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Hyper-parameter sweep of VMRNN on {name}{": " + spec.description if spec.description else ""}.

            Ray Tune runs Optuna (TPE) trials, the first one the official configuration; ASHA stops weak
            trials early on val_mse; each trial is a Ray Train TorchTrainer training data-parallel.
            MLflow gets one parent run per sweep and one child run per trial; the best model is
            registered as vmrnn-{name} (alias 'champion' if it beats the current one, else 'challenger').

            Without a cluster address it starts a local Ray (127.0.0.1 only, dashboard on); under
            `ray job submit` (or with RAY_ADDRESS / --address) it joins that cluster. Re-running the
            same command with the same --name resumes the sweep."""),
        epilog=textwrap.dedent(
            f"""\
            examples:
              {py} sweeps/{name}.py --smoke                  # tiny model, synthetic data, CPU, minutes
              {py} sweeps/{name}.py --data-dir ./data --num-samples 32 --epochs 50
              {ray} job submit --working-dir . -- python sweeps/{name}.py --data-dir /shared/data \\
                  --storage-path s3://bucket/sweeps --tracking-uri http://mlflow:5000

            defaults (real sweeps): {spec.num_samples} trials x {spec.epochs} epochs, """
            f"""{spec.workers_per_trial} worker(s) per trial,
            1 GPU per worker when the cluster has GPUs; docs/SWEEPS.md has the details."""
        ),
    )
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data-dir",
        metavar="PATH",
        help="dataset root in the published layout (default: $VMRNN_DATA_DIR or ./data; with "
        "--smoke: small synthetic data written once to ~/.cache/vmrnn/synthetic)",
    )
    g.add_argument(
        "--smoke",
        action="store_true",
        default=None,
        help=f"smoke sweep: tiny model preset, small synthetic data in the real format (or "
        f"--data-dir's data), CPU, "
        f"{D.SMOKE['num_samples']} trials x {D.SMOKE['epochs']} epochs x "
        f"{D.SMOKE['max_train_batches']} batches; a few minutes on 2 cores",
    )
    g.add_argument(
        "--preset",
        help="model preset the space's overrides apply to "
        f"(default: {spec.resolved_preset(False)}; smoke: "
        f"{spec.resolved_preset(True)})",
    )
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        metavar="KEY=VALUE",
        help="a training option for every trial, as in `vmrnn train --set` (e.g. grad_clip=1.0, "
        "execution=reference, model.drop_path=0.1, tags.team=x); not the searched keys or what "
        "the sweep sets itself (dataset, epochs, seed, tracking, ...); log_model=false "
        "needs --no-register; repeatable",
    )
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, metavar="N", help="number of trials")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs per trial (ASHA's max_t)")
    g.add_argument(
        "--grace-period",
        type=int,
        metavar="N",
        help="ASHA: epochs every trial gets before it can be stopped (default: epochs // 8, >= 1)",
    )
    g.add_argument(
        "--reduction-factor",
        type=int,
        metavar="N",
        help=f"ASHA: keep the best 1/N at each rung (default {spec.reduction_factor})",
    )
    g.add_argument("--seed", type=int, metavar="N", help="seed of the TPE sampler and of training (default 0)")
    g.add_argument(
        "--point",
        dest="points",
        action="append",
        metavar="KEY=VALUE[,KEY=VALUE...]",
        help="also evaluate this configuration, right after the official one; keys left out take "
        "the official values; numbers may lie outside the space (e.g. a known good "
        "configuration, or lr=10 to see how a diverging trial is reported); repeatable",
    )
    g = p.add_argument_group("resources")
    g.add_argument(
        "--workers-per-trial",
        type=int,
        metavar="N",
        help=f"data-parallel Ray Train workers per trial (default {spec.workers_per_trial}; "
        f"smoke {D.SMOKE['workers_per_trial']})",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        metavar="G",
        help="GPUs per worker (default: 1 if the cluster has GPUs, else 0 = CPU training)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        metavar="C",
        help=f"CPUs per worker (default: 1 with GPUs, 0.5 on CPU, smoke {D.SMOKE['cpus_per_worker']:g}); each "
        "trial's driver adds --trial-cpus",
    )
    g.add_argument(
        "--trial-cpus",
        type=float,
        metavar="C",
        help="CPUs reserved for each trial's own actor, which runs the TorchTrainer's controller "
        f"and mostly waits (default 1, smoke {D.SMOKE['trial_cpus']:g}); lower it to run more trials at once on "
        "few CPUs",
    )
    g.add_argument(
        "--max-concurrent",
        type=int,
        metavar="N",
        help="trials at once (default: what the cluster fits: GPUs / (gpus-per-worker x "
        "workers-per-trial), on CPU CPUs / (trial-cpus + cpus-per-worker x workers-per-trial))",
    )
    g.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster to join (default: $RAY_ADDRESS, set by `ray job submit`; without one a "
        "local Ray is started; 'auto' joins a `ray start` cluster on this machine)",
    )
    g = p.add_argument_group("state and tracking")
    g.add_argument(
        "--name",
        help="sweep name: Tune experiment name and MLflow tag vmrnn.sweep; the same name "
        f"resumes (default: {D.default_sweep_name(name, False)}, smoke: "
        f"{D.default_sweep_name(name, True)})",
    )
    g.add_argument(
        "--storage-path",
        metavar="PATH_OR_URI",
        help="where Tune and Train keep sweep state and checkpoints: a local path or a cloud URI "
        "(s3://, gs://, ...); must be shared by all nodes of a multi-node cluster "
        "(default: $VMRNN_STORAGE_PATH, else ray_results beside a local MLflow store, e.g. "
        "./ray_results beside ./mlflow.db, else ~/ray_results)",
    )
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db "
        "with artifacts in ./mlruns)",
    )
    g.add_argument("--experiment", help=f"MLflow experiment (default: {experiments.default_experiment(name)})")
    g.add_argument(
        "--no-register", action="store_true", help="do not register the best model in the MLflow Model Registry"
    )
    g.add_argument(
        "--retry-errored", action="store_true", help="when resuming, run failed trials again from their last checkpoint"
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="stream the Ray workers' logs (training progress per epoch) to this terminal",
    )
    return p


# --------------------------------------------------------------------------------------------- settings
def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def resolve_settings(spec: SweepSpec, args: argparse.Namespace, stored: dict[str, str]) -> dict[str, Any]:
    """Flags, else what the sweep was started with (resume), else the defaults; conflicts are errors."""
    stored_values = {}
    for key in SWEEP_SETTINGS:
        if f"sweep.{key}" in stored:
            try:
                stored_values[key] = json.loads(stored[f"sweep.{key}"])
            except json.JSONDecodeError:
                stored_values[key] = stored[f"sweep.{key}"]
    explicit = {k: getattr(args, k) for k in SWEEP_SETTINGS if getattr(args, k, None) is not None}
    if explicit.get("points") is not None:
        explicit["points"] = [parse_point(p) for p in explicit["points"]]
    if explicit.get("data_dir") and not is_remote(explicit["data_dir"]):  # s3:// etc. stay as they are
        explicit["data_dir"] = os.path.abspath(os.path.expanduser(explicit["data_dir"]))
    smoke = bool(explicit.get("smoke", stored_values.get("smoke", False)))
    if smoke:
        defaults: dict[str, Any] = dict(D.SMOKE)
        defaults["data_dir"] = D.smoke_data_dir(spec.dataset)
    else:
        defaults = {
            "num_samples": spec.num_samples,
            "epochs": spec.epochs,
            "workers_per_trial": spec.workers_per_trial,
            "gpus_per_worker": None,
            "cpus_per_worker": None,
            "trial_cpus": 1.0,
            "reduction_factor": spec.reduction_factor,
            "max_train_batches": None,
            "max_val_batches": None,
            "data_dir": os.environ.get("VMRNN_DATA_DIR") or "data",
        }
        if not is_remote(defaults["data_dir"]):
            defaults["data_dir"] = os.path.abspath(os.path.expanduser(defaults["data_dir"]))
    defaults.update(
        {
            "dataset": spec.dataset,
            "smoke": smoke,
            "seed": 0,
            "points": [],
            "overrides": [],
            "preset": spec.resolved_preset(smoke),
        }
    )
    settings: dict[str, Any] = {}
    conflicts = []
    for key in SWEEP_SETTINGS:
        if key in explicit:
            value = explicit[key]
            if (
                key in stored_values
                and _json(stored_values[key]) != _json(value)
                and not (key == "smoke" and not value)
            ):
                conflicts.append(f"--{key.replace('_', '-')} {value} (the sweep was started with {stored_values[key]})")
            settings[key] = value
        elif key in stored_values:
            settings[key] = stored_values[key]
        else:
            settings[key] = defaults.get(key)
    if settings.get("grace_period") is None:
        settings["grace_period"] = (
            spec.grace_period
            if not smoke and spec.grace_period
            else D.SMOKE["grace_period"]
            if smoke
            else max(1, int(settings["epochs"]) // 8)
        )
    if conflicts:
        raise SweepError(
            "cannot resume this sweep with different settings: "
            + "; ".join(conflicts)
            + ". Re-run with the same flags, or start a new sweep with another --name"
        )
    for key in ("epochs", "num_samples", "grace_period", "reduction_factor", "workers_per_trial"):
        if int(settings[key]) < 1 or (key == "reduction_factor" and int(settings[key]) < 2):
            raise SweepError(
                f"--{key.replace('_', '-')} must be >= {2 if key == 'reduction_factor' else 1}; got {settings[key]}"
            )
    settings["grace_period"] = min(int(settings["grace_period"]), int(settings["epochs"]))
    if settings.get("cpus_per_worker") is not None and not float(settings["cpus_per_worker"]) > 0:
        raise SweepError(f"--cpus-per-worker must be > 0; got {settings['cpus_per_worker']}")
    if settings.get("trial_cpus") is None:  # a sweep started before the flag existed
        settings["trial_cpus"] = 1.0
    if not float(settings["trial_cpus"]) > 0:
        raise SweepError(f"--trial-cpus must be > 0; got {settings['trial_cpus']}")
    if settings.get("gpus_per_worker") is not None and not float(settings["gpus_per_worker"]) >= 0:
        raise SweepError(f"--gpus-per-worker must be >= 0; got {settings['gpus_per_worker']}")
    return settings


def parse_point(text: str) -> dict[str, Any]:
    """'lr=1e-3,depth=4' -> {'lr': 0.001, 'depth': 4} (ints, floats, else strings)."""
    point: dict[str, Any] = {}
    for item in (x for x in str(text).split(",") if x.strip()):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise SweepError(f"--point expects KEY=VALUE[,KEY=VALUE...]; got {text!r}")
        raw = raw.strip()
        for cast in (int, float):
            try:
                value: Any = cast(raw)
                break
            except ValueError:
                continue
        else:
            value = raw
        point[key.strip()] = value
    if not point:
        raise SweepError(f"--point expects KEY=VALUE[,KEY=VALUE...]; got {text!r}")
    return point


def settings_params(settings: dict[str, Any]) -> dict[str, str]:
    """The settings as the parent run's params (what a resumed sweep reads back)."""
    return {f"sweep.{k}": _json(settings[k]) for k in SWEEP_SETTINGS}


# ---------------------------------------------------------------------------------------------- where
@dataclass(frozen=True)
class SweepPlace:
    """Where a sweep keeps its state; the same --name (and storage) finds it again to resume."""

    name: str  # Tune experiment name and MLflow tag vmrnn.sweep
    storage_path: str  # a local path or a cloud URI
    exp_path: str  # <storage_path>/<name>: Tune's experiment folder
    tracking_uri: str
    experiment: str  # MLflow experiment


def sweep_place(spec: SweepSpec, args: argparse.Namespace) -> SweepPlace:
    tracking_uri = absolute_tracking_uri(args.tracking_uri or uris.default_tracking_uri())
    storage = args.storage_path or D.default_storage_path(tracking_uri)
    storage = storage.rstrip("/") if "://" in storage else os.path.abspath(os.path.expanduser(storage))
    name = args.name or D.default_sweep_name(spec.dataset, bool(args.smoke))
    return SweepPlace(
        name=name,
        storage_path=storage,
        exp_path=join(storage, name),
        tracking_uri=tracking_uri,
        experiment=args.experiment or experiments.default_experiment(spec.dataset),
    )


def join(base: str, *parts: str) -> str:
    """os.path.join, or '/' for a cloud URI."""
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)
