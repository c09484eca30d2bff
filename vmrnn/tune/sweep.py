"""A hyper-parameter sweep: Ray Tune + Optuna (TPE) + ASHA over trials that each train VMRNN
data-parallel with a Ray Train TorchTrainer, tracked in MLflow, the winner registered.

`main(spec)` is what every `sweeps/<dataset>.py` calls; see docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import Any

from vmrnn.tune import defaults as D
from vmrnn.tune.spaces import SweepSpec

log = logging.getLogger("vmrnn.tune")
MODEL_URI_TAG = "vmrnn.model_uri"  # set on a run by the training layer once it logged the model


class SweepError(Exception):
    """A mistake in what was asked for: printed as one line, exit status 2."""


# Settings that define a sweep. They are logged on the parent run as params `sweep.<key>`; resuming a
# sweep takes omitted flags from there and refuses flags that contradict them (Tune cannot change a
# running sweep's shape).
SWEEP_SETTINGS = ("dataset", "smoke", "preset", "data_dir", "epochs", "num_samples", "workers_per_trial",
                  "gpus_per_worker", "cpus_per_worker", "trial_cpus", "grace_period", "reduction_factor", "seed",
                  "max_train_batches", "max_val_batches", "points", "overrides")

# Training options the sweep itself sets for every trial: `--set` may not change them.
SWEEP_OWNED = ("dataset", "data_dir", "preset", "epochs", "seed", "tracking", "tracking_uri", "experiment",
               "parent_run_id", "run_key", "run_name", "device")


def build_parser(spec: SweepSpec, prog: str | None = None) -> argparse.ArgumentParser:
    name = spec.dataset
    p = argparse.ArgumentParser(
        prog=prog or f"sweeps/{name}.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(f"""\
            Hyper-parameter sweep of VMRNN on {name}{': ' + spec.description if spec.description else ''}.

            Ray Tune runs Optuna (TPE) trials, the first one the official configuration; ASHA stops weak
            trials early on val_mse; each trial is a Ray Train TorchTrainer training data-parallel.
            MLflow gets one parent run per sweep and one child run per trial; the best model is
            registered as vmrnn-{name} (alias 'champion' if it beats the current one, else 'challenger').

            Without a cluster address it starts a local Ray (127.0.0.1 only, dashboard on); under
            `ray job submit` (or with RAY_ADDRESS / --address) it joins that cluster. Re-running the
            same command with the same --name resumes the sweep."""),
        epilog=textwrap.dedent(f"""\
            examples:
              python sweeps/{name}.py --smoke                  # tiny model, synthetic data, CPU, minutes
              python sweeps/{name}.py --data-dir ./data --num-samples 32 --epochs 50
              ray job submit --working-dir . -- python sweeps/{name}.py --data-dir /shared/data \\
                  --storage-path s3://bucket/sweeps --tracking-uri http://mlflow:5000

            defaults (real sweeps): {spec.num_samples} trials x {spec.epochs} epochs, """
            f"""{spec.workers_per_trial} worker(s) per trial,
            1 GPU per worker when the cluster has GPUs; docs/SWEEPS.md has the details."""))
    g = p.add_argument_group("data and model")
    g.add_argument("--data-dir", metavar="PATH",
                   help="dataset root in the published layout (default: $VMRNN_DATA_DIR or ./data; with "
                        "--smoke: small synthetic data written once to ~/.cache/vmrnn/synthetic)")
    g.add_argument("--smoke", action="store_true", default=None,
                   help=f"smoke sweep: tiny model preset, small synthetic data in the real format (or "
                        f"--data-dir's data), CPU, "
                        f"{D.SMOKE['num_samples']} trials x {D.SMOKE['epochs']} epochs x "
                        f"{D.SMOKE['max_train_batches']} batches; a few minutes on 2 cores")
    g.add_argument("--preset", help="model preset the space's overrides apply to "
                                    f"(default: {spec.resolved_preset(False)}; smoke: "
                                    f"{spec.resolved_preset(True)})")
    g.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="a training option for every trial, as in `vmrnn train --set` (e.g. grad_clip=1.0, "
                        "execution=reference, model.drop_path=0.1, tags.team=x); not the searched keys or what "
                        "the sweep sets itself (dataset, epochs, seed, tracking, ...); log_model=false "
                        "needs --no-register; repeatable")
    g = p.add_argument_group("search")
    g.add_argument("--num-samples", type=int, metavar="N", help="number of trials")
    g.add_argument("--epochs", type=int, metavar="N", help="epochs per trial (ASHA's max_t)")
    g.add_argument("--grace-period", type=int, metavar="N",
                   help="ASHA: epochs every trial gets before it can be stopped (default: epochs // 8, >= 1)")
    g.add_argument("--reduction-factor", type=int, metavar="N",
                   help=f"ASHA: keep the best 1/N at each rung (default {spec.reduction_factor})")
    g.add_argument("--seed", type=int, metavar="N", help="seed of the TPE sampler and of training (default 0)")
    g.add_argument("--point", dest="points", action="append", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="also evaluate this configuration, right after the official one; keys left out take "
                        "the official values; numbers may lie outside the space (e.g. a known good "
                        "configuration, or lr=10 to see how a diverging trial is reported); repeatable")
    g = p.add_argument_group("resources")
    g.add_argument("--workers-per-trial", type=int, metavar="N",
                   help=f"data-parallel Ray Train workers per trial (default {spec.workers_per_trial}; "
                        f"smoke {D.SMOKE['workers_per_trial']})")
    g.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs per worker (default: 1 if the cluster has GPUs, else 0 = CPU training)")
    g.add_argument("--cpus-per-worker", type=float, metavar="C",
                   help="CPUs per worker (default: 1 with GPUs, 0.5 on CPU); each trial's driver adds "
                        "--trial-cpus")
    g.add_argument("--trial-cpus", type=float, metavar="C",
                   help="CPUs reserved for each trial's own actor, which runs the TorchTrainer's controller "
                        "and mostly waits (default 1); lower it to run more trials at once on few CPUs")
    g.add_argument("--max-concurrent", type=int, metavar="N",
                   help="trials at once (default: what the cluster fits: GPUs / (gpus-per-worker x "
                        "workers-per-trial), on CPU CPUs / (trial-cpus + cpus-per-worker x workers-per-trial))")
    g.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to join (default: $RAY_ADDRESS, set by `ray job submit`; without one a "
                        "local Ray is started; 'auto' joins a `ray start` cluster on this machine)")
    g = p.add_argument_group("state and tracking")
    g.add_argument("--name", help="sweep name: Tune experiment name and MLflow tag vmrnn.sweep; the same name "
                                  f"resumes (default: {D.default_sweep_name(name, False)}, smoke: "
                                  f"{D.default_sweep_name(name, True)})")
    g.add_argument("--storage-path", metavar="PATH_OR_URI",
                   help="where Tune and Train keep sweep state and checkpoints: a local path or a cloud URI "
                        "(s3://, gs://, ...); must be shared by all nodes of a multi-node cluster "
                        "(default: $VMRNN_STORAGE_PATH or ~/ray_results)")
    g.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db "
                        "with artifacts in ./mlruns)")
    g.add_argument("--experiment", help=f"MLflow experiment (default: {D.default_experiment(name)})")
    g.add_argument("--no-register", action="store_true",
                   help="do not register the best model in the MLflow Model Registry")
    g.add_argument("--retry-errored", action="store_true",
                   help="when resuming, run failed trials again from their last checkpoint")
    g.add_argument("--verbose", action="store_true",
                   help="stream the Ray workers' logs (training progress per epoch) to this terminal")
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
    from vmrnn.data.remote import is_remote  # the data layer is only needed once a sweep is set up

    if explicit.get("data_dir") and not is_remote(explicit["data_dir"]):  # s3:// etc. stay as they are
        explicit["data_dir"] = os.path.abspath(os.path.expanduser(explicit["data_dir"]))
    smoke = bool(explicit.get("smoke", stored_values.get("smoke", False)))
    if smoke:
        defaults: dict[str, Any] = dict(D.SMOKE)
        defaults["data_dir"] = os.path.join(D.smoke_cache_dir(), f"{spec.dataset}-small-seed0")
    else:
        defaults = {"num_samples": spec.num_samples, "epochs": spec.epochs,
                    "workers_per_trial": spec.workers_per_trial, "gpus_per_worker": None,
                    "cpus_per_worker": None, "trial_cpus": 1.0, "reduction_factor": spec.reduction_factor,
                    "max_train_batches": None, "max_val_batches": None,
                    "data_dir": os.environ.get("VMRNN_DATA_DIR") or "data"}
        if not is_remote(defaults["data_dir"]):
            defaults["data_dir"] = os.path.abspath(os.path.expanduser(defaults["data_dir"]))
    defaults.update({"dataset": spec.dataset, "smoke": smoke, "seed": 0, "points": [], "overrides": [],
                     "preset": spec.resolved_preset(smoke)})
    settings: dict[str, Any] = {}
    conflicts = []
    for key in SWEEP_SETTINGS:
        if key in explicit:
            value = explicit[key]
            if key in stored_values and _json(stored_values[key]) != _json(value) and not (
                    key == "smoke" and not value):
                conflicts.append(f"--{key.replace('_', '-')} {value} (the sweep was started with "
                                 f"{stored_values[key]})")
            settings[key] = value
        elif key in stored_values:
            settings[key] = stored_values[key]
        else:
            settings[key] = defaults.get(key)
    if settings.get("grace_period") is None:
        settings["grace_period"] = (spec.grace_period if not smoke and spec.grace_period
                                    else D.SMOKE["grace_period"] if smoke
                                    else max(1, int(settings["epochs"]) // 8))
    if conflicts:
        raise SweepError("cannot resume this sweep with different settings: " + "; ".join(conflicts)
                         + ". Re-run with the same flags, or start a new sweep with another --name")
    for key in ("epochs", "num_samples", "grace_period", "reduction_factor", "workers_per_trial"):
        if int(settings[key]) < 1 or (key == "reduction_factor" and int(settings[key]) < 2):
            raise SweepError(f"--{key.replace('_', '-')} must be >= {2 if key == 'reduction_factor' else 1}; "
                             f"got {settings[key]}")
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


def extra_points(points: list[dict[str, Any]], space: dict[str, Any], official: dict[str, Any],
                 preset: str) -> tuple[list[dict[str, Any]], list[str]]:
    """--point configurations completed from the official point and checked; also the notes on values
    outside the space (allowed for numbers; a categorical value must be one of its choices)."""
    from ray.tune.search.sample import Categorical

    from vmrnn.tune.spaces import contains, describe, split_params

    out, notes = [], []
    for given in points or []:
        unknown = sorted(set(given) - set(space))
        if unknown:
            raise SweepError(f"--point: unknown key(s) {unknown}; the space has {sorted(space)}")
        point = {**official, **given}
        for key, value in given.items():
            if contains(space[key], value):
                continue
            if isinstance(space[key], Categorical):
                raise SweepError(f"--point: {key}={value!r} is not one of {describe(space[key])}")
            notes.append(f"{key}={value!r} is outside {describe(space[key])}")
        try:
            from vmrnn.models.config import model_config

            model_config(preset, **split_params(point)[1])
        except ImportError:
            pass
        except (KeyError, ValueError) as exc:
            raise SweepError(f"--point {given}: {exc}") from None
        out.append(point)
    return out, notes


def check_data(dataset: str, data_dir: str) -> None:
    """Read one training sample in the driver, as every trial will: unreadable, wrong-shape or missing
    data is one clear error before Ray starts, not a failure of every trial."""
    try:
        from vmrnn.data import build_dataset
        from vmrnn.data.errors import DataError
    except ImportError:
        return
    try:
        build_dataset(dataset, data_dir, "train")[0]
    except DataError as exc:
        raise SweepError(f"the {dataset} data in {data_dir} cannot be used: {exc}") from None


def sweep_overrides(settings: dict[str, Any], space: dict[str, Any], official: dict[str, Any],
                    register: bool) -> dict[str, Any]:
    """`--set` options as a partial training config (checked here, before Ray starts)."""
    items = list(settings.get("overrides") or [])
    if not items:
        return {}
    from vmrnn.train.config import TrainConfig, TrainConfigError, apply_overrides
    from vmrnn.train.tracking import SECRET_RE
    from vmrnn.tune.spaces import split_params

    # The sweep's settings are logged as params of the parent run: no secret may be among them.
    secret = [item.split("=", 1)[0] for item in items if SECRET_RE.search(item.split("=", 1)[0])]
    if secret:
        raise SweepError(f"--set {', '.join(secret)}: a secret-looking option would be logged with the sweep's "
                         "settings; pass secrets through the environment instead")
    try:
        given = apply_overrides({}, items)
    except TrainConfigError as exc:
        raise SweepError(str(exc)) from None
    train, model = split_params({k: v for k, v in official.items() if k in space})
    owned = [k for k in given if k in SWEEP_OWNED or k in train]
    owned += [f"model.{k}" for k in (given.get("model") or {}) if k in model]
    if owned:
        raise SweepError(f"--set {', '.join(owned)}: the sweep sets these itself (searched keys, or "
                         f"{', '.join(SWEEP_OWNED)}); use the sweep's own flags")
    if given.get("log_model") is False and register:
        raise SweepError("--set log_model=false leaves the best trial without a model to register: add "
                         "--no-register, or drop it")
    try:
        TrainConfig.from_dict({**given, "dataset": settings["dataset"], "data_dir": settings["data_dir"],
                               "preset": settings["preset"], "tracking": False})
    except ValueError as exc:
        raise SweepError(f"--set: {exc}") from None
    return given


def check_official_config(dataset: str, settings: dict[str, Any], official: dict[str, Any]) -> None:
    """The official point as a training config, resolved as every trial's will be: a preset built for
    other frames (e.g. --preset mmnist-tiny on taxibj) is refused here rather than failing each trial."""
    try:
        from vmrnn.models import ConfigError
        from vmrnn.train.config import TrainConfig
    except ImportError:
        return
    from vmrnn.tune.spaces import split_params

    train, model = split_params(dict(official))
    try:
        TrainConfig.from_dict({**train, "dataset": dataset, "data_dir": settings["data_dir"],
                               "preset": settings["preset"], "model": model, "tracking": False}).resolved()
    except ConfigError as exc:
        raise SweepError(f"the sweep cannot train {dataset} with preset {settings['preset']!r}: {exc}") from None


def check_local_gpus(settings: dict[str, Any]) -> None:
    """A local Ray gets this machine's GPUs and no more: refuse GPU trials it cannot place before
    starting it (a joined cluster is checked by plan_resources, after connecting)."""
    gpus = settings.get("gpus_per_worker")
    if not gpus or float(gpus) <= 0:
        return
    import torch

    need, have = float(gpus) * int(settings["workers_per_trial"]), torch.cuda.device_count()
    if need > have:
        raise SweepError(f"a trial needs {need:g} GPU(s) ({settings['workers_per_trial']} worker(s) x "
                         f"{float(gpus):g}) but this machine has {have}; pass --gpus-per-worker 0 to train "
                         "on CPUs")


def _storage_path(arg: str | None) -> str:
    path = arg or D.default_storage_path()
    if "://" in path:
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def _tracking_uri(arg: str | None) -> str:
    uri = arg or D.default_tracking_uri()
    try:
        from vmrnn.train.config import absolute_tracking_uri
    except ImportError:
        return uri
    return absolute_tracking_uri(uri)


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts]) if "://" in base else os.path.join(base, *parts)


def data_kind(dataset: str, data_dir: str) -> str:
    """"synthetic" when data_dir holds vmrnn's synthetic stand-in (its marker file), else "real": what the
    registry compares champions on (a model validated on synthetic data never replaces a real one)."""
    try:
        from vmrnn.data.layout import FOLDER, family_of
        from vmrnn.data.synth import MARKER
    except ImportError:
        return "real"
    folder = os.path.join(data_dir, FOLDER[family_of(dataset)])
    return "synthetic" if os.path.isfile(os.path.join(folder, MARKER)) else "real"


def prepare_smoke_data(dataset: str, data_dir: str) -> str:
    """Small synthetic data in the real on-disk layout, written once and reused."""
    marker = os.path.join(data_dir, ".vmrnn-synthetic-complete")
    if not os.path.exists(marker):
        from vmrnn.data.synth import write_synthetic

        os.makedirs(data_dir, exist_ok=True)
        # overwrite: a half-written earlier attempt (vmrnn.data refuses to delete unmarked real data)
        write_synthetic(dataset, data_dir, seed=0, size="small", overwrite=True)
        with open(marker, "w") as f:
            f.write(f"{dataset} small seed=0\n")
    return data_dir


# ---------------------------------------------------------------------------------------- results
@dataclass
class SweepOutcome:
    rows: list
    best: Any  # TrialRow | None
    registration: Any  # Registration | None
    registration_note: str
    interrupted: bool
    plots: dict[str, str]


def _trial_id_from_path(path: str) -> str:
    """Tune's trial folder is <trainable>_<trial_id>_<index>_<params>_<date>."""
    import re

    found = re.search(r"run_trial_([0-9a-f]+)_\d+_", os.path.basename(path.rstrip("/")))
    return found.group(1) if found else os.path.basename(path.rstrip("/"))


