"""A hyper-parameter sweep: Ray Tune + Optuna (TPE) + ASHA over trials that each train VMRNN
data-parallel with a Ray Train TorchTrainer, tracked in MLflow, the winner registered.

`main(spec)` is what every `sweeps/<dataset>.py` calls; see docs/SWEEPS.md. It reads as the steps of a
sweep: arguments (args.py), checks before Ray starts (preflight.py), Ray and the parent run, the Tuner
(tuner.py), and the end: statuses, results, registration and summary (results.py, summary.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from vmrnn.tracking import tags
from vmrnn.tracking.sweeps import SweepTracker
from vmrnn.tune import defaults as D
from vmrnn.tune import local_ray, spaces, state
from vmrnn.tune.args import SweepError, SweepPlace, build_parser, resolve_settings, settings_params, sweep_place
from vmrnn.tune.local_ray import ClusterInfo, TrialResources
from vmrnn.tune.preflight import Checked, check_sweep, check_tracking
from vmrnn.tune.spaces import SweepSpec
from vmrnn.tune.summary import SweepOutcome, finish, look_line
from vmrnn.tune.tuner import build_tuner, trial_setup

log = logging.getLogger("vmrnn.tune")


def main(spec: SweepSpec, argv: list[str] | None = None) -> int:
    args = build_parser(spec).parse_args(argv)
    quiet_defaults()
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
    return 0 if outcome.best is not None or outcome.finished_before else 1


def quiet_defaults() -> None:
    """The sweep prints its own header, table and summary; Ray's and MLflow's chatter stays off unless the
    environment asks for it: Tune's own experiment header and progress output (the legacy engine, silent
    at verbose=0) and MLflow's INFO lines (database set-up) in the driver and in the local Ray's workers."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def run_sweep(spec: SweepSpec, args: argparse.Namespace) -> SweepOutcome:
    t_start = time.time()
    place = sweep_place(spec, args)
    check_tracking(place, args)
    tracker = SweepTracker(place.tracking_uri, place.experiment)
    parent = tracker.find_parent(place.name)
    done = state.finished_sweep(parent)
    if done is not None and not (args.retry_errored and state.failed_trials(parent)):
        # Nothing to run: the parent run keeps its metrics, end time and registration as they are.
        print(done.message(), flush=True)
        print(look_line(tracker, done.parent_run_id), flush=True)
        return SweepOutcome.already_finished()
    settings = resolve_settings(spec, args, dict(parent.data.params) if parent else {})
    binding = state.read_binding(place.exp_path)
    can_restore = state.check_agreement(place, parent, state.can_restore(place.exp_path), binding)
    checked = check_sweep(spec, args, settings)

    cluster = local_ray.connect(args.address, log_to_driver=bool(args.verbose))
    parent_id = None
    try:
        try:
            resources = local_ray.plan_resources(
                cluster,
                workers_per_trial=int(settings["workers_per_trial"]),
                gpus_per_worker=settings["gpus_per_worker"],
                cpus_per_worker=settings["cpus_per_worker"],
                max_concurrent=args.max_concurrent,
                num_samples=int(settings["num_samples"]),
                driver_cpus=float(settings["trial_cpus"]),
                can_grow=cluster.mode != "local",
            )
        except ValueError as exc:
            raise SweepError(str(exc)) from None
        parent_id, created = open_parent_run(tracker, spec.dataset, place, settings, checked)
        state.write_binding(place, parent_id, explicit_loggers=state.explicit_loggers(binding, can_restore))
        print_plan(spec.dataset, place, settings, checked, cluster, resources, args, parent_id, created, can_restore)

        setup = trial_setup(spec.dataset, place, settings, checked, resources, parent_id)
        if can_restore and args.max_concurrent is not None:
            print("  note: --max-concurrent is fixed when a sweep starts; ignored when resuming", flush=True)
        if not can_restore and not created:
            print(
                f"  note: MLflow has sweep {place.name!r} but Tune has no state at {place.exp_path} (the driver "
                "stopped before Tune saved any); starting its trials afresh under the same parent run",
                flush=True,
            )
        tuner = build_tuner(
            setup,
            place,
            settings,
            checked,
            resources,
            parent_id,
            restore=can_restore,
            retry_errored=bool(args.retry_errored),
            explicit_loggers=state.explicit_loggers(binding, can_restore),
        )
        grid = tuner.fit()
        return finish(
            grid,
            dataset=spec.dataset,
            place=place,
            settings=settings,
            tracker=tracker,
            parent_id=parent_id,
            space=checked.space,
            setup=setup,
            eval_data=checked.eval_data,
            register=not args.no_register,
            t_start=t_start,
        )
    except BaseException as exc:
        if parent_id is not None:
            interrupted = isinstance(exc, KeyboardInterrupt)
            try:
                tracker.client.set_tag(parent_id, tags.TAG_SWEEP_STATUS, "INTERRUPTED" if interrupted else "FAILED")
                tracker.client.set_terminated(parent_id, status="KILLED" if interrupted else "FAILED")
            except Exception:
                pass
        raise
    finally:
        local_ray.shutdown_if_local(cluster)


