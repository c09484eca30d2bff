"""Sweep machinery without starting Ray: search spaces of the three entry scripts, settings on resume,
resource planning, the epoch-based ASHA, and the results table / Optuna study built from trial rows."""

import argparse
import runpy

import pytest
from ray import tune
from ray.tune.schedulers import TrialScheduler

from conftest import REPO
from vmrnn.tracking.sweep_plots import study_from_rows
from vmrnn.tracking.sweeps import TrialRow
from vmrnn.tune import defaults as D
from vmrnn.tune import spaces
from vmrnn.tune.args import SweepError, build_parser, resolve_settings
from vmrnn.tune.local_ray import ClusterInfo, plan_resources
from vmrnn.tune.scheduler import EpochASHA, epochs_done

SPECS = {name: runpy.run_path(str(REPO / "sweeps" / f"{name}.py"))["SPEC"] for name in ("taxibj", "kth", "mmnist")}


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("smoke", [False, True])
def test_every_space_is_trainable_and_holds_its_official_point(name, smoke):
    spec = SPECS[name]
    space, official = spec.space_for(smoke), spec.official_for(smoke)
    spaces.validate(space, official, spec.resolved_preset(smoke))  # every model combination builds
    for key in ("lr", "warmup_epochs", "weight_decay", "batch_size", "embed_dim", "d_state", "patch_size", "drop_path"):
        assert key in space
    assert ("depths" if name == "mmnist" else "depth") in space
    from vmrnn.models import get_preset

    if not smoke:  # the official point is the preset's published configuration
        cfg = get_preset(spec.resolved_preset(False)).config
        _, model = spaces.split_params(official)
        assert all(getattr(cfg, k) == v for k, v in model.items())


def test_split_params_and_depths():
    train, model = spaces.split_params({"lr": 1e-3, "batch_size": 4, "depths": "2,6/6,2", "embed_dim": 64})
    assert train == {"lr": 1e-3, "batch_size": 4}
    assert model == {"depths_down": (2, 6), "depths_up": (6, 2), "embed_dim": 64}
    with pytest.raises(KeyError):
        spaces.split_params({"momentum": 0.9})
    with pytest.raises(ValueError):
        spaces.decode_depths("2,2")


def test_an_untrainable_space_is_refused_early():
    space = {"embed_dim": tune.choice([16, 24]), "patch_size": tune.choice([4])}
    with pytest.raises(Exception, match="multiple of 16"):
        spaces.validate(space, {"embed_dim": 16, "patch_size": 4}, "taxibj-tiny")
    with pytest.raises(ValueError, match="outside"):
        spaces.validate({"lr": tune.loguniform(1e-4, 1e-3)}, {"lr": 1.0}, "taxibj-tiny")
    assert spaces.describe(tune.loguniform(1e-4, 1e-2)) == "loguniform(0.0001, 0.01)"
    assert spaces.describe(tune.randint(0, 6)) == "randint(0, 6)"


def _args(**kw):
    args = build_parser(SPECS["taxibj"]).parse_args([])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_settings_defaults_smoke_and_resume():
    spec = SPECS["taxibj"]
    s = resolve_settings(spec, _args(smoke=True), {})
    assert (s["epochs"], s["num_samples"], s["workers_per_trial"], s["preset"]) == (2, 3, 2, "taxibj-tiny")
    assert s["data_dir"].endswith("taxibj-small-seed0")
    # 2 cores run two smoke trials at once (1 CPU each: the driver's 0.5 and 2 workers x 0.25).
    plan = plan_resources(
        ClusterInfo("local", "x", None, cpus=2, gpus=0),
        workers_per_trial=s["workers_per_trial"],
        gpus_per_worker=s["gpus_per_worker"],
        cpus_per_worker=s["cpus_per_worker"],
        max_concurrent=None,
        num_samples=s["num_samples"],
        driver_cpus=s["trial_cpus"],
    )
    assert plan.max_concurrent == 2 and plan.per_worker == {"CPU": 0.25}
    real = resolve_settings(spec, _args(data_dir="/data"), {})
    assert (real["epochs"], real["num_samples"], real["grace_period"], real["preset"]) == (50, 32, 6, "taxibj")
    # Resuming: omitted flags come from the parent run's params; contradicting ones are refused.
    stored = {f"sweep.{k}": __import__("json").dumps(v) for k, v in s.items()}
    again = resolve_settings(spec, _args(), stored)
    assert again == s
    with pytest.raises(SweepError, match="--epochs 5"):
        resolve_settings(spec, _args(epochs=5), stored)
    with pytest.raises(SweepError, match="reduction-factor"):
        resolve_settings(spec, _args(reduction_factor=1), {})