def rows_from_results(grid, epochs: int, tracker, sweep: str) -> list:
    from vmrnn.tune.scheduler import epochs_done
    from vmrnn.tune.tracking import TrialRow
    from vmrnn.tune.values import finite_float

    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(str(result.path))
        config = dict(result.config or {})
        history: list[tuple[int, float]] = []
        best_epoch_metrics: dict[str, float] = {}
        df = result.metrics_dataframe
        if df is not None and len(df) and D.METRIC in df.columns:
            ep_col = D.TIME_ATTR if D.TIME_ATTR in df.columns else "training_iteration"
            for ep, val in zip(df[ep_col].tolist(), df[D.METRIC].tolist()):
                if finite_float(val) is not None and finite_float(ep) is not None:
                    history.append((int(ep), float(val)))
            finite = df[df[D.METRIC].notna()]
            if len(finite):
                best_row = finite.loc[finite[D.METRIC].idxmin()]
                best_epoch_metrics = {k: float(best_row[k]) for k in D.REPORTED_METRICS
                                      if k in best_row and finite_float(best_row[k]) is not None}
                best_epoch_metrics[D.TIME_ATTR] = float(best_row.get(D.TIME_ATTR, 0) or 0)
        done = epochs_done(metrics)
        if result.error is not None:
            status = D.TRIAL_FAILED
        elif done is not None and done >= epochs:
            status = D.TRIAL_FINISHED
        elif metrics.get("done"):
            status = D.TRIAL_PRUNED
        elif metrics:
            status = D.TRIAL_RUNNING  # interrupted mid-trial
        else:
            status = D.TRIAL_PENDING
        best = min((v for _, v in history), default=None)
        row = TrialRow(trial_id=trial_id, status=status, params=config,
                       epochs_done=done or 0,
                       best_val_mse=best, best_epoch=int(best_epoch_metrics[D.TIME_ATTR]) + 1
                       if best_epoch_metrics else None,
                       last={k: metrics[k] for k in D.REPORTED_METRICS if k in metrics},
                       history=history,
                       error=(f"{type(result.error).__name__}: {result.error}" if result.error else None))
        row.best_metrics = best_epoch_metrics
        run = tracker.find_trial_run(sweep, trial_id)
        row.mlflow_run_id = run.info.run_id if run else None
        row.model_uri = run.data.tags.get(MODEL_URI_TAG) if run else None
        rows.append(row)
    return rows  # in Tune's order: the order the trials were created


