"""What a sweep checks before Ray starts: the MLflow store, the search space, the data, the official point
as a training config, the --point and --set options, the local GPUs. A mistake is one SweepError here,
not a failure of every trial."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from ray.tune.search.sample import Categorical

from vmrnn.data import build_dataset
from vmrnn.data.errors import DataError
from vmrnn.data.registry import get_dataset
from vmrnn.data.remote import is_remote
from vmrnn.data.synth import MARKER, write_synthetic
from vmrnn.models import ConfigError, model_config
from vmrnn.tracking.tags import SECRET_RE
from vmrnn.tracking.uris import TrackingUnavailable, check_reachable, configure_client_env
from vmrnn.train.config import TrainConfig, TrainConfigError, apply_overrides
from vmrnn.tune import defaults as D
from vmrnn.tune import spaces
from vmrnn.tune.args import SWEEP_OWNED, SweepError, SweepPlace
from vmrnn.tune.spaces import SweepSpec

log = logging.getLogger("vmrnn.tune")


@dataclass(frozen=True)
class Checked:
    """What the checks established, for the Tuner and the parent run."""

    space: dict[str, Any]
    official: dict[str, Any]  # the first trial
    points: list[dict[str, Any]]  # --point configurations, completed from the official one
    point_notes: list[str]  # --point values outside the space
    overrides: dict[str, Any]  # --set, as a partial training config
    eval_data: str  # "real" | "synthetic"


def check_tracking(place: SweepPlace, args: argparse.Namespace) -> None:
    """Fail in seconds, naming the URI, when the tracking server is down (bounded client retries)."""
    configure_client_env(place.tracking_uri)
    try:
        check_reachable(place.tracking_uri, hint="")
    except TrackingUnavailable as exc:
        raise SweepError(str(exc)) from None
    if not args.tracking_uri and not os.environ.get("MLFLOW_TRACKING_URI") and "working_dir_files" in os.getcwd():
        log.warning(
            "warning: no --tracking-uri under `ray job submit`: MLflow writes to %s, inside the job's "
            "temporary working dir on the head node; pass --tracking-uri to keep the results",
            place.tracking_uri,
        )


def check_sweep(spec: SweepSpec, args: argparse.Namespace, settings: dict[str, Any]) -> Checked:
    """Every check that needs the settings, in the order a user would fix them."""
    smoke = bool(settings["smoke"])
    space, official = spec.space_for(smoke), spec.official_for(smoke)
    try:
        spaces.validate(space, official, settings["preset"])
    except Exception as exc:
        raise SweepError(
            f"the search space of {spec.dataset} cannot be trained with preset {settings['preset']!r}: {exc}"
        ) from None
    data_dir = settings["data_dir"]
    if smoke and data_dir == D.smoke_data_dir(spec.dataset):  # --smoke without --data-dir: synthetic data
        prepare_smoke_data(spec.dataset, data_dir)
    elif not is_remote(data_dir) and not os.path.isdir(data_dir):  # s3:// etc. are read by check_data
        raise SweepError(
            f"data directory {data_dir} does not exist: pass --data-dir (the "
            f"dataset root in its published layout), or --smoke for synthetic data"
        )
    check_data(spec.dataset, data_dir)
    check_official_config(spec.dataset, settings, official)
    points, point_notes = extra_points(settings.get("points") or [], space, official, settings["preset"])
    overrides = sweep_overrides(settings, space, official, register=not args.no_register)
    eval_data = data_kind(spec.dataset, data_dir)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise SweepError(f"--max-concurrent must be >= 1; got {args.max_concurrent}")
    if not (args.address or os.environ.get("RAY_ADDRESS")):
        check_local_gpus(settings)
    if args.address and args.address.startswith(("http://", "https://")):
        raise SweepError(
            f"--address {args.address} is a dashboard / job-server URL; give the cluster's GCS "
            "address (host:6379), 'auto', or submit the script with `ray job submit`"
        )
    return Checked(
        space=space, official=official, points=points, point_notes=point_notes, overrides=overrides, eval_data=eval_data
    )


def prepare_smoke_data(dataset: str, data_dir: str) -> str:
    """Small synthetic data in the real on-disk layout, written once and reused."""
    marker = os.path.join(data_dir, ".vmrnn-synthetic-complete")
    if not os.path.exists(marker):
        os.makedirs(data_dir, exist_ok=True)
        # overwrite: a half-written earlier attempt (vmrnn.data refuses to delete unmarked real data)
        write_synthetic(dataset, data_dir, seed=0, size="small", overwrite=True)
        with open(marker, "w") as f:
            f.write(f"{dataset} small seed=0\n")
    return data_dir


def check_data(dataset: str, data_dir: str) -> None:
    """Read one training sample in the driver, as every trial will: unreadable, wrong-shape or missing
    data is one clear error before Ray starts, not a failure of every trial."""
    try:
        build_dataset(dataset, data_dir, "train")[0]
    except DataError as exc:
        raise SweepError(f"the {dataset} data in {data_dir} cannot be used: {exc}") from None


def data_kind(dataset: str, data_dir: str) -> str:
    """ "synthetic" when data_dir holds vmrnn's synthetic stand-in (its marker file), else "real": what the
    registry compares champions on (a model validated on synthetic data never replaces a real one)."""
    folder = os.path.join(data_dir, get_dataset(dataset).folder)
    return "synthetic" if os.path.isfile(os.path.join(folder, MARKER)) else "real"


def check_official_config(dataset: str, settings: dict[str, Any], official: dict[str, Any]) -> None:
    """The official point as a training config, resolved as every trial's will be: a preset built for
    other frames (e.g. --preset mmnist-tiny on taxibj) is refused here rather than failing each trial."""
    train, model = spaces.split_params(dict(official))
    try:
        TrainConfig.from_dict(
            {
                **train,
                "dataset": dataset,
                "data_dir": settings["data_dir"],
                "preset": settings["preset"],
                "model": model,
                "tracking": False,
            }
        ).resolved()
    except ConfigError as exc:
        raise SweepError(f"the sweep cannot train {dataset} with preset {settings['preset']!r}: {exc}") from None


def extra_points(
    points: list[dict[str, Any]], space: dict[str, Any], official: dict[str, Any], preset: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """--point configurations completed from the official point and checked; also the notes on values
    outside the space (allowed for numbers; a categorical value must be one of its choices)."""
    out, notes = [], []
    for given in points or []:
        unknown = sorted(set(given) - set(space))
        if unknown:
            raise SweepError(f"--point: unknown key(s) {unknown}; the space has {sorted(space)}")
        point = {**official, **given}
        for key, value in given.items():
            if spaces.contains(space[key], value):
                continue
            if isinstance(space[key], Categorical):
                raise SweepError(f"--point: {key}={value!r} is not one of {spaces.describe(space[key])}")
            notes.append(f"{key}={value!r} is outside {spaces.describe(space[key])}")
        try:
            model_config(preset, **spaces.split_params(point)[1])
        except (KeyError, ValueError) as exc:
            raise SweepError(f"--point {given}: {exc}") from None
        out.append(point)
    return out, notes


def sweep_overrides(
    settings: dict[str, Any], space: dict[str, Any], official: dict[str, Any], register: bool
) -> dict[str, Any]:
    """`--set` options as a partial training config (checked here, before Ray starts)."""
    items = list(settings.get("overrides") or [])
    if not items:
        return {}
    # The sweep's settings are logged as params of the parent run: no secret may be among them.
    secret = [item.split("=", 1)[0] for item in items if SECRET_RE.search(item.split("=", 1)[0])]
    if secret:
        raise SweepError(
            f"--set {', '.join(secret)}: a secret-looking option would be logged with the sweep's "
            "settings; pass secrets through the environment instead"
        )
    try:
        given = apply_overrides({}, items)
    except TrainConfigError as exc:
        raise SweepError(str(exc)) from None
    train, model = spaces.split_params({k: v for k, v in official.items() if k in space})
    owned = [k for k in given if k in SWEEP_OWNED or k in train]
    owned += [f"model.{k}" for k in (given.get("model") or {}) if k in model]
    if owned:
        raise SweepError(
            f"--set {', '.join(owned)}: the sweep sets these itself (searched keys, or "
            f"{', '.join(SWEEP_OWNED)}); use the sweep's own flags"
        )
    if given.get("log_model") is False and register:
        raise SweepError(
            "--set log_model=false leaves the best trial without a model to register: add --no-register, or drop it"
        )
    try:
        TrainConfig.from_dict(
            {
                **given,
                "dataset": settings["dataset"],
                "data_dir": settings["data_dir"],
                "preset": settings["preset"],
                "tracking": False,
            }
        )
    except ValueError as exc:
        raise SweepError(f"--set: {exc}") from None
    return given


def check_local_gpus(settings: dict[str, Any]) -> None:
    """A local Ray gets this machine's GPUs and no more: refuse GPU trials it cannot place before
    starting it (a joined cluster is checked by plan_resources, after connecting)."""
    gpus = settings.get("gpus_per_worker")
    if not gpus or float(gpus) <= 0:
        return
    need, have = float(gpus) * int(settings["workers_per_trial"]), torch.cuda.device_count()
    if need > have:
        raise SweepError(
            f"a trial needs {need:g} GPU(s) ({settings['workers_per_trial']} worker(s) x "
            f"{float(gpus):g}) but this machine has {have}; pass --gpus-per-worker 0 to train "
            "on CPUs"
        )