def test_resource_plan():
    cpu2 = ClusterInfo("local", "x", None, cpus=2, gpus=0)
    p = plan_resources(
        cpu2, workers_per_trial=2, gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None, num_samples=3
    )
    assert (p.use_gpu, p.per_worker, p.max_concurrent) == (False, {"CPU": 0.5}, 1)
    gpu8 = ClusterInfo("cluster", "x", None, cpus=64, gpus=8)
    p = plan_resources(
        gpu8, workers_per_trial=2, gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None, num_samples=32
    )
    assert (p.use_gpu, p.per_worker, p.max_concurrent) == (True, {"CPU": 1.0, "GPU": 1.0}, 4)
    p = plan_resources(
        gpu8, workers_per_trial=1, gpus_per_worker=0.5, cpus_per_worker=None, max_concurrent=None, num_samples=32
    )
    assert p.max_concurrent == 16
    assert (
        plan_resources(
            gpu8, workers_per_trial=1, gpus_per_worker=1, cpus_per_worker=None, max_concurrent=3, num_samples=32
        ).max_concurrent
        == 3
    )
    assert (
        plan_resources(
            gpu8, workers_per_trial=1, gpus_per_worker=1, cpus_per_worker=None, max_concurrent=None, num_samples=2
        ).max_concurrent
        == 2
    )
    with pytest.raises(ValueError, match="GPU"):
        plan_resources(
            cpu2, workers_per_trial=1, gpus_per_worker=1, cpus_per_worker=None, max_concurrent=None, num_samples=2
        )
    with pytest.raises(ValueError, match="CPU"):
        plan_resources(
            cpu2, workers_per_trial=4, gpus_per_worker=0, cpus_per_worker=0.5, max_concurrent=None, num_samples=2
        )


class _Trial:
    def __init__(self, trial_id):
        self.trial_id = trial_id


def test_epoch_asha_counts_completed_epochs_and_never_stops_a_final_epoch():
    sched = EpochASHA(epochs=3, grace_period=1, reduction_factor=2)
    good, bad, last = _Trial("good"), _Trial("bad"), _Trial("last")
    for t in (good, bad, last):
        sched.on_trial_add(None, t)
    # epoch 0 = first epoch done: the first rung
    assert sched.on_trial_result(None, good, {"epoch": 0, "val_mse": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"epoch": 0, "val_mse": 5.0}) == TrialScheduler.STOP
    assert sched.on_trial_result(None, good, {"epoch": 1, "val_mse": 0.5}) == TrialScheduler.CONTINUE
    # the final epoch (epoch index 2 of 3) is never stopped, even when worse than the rung's cutoff
    assert sched.on_trial_result(None, good, {"epoch": 2, "val_mse": 0.4}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, last, {"epoch": 0, "val_mse": 0.9}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, last, {"epoch": 1, "val_mse": 0.45}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, last, {"epoch": 2, "val_mse": 9.0}) == TrialScheduler.CONTINUE
    assert epochs_done({"epoch": 0}) == 1 and epochs_done({}) is None


def test_results_table_rows_and_study():
    space = SPECS["taxibj"].smoke_space
    point = dict(SPECS["taxibj"].smoke_official)
    other = dict(point, lr=3e-3, embed_dim=32)
    rows = [
        TrialRow("a", D.TRIAL_FINISHED, point, 2, 0.5, 2, {"val_mse": 0.5}, [(0, 0.7), (1, 0.5)]),
        TrialRow("b", D.TRIAL_PRUNED, other, 1, 0.9, 1, {"val_mse": 0.9}, [(0, 0.9)]),
        TrialRow("c", D.TRIAL_FAILED, other, 0, None, None, {}, [], error="boom"),
    ]
    study = study_from_rows(rows, space)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # as TPE saw them: pruned with its last value
    assert study.best_value == 0.5 and study.trials[0].intermediate_values == {0: 0.7, 1: 0.5}
    rec = rows[0].to_record()
    assert rec["status"] == "FINISHED" and rec["param.lr"] == point["lr"] and rec["best_val_mse"] == 0.5


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser(SPECS["kth"]).parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in (
        "--data-dir",
        "--num-samples",
        "--max-concurrent",
        "--workers-per-trial",
        "--gpus-per-worker",
        "--epochs",
        "--name",
        "--storage-path",
        "--tracking-uri",
        "--smoke",
    ):
        assert flag in out
    assert isinstance(build_parser(SPECS["mmnist"]).parse_args(["--smoke"]), argparse.Namespace)