# ------------------------------------------------------------------------------------------- main
def main(spec: SweepSpec, argv: list[str] | None = None) -> int:
    args = build_parser(spec).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "ray.tune", "ray.train", "alembic", "mlflow", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        outcome = run_sweep(spec, args)
    except SweepError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    if outcome.interrupted:
        return 130
    return 0 if outcome.best is not None else 1


def run_sweep(spec: SweepSpec, args: argparse.Namespace) -> SweepOutcome:
    from ray import tune

    from vmrnn.tune import local_ray, spaces
    from vmrnn.tune.progress import ProgressTable, TrialStatusToMLflow, bind_sweep
    from vmrnn.tune.tracking import Tracker
    from vmrnn.tune.trial import TrialSetup, run_trial

    t_start = time.time()
    smoke_flag = bool(args.smoke)
    name = args.name or D.default_sweep_name(spec.dataset, smoke_flag)
    storage_path = _storage_path(args.storage_path)
    exp_path = _join(storage_path, name)
    tracking_uri = _tracking_uri(args.tracking_uri)
    experiment = args.experiment or D.default_experiment(spec.dataset)

    try:  # fail in seconds, naming the URI, when the tracking server is down (bounded client retries)
        from vmrnn.train.tracking import TrackingUnavailable, check_reachable, configure_client_env

        configure_client_env(tracking_uri)
        check_reachable(tracking_uri, hint="")
    except ImportError:
        pass
    except TrackingUnavailable as exc:
        raise SweepError(str(exc)) from None
    if not args.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI") and \
            "working_dir_files" in os.getcwd():
        log.warning("warning: no --tracking-uri under `ray job submit`: MLflow writes to %s, inside the job's "
                    "temporary working dir on the head node; pass --tracking-uri to keep the results",
                    tracking_uri)
    tracker = Tracker(tracking_uri, experiment)
    parent = tracker.find_parent(name)
    settings = resolve_settings(spec, args, dict(parent.data.params) if parent else {})
    smoke = bool(settings["smoke"])
    space = spec.space_for(smoke)
    official = spec.official_for(smoke)
    try:
        spaces.validate(space, official, settings["preset"])
    except Exception as exc:
        raise SweepError(f"the search space of {spec.dataset} cannot be trained with preset "
                         f"{settings['preset']!r}: {exc}") from None
    can_restore = tune.Tuner.can_restore(exp_path)

    from vmrnn.data.remote import is_remote

    smoke_data = os.path.join(D.smoke_cache_dir(), f"{spec.dataset}-small-seed0")
    if smoke and settings["data_dir"] == smoke_data:  # --smoke without --data-dir: synthetic data
        prepare_smoke_data(spec.dataset, settings["data_dir"])
    elif not is_remote(settings["data_dir"]) and not os.path.isdir(settings["data_dir"]):
        raise SweepError(f"data directory {settings['data_dir']} does not exist: pass --data-dir (the "
                         f"dataset root in its published layout), or --smoke for synthetic data")
    check_data(spec.dataset, settings["data_dir"])
    check_official_config(spec.dataset, settings, official)
    points, point_notes = extra_points(settings.get("points") or [], space, official, settings["preset"])
    overrides = sweep_overrides(settings, space, official, register=not args.no_register)
    eval_data = data_kind(spec.dataset, settings["data_dir"])
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be >= 1; got {args.max_concurrent}")
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        check_local_gpus(settings)

    if args.address and args.address.startswith(("http://", "https://")):
        raise SweepError(f"--address {args.address} is a dashboard / job-server URL; give the cluster's GCS "
                         "address (host:6379), 'auto', or submit the script with `ray job submit`")
    cluster = local_ray.connect(args.address, log_to_driver=bool(args.verbose))
    parent_id = None
    try:
        try:
            resources = local_ray.plan_resources(
                cluster, workers_per_trial=int(settings["workers_per_trial"]),
                gpus_per_worker=settings["gpus_per_worker"], cpus_per_worker=settings["cpus_per_worker"],
                max_concurrent=args.max_concurrent, num_samples=int(settings["num_samples"]),
                driver_cpus=float(settings["trial_cpus"]), can_grow=cluster.mode != "local")
        except ValueError as exc:
            raise SweepError(str(exc)) from None

        parent_id, created = tracker.get_or_create_parent(name, tags={
            D.TAG_DATASET: spec.dataset, D.TAG_EVAL_DATA: eval_data,
            "mlflow.note.content": f"VMRNN sweep `{name}` on {spec.dataset}: Optuna TPE + ASHA on "
                                   f"{D.METRIC}; one child run per trial."})
        params = {f"sweep.{k}": _json(settings[k]) for k in SWEEP_SETTINGS}
        params.update(spaces.space_params(space, official))
        params.update({"metric": D.METRIC, "mode": D.MODE, "searcher": "optuna.TPESampler",
                       "scheduler": f"ASHA(time_attr={D.TIME_ATTR})"})
        conflicts = tracker.log_params_once(parent_id, params)
        if conflicts:
            log.warning("sweep %s: params differ from the ones logged when it started (kept the old): %s",
                        name, conflicts)
        tracker.client.set_tag(parent_id, "vmrnn.tune_path", exp_path)
        if created:
            tracker.log_json(parent_id, {k: spaces.describe(v) for k, v in space.items()},
                             "sweep/search_space.json")
            tracker.log_json(parent_id, official, "sweep/official_config.json")

        print(f"sweep {name}: {spec.dataset}, preset {settings['preset']}, {settings['num_samples']} trials "
              f"x {settings['epochs']} epochs (ASHA grace {settings['grace_period']}, "
              f"reduction {settings['reduction_factor']}){' [' + eval_data + ' data]' if smoke else ''}",
              flush=True)
        print(f"  Ray: {cluster.mode} ({cluster.cpus:g} CPU, {cluster.gpus:g} GPU)"
              f"{', dashboard ' + cluster.dashboard_url if cluster.dashboard_url else ''}; "
              f"per trial: {resources.describe()}", flush=True)
        if resources.note:
            print(f"  note: {resources.note}", flush=True)
        elif args.max_concurrent is not None and cluster.mode != "local" and \
                resources.max_concurrent > local_ray.plan_resources(
                    cluster, workers_per_trial=resources.workers, gpus_per_worker=settings["gpus_per_worker"],
                    cpus_per_worker=settings["cpus_per_worker"], max_concurrent=None,
                    num_samples=int(settings["num_samples"]),
                    driver_cpus=float(settings["trial_cpus"])).max_concurrent:
            print(f"  note: --max-concurrent {args.max_concurrent} is more than the cluster fits now: the "
                  "extra trials wait for the autoscaler to add nodes (on a cluster that cannot grow they "
                  "wait until the worker-group start timeout; lower --max-concurrent there)", flush=True)
        print(f"  MLflow: {tracking_uri} experiment {experiment!r}, parent run {parent_id}"
              f"{' (resumed)' if not created else ''}", flush=True)
        print(f"  Tune state: {exp_path}{' (resuming)' if can_restore else ''}", flush=True)
        for point in points:
            given = {k: v for k, v in point.items() if official.get(k) != v}
            print(f"  extra point: {given or 'the official configuration again'}"
                  f"{' (' + '; '.join(point_notes) + ')' if point_notes else ''}", flush=True)

        base = {**overrides, "dataset": spec.dataset, "data_dir": settings["data_dir"], "preset": settings["preset"],
                "epochs": int(settings["epochs"]), "seed": int(settings["seed"]),
                "tracking_uri": tracking_uri, "experiment": experiment, "parent_run_id": parent_id,
                "device": "auto" if resources.use_gpu else "cpu"}
        # Smoke limits, unless --set gave them.
        if settings.get("max_train_batches"):
            base.setdefault("max_train_batches", int(settings["max_train_batches"]))
        if settings.get("max_val_batches"):
            base.setdefault("max_val_batches", int(settings["max_val_batches"]))
            base.setdefault("max_test_batches", int(settings["max_val_batches"]))
        if smoke:
            base.setdefault("n_vis_samples", 2)
        setup = TrialSetup(sweep=name, base=base, num_workers=resources.workers, use_gpu=resources.use_gpu,
                           resources_per_worker=resources.per_worker,
                           train_storage_path=_join(exp_path, "train_runs"),
                           threads_per_worker=max(1, int(resources.per_worker.get("CPU", 1))),
                           tags={D.TAG_DATASET: spec.dataset, D.TAG_EVAL_DATA: eval_data})
        trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup),
                                        {"cpu": resources.driver_cpus})
        epochs = int(settings["epochs"])
        bind_sweep(tracking_uri=tracking_uri, experiment=experiment, sweep=name, parent_run_id=parent_id,
                   epochs=epochs, num_samples=int(settings["num_samples"]))
        if can_restore and args.max_concurrent is not None:
            print("  note: --max-concurrent is fixed when a sweep starts; ignored when resuming", flush=True)
        if can_restore:
            tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=bool(args.retry_errored))
        else:
            if not created:
                print(f"  note: MLflow has sweep {name!r} but Tune has no state at {exp_path} (the driver "
                      "stopped before Tune saved any); starting its trials afresh under the same parent run",
                      flush=True)
            from ray.tune.search.optuna import OptunaSearch

            from vmrnn.tune.scheduler import EpochASHA

            searcher = OptunaSearch(metric=D.METRIC, mode=D.MODE, points_to_evaluate=[dict(official), *points],
                                    seed=int(settings["seed"]))
            scheduler = EpochASHA(epochs=epochs, grace_period=int(settings["grace_period"]),
                                  reduction_factor=int(settings["reduction_factor"]))
            tuner = tune.Tuner(
                trainable, param_space=dict(space),
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                            num_samples=int(settings["num_samples"]),
                                            max_concurrent_trials=resources.max_concurrent),
                run_config=tune.RunConfig(
                    name=name, storage_path=storage_path, verbose=0,
                    failure_config=tune.FailureConfig(max_failures=0),
                    callbacks=[ProgressTable(epochs, int(settings["num_samples"])),
                               TrialStatusToMLflow(tracking_uri, experiment, name, parent_id, epochs)]))
        grid = tuner.fit()
        return finish(spec, name, settings, grid, tracker, parent_id, space, args, t_start, smoke, setup)
    except BaseException as exc:
        if parent_id is not None:
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                tracker.client.set_tag(parent_id, D.TAG_SWEEP_STATUS, "INTERRUPTED" if interrupted else "FAILED")
                tracker.client.set_terminated(parent_id, status="KILLED" if interrupted else "FAILED")
            except Exception:
                pass
        raise
    finally:
        local_ray.shutdown_if_local(cluster)