def open_parent_run(
    tracker: SweepTracker, dataset: str, place: SweepPlace, settings: dict, checked: Checked
) -> tuple[str, bool]:
    """The sweep's parent run, created or found again (resume), with the settings and the space as params
    (what a resumed sweep reads back). Returns (run_id, created)."""
    parent_id, created = tracker.get_or_create_parent(
        place.name,
        tags={
            tags.TAG_DATASET: dataset,
            tags.TAG_EVAL_DATA: checked.eval_data,
            "mlflow.note.content": f"VMRNN sweep `{place.name}` on {dataset}: Optuna TPE + ASHA on "
            f"{D.METRIC}; one child run per trial.",
        },
    )
    params = settings_params(settings)
    params.update(spaces.space_params(checked.space, checked.official))
    params.update(
        {
            "metric": D.METRIC,
            "mode": D.MODE,
            "searcher": "optuna.TPESampler",
            "scheduler": f"ASHA(time_attr={D.TIME_ATTR})",
        }
    )
    conflicts = tracker.log_params_once(parent_id, params)
    if conflicts:
        log.warning(
            "sweep %s: params differ from the ones logged when it started (kept the old): %s", place.name, conflicts
        )
    tracker.client.set_tag(parent_id, tags.TAG_TUNE_PATH, place.exp_path)
    if created:
        tracker.log_json(
            parent_id, {k: spaces.describe(v) for k, v in checked.space.items()}, "sweep/search_space.json"
        )
        tracker.log_json(parent_id, checked.official, "sweep/official_config.json")
    return parent_id, created


def print_plan(
    dataset: str,
    place: SweepPlace,
    settings: dict,
    checked: Checked,
    cluster: ClusterInfo,
    resources: TrialResources,
    args: argparse.Namespace,
    parent_id: str,
    created: bool,
    can_restore: bool,
) -> None:
    """What the sweep is about to run, and where its results go."""
    smoke = bool(settings["smoke"])
    print(
        f"sweep {place.name}: {dataset}, preset {settings['preset']}, {settings['num_samples']} trials "
        f"x {settings['epochs']} epochs (ASHA grace {settings['grace_period']}, "
        f"reduction {settings['reduction_factor']}){' [' + checked.eval_data + ' data]' if smoke else ''}",
        flush=True,
    )
    print(
        f"  Ray: {cluster.mode} ({cluster.cpus:g} CPU, {cluster.gpus:g} GPU)"
        f"{', dashboard ' + cluster.dashboard_url if cluster.dashboard_url else ''}; "
        f"per trial: {resources.describe()}",
        flush=True,
    )
    if resources.note:
        print(f"  note: {resources.note}", flush=True)
    elif (
        args.max_concurrent is not None
        and cluster.mode != "local"
        and resources.max_concurrent
        > local_ray.plan_resources(
            cluster,
            workers_per_trial=resources.workers,
            gpus_per_worker=settings["gpus_per_worker"],
            cpus_per_worker=settings["cpus_per_worker"],
            max_concurrent=None,
            num_samples=int(settings["num_samples"]),
            driver_cpus=float(settings["trial_cpus"]),
        ).max_concurrent
    ):
        print(
            f"  note: --max-concurrent {args.max_concurrent} is more than the cluster fits now: the "
            "extra trials wait for the autoscaler to add nodes (on a cluster that cannot grow they "
            "wait until the worker-group start timeout; lower --max-concurrent there)",
            flush=True,
        )
    print(
        f"  MLflow: {place.tracking_uri} experiment {place.experiment!r}, parent run {parent_id}"
        f"{' (resumed)' if not created else ''}",
        flush=True,
    )
    print(f"  Tune state: {place.exp_path}{' (resuming)' if can_restore else ''}", flush=True)
    for point in checked.points:
        given = {k: v for k, v in point.items() if checked.official.get(k) != v}
        print(
            f"  extra point: {given or 'the official configuration again'}"
            f"{' (' + '; '.join(checked.point_notes) + ')' if checked.point_notes else ''}",
            flush=True,
        )