def finish(spec: SweepSpec, name: str, settings: dict[str, Any], grid, tracker, parent_id: str,
           space: dict[str, Any], args: argparse.Namespace, t_start: float, smoke: bool,
           setup) -> SweepOutcome:
    """After Tuner.fit: honest trial statuses, results table, plots, registry, summary."""
    from vmrnn.tune import registry

    epochs = int(settings["epochs"])
    rows = rows_from_results(grid, epochs, tracker, name)
    for row in rows:
        if row.status in D.MLFLOW_STATUS:
            try:
                run_id = tracker.mark_trial(sweep=name, trial_id=row.trial_id, status=row.status,
                                            parent_run_id=parent_id, error=row.error, params=row.params)
                row.mlflow_run_id = row.mlflow_run_id or run_id
            except Exception as exc:
                log.warning("could not record trial %s in MLflow: %s", row.trial_id, exc)
    orphans = tracker.close_orphans(parent_id, {r.trial_id for r in rows})
    interrupted = any(r.status in (D.TRIAL_RUNNING, D.TRIAL_PENDING) for r in rows) or \
        len(rows) < int(settings["num_samples"])

    tracker.log_results_table(parent_id, rows)
    plots = tracker.log_optuna_plots(parent_id, rows, space)

    # The best trial by its best-epoch val_mse among those whose run holds a model (the training layer
    # logs the best weights when a run ends, so ASHA-pruned trials normally have none).
    scored = sorted((r for r in rows if r.best_val_mse is not None and r.mlflow_run_id
                     and r.status in (D.TRIAL_FINISHED, D.TRIAL_PRUNED)),
                    key=lambda r: (r.status != D.TRIAL_FINISHED, r.best_val_mse))
    candidates = [r for r in scored if r.model_uri]
    best = candidates[0] if candidates else (scored[0] if scored else None)
    registration, note = None, ""
    if best is not None:
        metrics = {f"best_{k}": v for k, v in best.best_metrics.items()}
        metrics["best_val_mse"] = best.best_val_mse
        metrics.update({"trials_finished": sum(r.status == D.TRIAL_FINISHED for r in rows),
                        "trials_pruned": sum(r.status == D.TRIAL_PRUNED for r in rows),
                        "trials_failed": sum(r.status == D.TRIAL_FAILED for r in rows)})
        for key, value in metrics.items():
            tracker.client.log_metric(parent_id, key, float(value))
        tracker.client.set_tag(parent_id, "vmrnn.best_trial_id", best.trial_id)
        tracker.client.set_tag(parent_id, "vmrnn.best_run_id", best.mlflow_run_id)
        conflicts = tracker.log_params_once(parent_id, {f"best.{k}": v for k, v in best.params.items()})
        if conflicts:
            log.warning("the best trial changed since a previous end of this sweep: %s", conflicts)
        tracker.log_json(parent_id, {"trial_id": best.trial_id, "mlflow_run_id": best.mlflow_run_id,
                                     "params": best.params, "metrics": metrics}, "results/best.json")
    if interrupted:
        note = "sweep interrupted: nothing registered yet; re-run the same command to resume"
    elif best is None:
        note = "no trial produced a result: nothing to register"
    elif args.no_register:
        note = "registration skipped (--no-register)"
    elif not candidates:
        note = "no trial logged a model (see the trial runs' vmrnn.failure_reason): nothing to register"
    else:
        errors = []
        for cand in candidates:
            try:
                registration = registry.register_best(
                    tracker.tracking_uri, dataset=spec.dataset, run_id=cand.mlflow_run_id,
                    val_mse=float(cand.best_val_mse), metrics=cand.best_metrics,
                    config=_full_config(setup, cand), sweep=name, trial_id=cand.trial_id,
                    eval_data=data_kind(spec.dataset, settings["data_dir"]))
                if cand is not best:
                    log.warning("the best trial %s has no loadable model (%s); registered trial %s instead",
                                best.trial_id, errors[0] if errors else "?", cand.trial_id)
                best = cand
                break
            except Exception as exc:  # no model logged under that run (e.g. pruned before the first save)
                errors.append(f"{type(exc).__name__}: {exc}")
        if registration is None:
            note = f"could not register any trial's model: {errors[:2]}"
        else:
            tracker.client.set_tag(parent_id, "vmrnn.registered", f"{registration.name}/{registration.version}"
                                                                  f"@{registration.alias}")
    if interrupted:
        tracker.client.set_tag(parent_id, D.TAG_SWEEP_STATUS, "INTERRUPTED")
        tracker.client.set_terminated(parent_id, status="KILLED")
    else:
        tracker.finish_parent(parent_id, "FINISHED" if best is not None else "FAILED",
                              "FINISHED" if best is not None else "FAILED")
    outcome = SweepOutcome(rows=rows, best=best, registration=registration, registration_note=note,
                           interrupted=interrupted, plots=plots)
    print_summary(name, spec.dataset, outcome, tracker, parent_id, orphans, time.time() - t_start)
    return outcome


def _full_config(setup, row) -> dict[str, Any]:
    """The trial's training config (what the registered model was trained with), minus the tracking URI
    (it may hold credentials) and per-run MLflow identity."""
    from vmrnn.tune.trial import trial_train_config

    try:
        d = trial_train_config(setup, row.params, row.trial_id).to_dict()
    except Exception:
        return _config_for_tag(row.params)
    for key in ("tracking_uri", "parent_run_id", "run_key", "run_name", "tags"):
        d.pop(key, None)
    return d


def _config_for_tag(params: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri}"


def print_summary(name: str, dataset: str, outcome: SweepOutcome, tracker, parent_id: str,
                  orphans: list[str], elapsed: float) -> None:
    rows = outcome.rows
    counts = {s: sum(r.status == s for r in rows) for s in
              (D.TRIAL_FINISHED, D.TRIAL_PRUNED, D.TRIAL_FAILED, D.TRIAL_RUNNING, D.TRIAL_PENDING)}
    lines = ["", f"=== sweep {name} ({dataset}) {'interrupted' if outcome.interrupted else 'done'} in "
                 f"{elapsed:.0f} s: " + ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)]
    lines.append(f"  {'trial':<10} {'status':<9} {'epochs':>6} {'best val_mse':>13}  params")
    for r in sorted(rows, key=lambda r: (r.best_val_mse is None, r.best_val_mse or 0)):
        mse = f"{r.best_val_mse:.5g}" if r.best_val_mse is not None else "-"
        params = " ".join(f"{k}={_short(v)}" for k, v in sorted(r.params.items()))
        lines.append(f"  {r.trial_id:<10} {r.status:<9} {r.epochs_done:>6} {mse:>13}  {params}")
        if r.error:
            lines.append(f"  {'':<10} error: {r.error.strip().splitlines()[-1][:200]}")
    best = outcome.best
    if best is not None:
        bm = best.best_metrics
        lines.append(f"best trial {best.trial_id} (best after epoch {best.best_epoch}): " + ", ".join(
            f"{k} {bm[k]:.5g}" for k in D.REPORTED_METRICS if k in bm))
        lines.append("  config: " + json.dumps(_config_for_tag(best.params), sort_keys=True))
        lines.append(f"  MLflow run: {best.mlflow_run_id}")
    if outcome.registration is not None:
        reg = outcome.registration
        if reg.alias == D.CHAMPION:
            lines.append(f"registered: {reg.name} version {reg.version} is the champion ({reg.reason})")
        else:
            lines.append(f"registered: {reg.name} version {reg.version} is a CHALLENGER: {reg.reason}; "
                         f"the champion stays version {reg.previous_champion}")
        lines.append(f"  predict: vmrnn predict --model models:/{reg.name}@{reg.alias} --input x.npy --out y.npy")
    elif outcome.registration_note:
        lines.append(outcome.registration_note)
    for plot, where in outcome.plots.items():
        if where.startswith("skipped"):
            lines.append(f"  plot {plot}: {where}")
    if orphans:
        lines.append(f"  closed {len(orphans)} trial run(s) left RUNNING by an earlier driver: {orphans}")
    lines.append(f"MLflow: parent run {parent_id} in experiment {tracker.experiment!r} "
                 f"(results/trials.parquet, plots/*.png); look with: {_ui_command(tracker.tracking_uri)}")
    print("\n".join(lines), flush=True)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
