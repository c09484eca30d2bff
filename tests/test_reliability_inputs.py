"""Bad input catalogue: every entry point, a table of user mistakes, each refused with one clear
line on stderr and a non-zero exit, never a Python traceback. One case is one test:
`test_cli_rejects[train-zero-epochs]`, `test_python_api_rejects[checkpoint-pickled-code]`.

Entry points: the sweep scripts (sweeps/taxibj.py, kth.py, mmnist.py and `vmrnn.tune.main` with a bad
search space), `vmrnn data|train|evaluate|predict|bench|presets`, `cluster/install_kernels.sh`, and in
Python the dataset loaders, checkpoint loading and official-checkpoint loading.

The CLI cases call the real entry point in this process (real argument parsing, without paying the
imports ~100 times); the shell script and the AS_PROCESS cases also run as real processes
(`test_cli_rejects_as_a_process`), proof that what the in-process runs see is what a user's terminal sees.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from procs import REPO, free_port, scrubbed_env
from test_train_helpers import tiny_cfg
from vmrnn.cli import main as vmrnn_main
from vmrnn.cli import user_error_types
from vmrnn.data import build_dataset, write_synthetic
from vmrnn.models import build_model, load_official_state_dict, to_official_state_dict
from vmrnn.tracking.models import load_forecaster
from vmrnn.train.checkpoint import load_best_model, load_state
from vmrnn.train.config import TrainConfig
from vmrnn.train.loop import train
from vmrnn.tune.local_ray import ClusterInfo, plan_resources

BIN = Path(sys.executable).parent
PY = sys.executable
VMRNN = str(BIN / "vmrnn")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # {placeholders} filled from the fixture's paths
    expect: str  # a regular expression the error line must match
    rc: int = 2  # expected exit status (None: any non-zero)
    timeout: float = 120.0


def sweep(id: str, script: str, *args: str, expect: str, rc: int = 2, timeout: float = 120.0) -> Case:
    return Case(id, (PY, str(REPO / "sweeps" / f"{script}.py"), *args), expect, rc, timeout)


def cli(id: str, *args: str, expect: str, rc: int = 2, timeout: float = 120.0) -> Case:
    return Case(id, (VMRNN, *args), expect, rc, timeout)


_BAD_SPACE = """
import sys
from ray import tune
from vmrnn.tune import SweepSpec, main
space = {{"lr": tune.loguniform(1e-4, 1e-2), "embed_dim": tune.choice([{dims}]), "patch_size": tune.choice([4])}}
official = {official}
sys.exit(main(SweepSpec(dataset="taxibj", space=space, official=official, smoke_space=space,
                        smoke_official=official), sys.argv[1:]))
"""


def bad_space(id: str, dims: str, official: str, expect: str) -> Case:
    code = _BAD_SPACE.format(dims=dims, official=official).replace("{", "{{").replace("}", "}}")
    return Case(id, (PY, "-c", code, "--smoke", "--storage-path", "{tmp}/rr"), expect)


T = "--tracking-uri"
CASES: list[Case] = [
    # ---------------------------------------------------------------- sweep scripts
    sweep(
        "sweep-missing-data-dir",
        "taxibj",
        "--data-dir",
        "{tmp}/nowhere",
        expect=r"data directory .*nowhere does not exist",
    ),
    sweep(
        "sweep-corrupt-npz",
        "taxibj",
        "--data-dir",
        "{corrupt}",
        "--smoke",
        expect=r"dataset\.npz: not a readable \.npz",
    ),
    sweep(
        "sweep-wrong-shape-data",
        "taxibj",
        "--data-dir",
        "{wrongshape}",
        "--smoke",
        expect=r"X_train has shape .*expected \(N, 4, 2, 32, 32\)",
    ),
    sweep("sweep-kth-empty-data-dir", "kth", "--data-dir", "{empty}", expect=r"kth"),
    sweep("sweep-mmnist-empty-data-dir", "mmnist", "--data-dir", "{empty}", expect=r"mnist"),
    sweep(
        "sweep-zero-workers-per-trial",
        "taxibj",
        "--smoke",
        "--workers-per-trial",
        "0",
        expect=r"--workers-per-trial must be >= 1; got 0",
    ),
    sweep("sweep-zero-epochs", "taxibj", "--smoke", "--epochs", "0", expect=r"--epochs must be >= 1; got 0"),
    sweep(
        "sweep-negative-num-samples",
        "taxibj",
        "--smoke",
        "--num-samples",
        "-3",
        expect=r"--num-samples must be >= 1; got -3",
    ),
    sweep(
        "sweep-reduction-factor-1",
        "taxibj",
        "--smoke",
        "--reduction-factor",
        "1",
        expect=r"--reduction-factor must be >= 2; got 1",
    ),
    sweep(
        "sweep-zero-grace-period",
        "taxibj",
        "--smoke",
        "--grace-period",
        "0",
        expect=r"--grace-period must be >= 1; got 0",
    ),
    sweep(
        "sweep-negative-cpus-per-worker",
        "taxibj",
        "--smoke",
        "--cpus-per-worker",
        "-1",
        expect=r"--cpus-per-worker must be",
    ),
    sweep("sweep-zero-trial-cpus", "taxibj", "--smoke", "--trial-cpus", "0", expect=r"--trial-cpus must be > 0; got 0"),
    sweep(
        "sweep-set-searched-key", "taxibj", "--smoke", "--set", "lr=1", expect=r"--set lr: the sweep sets these itself"
    ),
    sweep(
        "sweep-set-log-model-false-without-no-register",
        "taxibj",
        "--smoke",
        "--set",
        "log_model=false",
        expect=r"add --no-register",
    ),
    sweep("sweep-set-bad-number", "taxibj", "--smoke", "--set", "grad_clip=x", expect=r"'grad_clip' must be a number"),
    sweep(
        "sweep-set-secret-looking-tag",
        "taxibj",
        "--smoke",
        "--set",
        "tags.api_token=abc",
        expect=r"secret-looking option would be logged",
    ),
    sweep("sweep-negative-gpus", "taxibj", "--smoke", "--gpus-per-worker", "-1", expect=r"--gpus-per-worker must be"),
    sweep(
        "sweep-gpu-on-cpu-machine",
        "taxibj",
        "--smoke",
        "--gpus-per-worker",
        "1",
        expect=r"a trial needs 2 GPU\(s\) .* but this machine has 0; pass --gpus-per-worker 0",
    ),
    sweep(
        "sweep-zero-max-concurrent",
        "taxibj",
        "--smoke",
        "--max-concurrent",
        "0",
        expect=r"--max-concurrent must be >= 1; got 0",
    ),
    sweep("sweep-unknown-preset", "taxibj", "--smoke", "--preset", "nosuch", expect=r"preset 'nosuch'"),
    sweep(
        "sweep-preset-of-other-frames",
        "taxibj",
        "--smoke",
        "--preset",
        "mmnist-tiny",
        expect=r"cannot train taxibj with preset 'mmnist-tiny': .*1x64x64 frames, but taxibj frames are 2x32x32",
    ),
    sweep(
        "sweep-address-is-a-dashboard-url",
        "taxibj",
        "--smoke",
        "--address",
        "http://127.0.0.1:8265",
        expect=r"dashboard / job-server URL",
    ),
    sweep(
        "sweep-mlflow-down",
        "taxibj",
        "--smoke",
        T,
        "http://127.0.0.1:{dead}",
        expect=r"http://127\.0\.0\.1:\d+",
        timeout=60,
    ),
    sweep("sweep-mlflow-unknown-scheme", "taxibj", "--smoke", T, "nosuchscheme://x", expect=r"nosuchscheme"),
    sweep(
        "sweep-mlflow-store-folder-missing",
        "taxibj",
        "--smoke",
        T,
        "sqlite:///{tmp}/nowhere/mlflow.db",
        expect=r"folder .*nowhere does not exist",
    ),
    sweep(
        "sweep-bad-int",
        "taxibj",
        "--smoke",
        "--num-samples",
        "many",
        expect=r"argument --num-samples: invalid int value",
    ),
    sweep("sweep-unknown-flag", "taxibj", "--bogus", expect=r"unrecognized arguments: --bogus"),
    bad_space(
        "sweep-space-official-outside",
        "16, 32",
        '{"lr": 1.0, "embed_dim": 16, "patch_size": 4}',
        expect=r"official value lr=1\.0 is outside loguniform",
    ),
    bad_space(
        "sweep-space-official-missing-key", "16, 32", '{"lr": 1e-3, "embed_dim": 16}', expect=r"official point's keys"
    ),
    bad_space(
        "sweep-space-impossible-model",
        "16, 24",
        '{"lr": 1e-3, "embed_dim": 16, "patch_size": 4}',
        expect=r"cannot be trained with preset .*embed_dim",
    ),
    # ---------------------------------------------------------------- vmrnn (top level), presets, bench
    cli("vmrnn-unknown-command", "nosuch", expect=r"invalid choice: 'nosuch'"),
    cli("vmrnn-no-command", expect=r"required: COMMAND"),
    cli("presets-extra-arg", "presets", "--bogus", expect=r"unrecognized arguments: --bogus"),
    cli("bench-without-gpu", "bench", "--presets", "taxibj", expect=r"vmrnn bench needs a CUDA GPU"),
    cli("bench-bad-int", "bench", "--iters", "x", expect=r"argument --iters: invalid int value"),
    # ---------------------------------------------------------------- vmrnn data
    cli(
        "data-synth-unknown-dataset",
        "data",
        "synth",
        "--dataset",
        "nosuch",
        "--out",
        "{tmp}/s",
        expect=r"argument --dataset: invalid choice: 'nosuch'",
    ),
    cli(
        "data-synth-over-real-data",
        "data",
        "synth",
        "--dataset",
        "taxibj",
        "--out",
        "{realish}",
        "--overwrite",
        expect=r"SYNTHETIC\.txt|not .*synthetic",
    ),
    cli("data-synth-out-is-a-file", "data", "synth", "--dataset", "taxibj", "--out", "{afile}", expect=r"afile"),
    cli(
        "data-info-missing-dir", "data", "info", "--dataset", "taxibj", "--data-dir", "{tmp}/nowhere", expect=r"nowhere"
    ),
    cli(
        "data-info-corrupt-npz",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{corrupt}",
        expect=r"not a readable \.npz archive",
    ),
    cli(
        "data-info-wrong-shape",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{wrongshape}",
        expect=r"X_train has shape \(5, 4, 1, 32, 32\), expected \(N, 4, 2, 32, 32\)",
    ),
    cli(
        "data-info-missing-key",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{missingkey}",
        expect=r"split\(s\) test cannot be read: .*missing key\(s\) \['Y_test'\]",
    ),
    cli(
        "data-info-nan-values", "data", "info", "--dataset", "taxibj", "--data-dir", "{nans}", expect=r"NaN or infinite"
    ),
    cli(
        "data-info-prepared-required",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--prepared",
        "require",
        expect=r"no prepared copy of taxibj",
    ),
    cli(
        "data-info-prepared-bad-mode",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--prepared",
        "sometimes",
        expect=r"no prepared copy of taxibj at sometimes",
    ),
    cli(
        "data-info-bad-val-fraction",
        "data",
        "info",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--val-fraction",
        "1.5",
        expect=r"val_fraction",
    ),
    cli("data-info-kth-empty", "data", "info", "--dataset", "kth", "--data-dir", "{empty}", expect=r"kth"),
    cli("data-info-mmnist-empty", "data", "info", "--dataset", "mmnist", "--data-dir", "{empty}", expect=r"mnist"),
    cli("data-info-custom-empty", "data", "info", "--dataset", "custom", "--data-dir", "{empty}", expect=r"custom"),
    cli(
        "data-prepare-missing-dir",
        "data",
        "prepare",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{tmp}/nowhere",
        expect=r"nowhere",
    ),
    cli(
        "data-prepare-bad-workers",
        "data",
        "prepare",
        "--dataset",
        "kth",
        "--data-dir",
        "{empty}",
        "--workers",
        "0",
        expect=r"workers|kth",
    ),
    # ---------------------------------------------------------------- vmrnn train
    cli(
        "train-unknown-dataset",
        "train",
        "--dataset",
        "nosuch",
        "--data-dir",
        "{data}",
        expect=r"argument --dataset: invalid choice: 'nosuch'",
    ),
    cli(
        "train-missing-data",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{tmp}/nowhere",
        "--no-tracking",
        expect=r"nowhere",
    ),
    cli(
        "train-corrupt-data",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{corrupt}",
        "--no-tracking",
        "--no-ray",
        expect=r"not a readable \.npz archive",
    ),
    cli(
        "train-wrong-shape-data",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{wrongshape}",
        "--no-tracking",
        expect=r"X_train has shape",
    ),
    cli(
        "train-unknown-preset",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "preset=nosuch",
        "--no-tracking",
        expect=r"training option 'preset' must be one of",
    ),
    cli(
        "train-preset-of-other-frames",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "preset=mmnist-tiny",
        "--no-tracking",
        "--no-ray",
        expect=r"preset|frames|channels",
    ),
    cli(
        "train-unknown-option",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "nosuch=1",
        expect=r"unknown training option",
    ),
    cli(
        "train-bad-number",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "lr=fast",
        expect=r"training option 'lr' must be a number; got 'fast'",
    ),
    cli("train-negative-lr", "train", "--dataset", "taxibj", "--data-dir", "{data}", "--set", "lr=-1", expect=r"lr"),
    cli(
        "train-zero-batch",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "batch_size=0",
        expect=r"batch_size.* must be >= 1",
    ),
    cli(
        "train-zero-epochs",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--epochs",
        "0",
        expect=r"epochs.* must be >= 1",
    ),
    cli(
        "train-bad-model-option",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "model.depth=0",
        "--no-tracking",
        expect=r"depth",
    ),
    cli(
        "train-bad-set-syntax",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--set",
        "lr",
        expect=r"--set expects key=value; got 'lr'",
    ),
    cli(
        "train-zero-workers",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--workers",
        "0",
        expect=r"--workers must be >= 1; got 0",
    ),
    cli(
        "train-gpu-on-cpu-machine",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-tracking",
        "--gpus-per-worker",
        "1",
        "--set",
        "preset=taxibj-tiny",
        expect=r"GPU.* but .*has 0",
        timeout=120,
    ),
    cli(
        "train-negative-cpus",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-tracking",
        "--cpus-per-worker",
        "-1",
        expect=r"--cpus-per-worker must be",
    ),
    cli(
        "train-negative-max-failures",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-tracking",
        "--max-failures",
        "-2",
        expect=r"--max-failures must be",
    ),
    cli(
        "train-no-ray-several-workers",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-ray",
        "--workers",
        "2",
        "--no-tracking",
        expect=r"--no-ray trains in this one process",
    ),
    cli(
        "train-mlflow-down",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        T,
        "http://127.0.0.1:{dead}",
        expect=r"http://127\.0\.0\.1:\d+",
        timeout=60,
    ),
    cli(
        "train-mlflow-unknown-scheme",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        T,
        "nosuchscheme://x",
        "--no-ray",
        expect=r"unknown scheme 'nosuchscheme'",
    ),
    cli(
        "train-mlflow-store-folder-missing",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        T,
        "sqlite:///{tmp}/nowhere/mlflow.db",
        expect=r"folder .*nowhere does not exist",
    ),
    cli(
        "train-resume-missing",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-ray",
        "--no-tracking",
        "--resume",
        "{tmp}/nowhere",
        expect=r"nowhere",
    ),
    cli(
        "train-resume-not-a-checkpoint",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-ray",
        "--no-tracking",
        "--resume",
        "{empty}",
        expect=r"no vmrnn checkpoint at",
    ),
    cli(
        "train-resume-other-architecture",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-ray",
        "--no-tracking",
        "--set",
        "preset=taxibj-tiny",
        "--set",
        "model.depth=1",
        "--set",
        "max_train_batches=1",
        "--resume",
        "{ckpt}",
        expect=r"checkpoint .*(architecture|model|depth|does not match)",
    ),
    cli(
        "train-resume-corrupt-checkpoint",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-ray",
        "--no-tracking",
        "--set",
        "preset=taxibj-tiny",
        "--resume",
        "{garbage_ckpt}",
        expect=r"cannot read checkpoint",
    ),
    cli(
        "train-resume-with-ray",
        "train",
        "--dataset",
        "taxibj",
        "--data-dir",
        "{data}",
        "--no-tracking",
        "--resume",
        "{ckpt}",
        expect=r"--resume is for --no-ray runs",
    ),
    # ---------------------------------------------------------------- vmrnn evaluate
    cli(
        "evaluate-missing-checkpoint",
        "evaluate",
        "--checkpoint",
        "{tmp}/nowhere",
        "--data-dir",
        "{data}",
        expect=r"no model at .*nowhere",
    ),
    cli(
        "evaluate-not-a-checkpoint",
        "evaluate",
        "--checkpoint",
        "{empty}",
        "--data-dir",
        "{data}",
        expect=r"no vmrnn checkpoint at",
    ),
    cli(
        "evaluate-corrupt-checkpoint",
        "evaluate",
        "--checkpoint",
        "{garbage_ckpt}",
        "--data-dir",
        "{data}",
        expect=r"cannot read|checkpoint",
    ),
    cli(
        "evaluate-pickled-code-in-checkpoint",
        "evaluate",
        "--checkpoint",
        "{evil_ckpt}",
        "--data-dir",
        "{data}",
        expect=r"(cannot read checkpoint|refus|weights_only|not allowed)",
    ),
    cli(
        "evaluate-other-dataset",
        "evaluate",
        "--checkpoint",
        "{ckpt}",
        "--data-dir",
        "{mmnist}",
        "--dataset",
        "mmnist",
        expect=r"(frames|channels|shape|model expects)",
    ),
    cli(
        "evaluate-missing-data", "evaluate", "--checkpoint", "{ckpt}", "--data-dir", "{tmp}/nowhere", expect=r"nowhere"
    ),
    cli(
        "evaluate-unknown-registered-model",
        "evaluate",
        "--model",
        "models:/nosuch@champion",
        "--data-dir",
        "{data}",
        T,
        "sqlite:///{tmp}/mlflow.db",
        expect=r"models:/nosuch@champion is not in the MLflow tracking store .*point --tracking-uri",
    ),
    cli(
        "evaluate-unknown-run",
        "evaluate",
        "--model",
        "runs:/0123456789abcdef/model",
        "--data-dir",
        "{data}",
        T,
        "sqlite:///{tmp}/mlflow.db",
        expect=r"runs:/0123456789abcdef/model is not in the MLflow tracking store .*point --tracking-uri",
    ),
    cli(
        "evaluate-zero-batch",
        "evaluate",
        "--checkpoint",
        "{ckpt}",
        "--data-dir",
        "{data}",
        "--batch-size",
        "0",
        expect=r"--batch-size must be >= 1",
    ),
    cli(
        "evaluate-bad-split",
        "evaluate",
        "--checkpoint",
        "{ckpt}",
        "--data-dir",
        "{data}",
        "--split",
        "dev",
        expect=r"argument --split: invalid choice: 'dev'",
    ),
    # ---------------------------------------------------------------- vmrnn predict
    cli(
        "predict-missing-input",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{tmp}/nowhere.npy",
        "--out",
        "{tmp}/y.npy",
        expect=r"input .*nowhere\.npy does not exist",
    ),
    cli(
        "predict-not-npy",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{afile}",
        "--out",
        "{tmp}/y.npy",
        expect=r"cannot read .* as a \.npy array",
    ),
    cli(
        "predict-pickled-npy",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{pickled_npy}",
        "--out",
        "{tmp}/y.npy",
        expect=r"cannot read .* as a \.npy array",
    ),
    cli(
        "predict-wrong-rank",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{rank3}",
        "--out",
        "{tmp}/y.npy",
        expect=r"--input must be \(T, C, H, W\) or \(B, T, C, H, W\); .* has shape \(4, 32, 32\)",
    ),
    cli(
        "predict-wrong-frame-size",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{wrong_frames}",
        "--out",
        "{tmp}/y.npy",
        expect=r"inputs have frames \(1, 64, 64\) but the model expects \(2, 32, 32\)",
    ),
    cli(
        "predict-out-of-range",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{out_of_range}",
        "--out",
        "{tmp}/y.npy",
        expect=r"--input values must be in \[0, 1\]",
    ),
    cli(
        "predict-nan-input",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{nan_input}",
        "--out",
        "{tmp}/y.npy",
        expect=r"--input values must be in \[0, 1\]",
    ),
    cli(
        "predict-zero-future",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{good_input}",
        "--out",
        "{tmp}/y.npy",
        "--n-future",
        "0",
        expect=r"--n-future must be >= 1; got 0",
    ),
    cli(
        "predict-missing-model",
        "predict",
        "--model",
        "{tmp}/nowhere",
        "--input",
        "{good_input}",
        "--out",
        "{tmp}/y.npy",
        expect=r"no model at .*nowhere",
    ),
    cli(
        "predict-pickled-code-in-checkpoint",
        "predict",
        "--model",
        "{evil_ckpt}",
        "--input",
        "{good_input}",
        "--out",
        "{tmp}/y.npy",
        expect=r"(cannot read checkpoint|refus|weights_only|not allowed)",
    ),
    cli(
        "predict-bad-device",
        "predict",
        "--model",
        "{ckpt}",
        "--input",
        "{good_input}",
        "--out",
        "{tmp}/y.npy",
        "--device",
        "tpu",
        expect=r"device",
    ),
    # ---------------------------------------------------------------- cluster/install_kernels.sh
    Case(
        "install-kernels-unknown-flag",
        ("bash", str(REPO / "cluster" / "install_kernels.sh"), "--bogus"),
        r"bogus",
        rc=None,
    ),
    Case(
        "install-kernels-bad-arch",
        ("bash", str(REPO / "cluster" / "install_kernels.sh"), "--arch", "abc", "--dry-run"),
        r"arch",
        rc=None,
    ),
    Case(
        "install-kernels-cpu-torch",
        ("bash", str(REPO / "cluster" / "install_kernels.sh")),
        r"(CPU|GPU|CUDA|nvcc)",
        rc=None,
    ),
]


# ------------------------------------------------------------------------------------------- fixtures
def _npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


class Evil:
    """Pickles to a call of os.system: what a malicious checkpoint carries."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    data = tmp / "data"
    write_synthetic("taxibj", data, seed=0, size="small")
    mmnist = tmp / "mmnist"
    write_synthetic("mmnist", mmnist, seed=0, size="small")
    (tmp / "empty").mkdir()
    (tmp / "corrupt" / "taxibj").mkdir(parents=True)
    (tmp / "corrupt" / "taxibj" / "dataset.npz").write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    rng = np.random.default_rng(0)
    good = lambda n: rng.uniform(-1, 1, (n, 4, 2, 32, 32)).astype(np.float32)  # noqa: E731
    _npz(
        tmp / "wrongshape" / "taxibj" / "dataset.npz",
        X_train=rng.uniform(-1, 1, (5, 4, 1, 32, 32)),
        Y_train=rng.uniform(-1, 1, (5, 4, 1, 32, 32)),
        X_test=good(2),
        Y_test=good(2),
    )
    _npz(tmp / "missingkey" / "taxibj" / "dataset.npz", X_train=good(40), Y_train=good(40), X_test=good(2))
    nan = good(5)
    nan[0, 0, 0, 0, 0] = np.nan
    _npz(tmp / "nans" / "taxibj" / "dataset.npz", X_train=nan, Y_train=good(5), X_test=good(2), Y_test=good(2))
    _npz(
        tmp / "realish" / "taxibj" / "dataset.npz", X_train=good(5), Y_train=good(5), X_test=good(2), Y_test=good(2)
    )  # "real" data: no SYNTHETIC.txt marker
    (tmp / "afile").write_text("just text\n")

    # a real checkpoint of the tiny model, and broken / malicious copies of it
    MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}").search_experiments()  # created once, not by 3 at a time
    res = train(tiny_cfg(data, epochs=1, max_train_batches=1, checkpoint_dir=str(tmp / "ck")))
    ckpt = Path(res.checkpoint)
    garbage = tmp / "garbage_ck"
    shutil.copytree(ckpt, garbage)
    (garbage / "state.pt").write_bytes(b"\x80\x02 not a torch file")
    (garbage / "best_model.pt").write_bytes(b"\x80\x02 not a torch file")
    evil = tmp / "evil_ck"
    shutil.copytree(ckpt, evil)
    for name in ("state.pt", "best_model.pt"):
        torch.save({"format_version": 1, "model": Evil(str(tmp / "PWNED"))}, evil / name)

    np.save(tmp / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp / "rank3.npy", rng.random((4, 32, 32), dtype=np.float32))
    np.save(tmp / "wrong_frames.npy", rng.random((4, 1, 64, 64), dtype=np.float32))
    np.save(tmp / "out_of_range.npy", rng.random((4, 2, 32, 32), dtype=np.float32) * 7)
    nan_in = rng.random((4, 2, 32, 32), dtype=np.float32)
    nan_in[0, 0, 0, 0] = np.nan
    np.save(tmp / "nan_input.npy", nan_in)
    np.save(tmp / "good_input.npy", rng.random((4, 2, 32, 32), dtype=np.float32))
    return {
        "tmp": tmp,
        "data": data,
        "mmnist": mmnist,
        "empty": tmp / "empty",
        "corrupt": tmp / "corrupt",
        "wrongshape": tmp / "wrongshape",
        "missingkey": tmp / "missingkey",
        "nans": tmp / "nans",
        "realish": tmp / "realish",
        "afile": tmp / "afile",
        "ckpt": ckpt,
        "garbage_ckpt": garbage,
        "evil_ckpt": evil,
        "pickled_npy": tmp / "pickled.npy",
        "rank3": tmp / "rank3.npy",
        "wrong_frames": tmp / "wrong_frames.npy",
        "out_of_range": tmp / "out_of_range.npy",
        "nan_input": tmp / "nan_input.npy",
        "good_input": tmp / "good_input.npy",
        "dead": free_port(),
    }  # nothing listens there


@dataclass
class Outcome:
    rc: int | None
    stdout: str
    stderr: str
    seconds: float  # the entry point's own time in-process; with interpreter start-up and imports as a process
    traceback: str = ""  # an exception that escaped the entry point (in-process runs)
    in_process: bool = False


def run_process(case: Case, paths: dict, env: dict) -> Outcome:
    """The case as a real process: the `vmrnn` console script, `python sweeps/<x>.py`, bash."""
    argv = [a.format(**paths) for a in case.argv]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, cwd=paths["tmp"], env=env, capture_output=True, text=True, timeout=case.timeout)
    except subprocess.TimeoutExpired:
        return Outcome(None, "", f"timed out after {case.timeout:.0f} s", case.timeout)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def run_in_process(case: Case, paths: dict, env: dict) -> Outcome:
    """The same entry point called in this process (argv, exit status, stderr): what the console script
    or `python script.py` would run, without paying the imports ~90 times."""
    argv = [a.format(**paths) for a in case.argv]
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), list(sys.argv)
    out, err = io.StringIO(), io.StringIO()
    rc, tb = None, ""
    t0 = time.monotonic()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(paths["tmp"])
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if argv[0] == VMRNN:
                    rc = vmrnn_main(argv[1:])
                elif argv[1] == "-c":
                    sys.argv = ["-c", *argv[3:]]
                    exec(compile(argv[2], "<bad space>", "exec"), {"__name__": "__main__"})  # noqa: S102
                    rc = 0
                else:
                    sys.argv = argv[1:]
                    runpy.run_path(argv[1], run_name="__main__")
                    rc = 0
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # what a user would see as a traceback
                tb = traceback.format_exc()
                rc = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv
    return Outcome(rc, out.getvalue(), err.getvalue() + tb, time.monotonic() - t0, tb, in_process=True)


def _error_lines(stderr: str) -> list[str]:
    """The lines that report an error (argparse's 'usage:' block and library warnings are not errors)."""
    return [
        ln
        for ln in stderr.splitlines()
        if re.search(r"(^|: )error: |^sweep: error|^vmrnn .*: error", ln) or ln.startswith(("ERROR", "Error"))
    ]


def check(case: Case, got: Outcome, paths) -> list[str]:
    """What is wrong with how `case` was refused (empty: refused as it should be)."""
    problems = []
    err = got.stderr
    if got.rc is None:
        return [err]
    if got.rc == 0:
        problems.append("exit status 0")
    elif case.rc is not None and got.rc != case.rc:
        problems.append(f"exit status {got.rc}, expected {case.rc}")
    if got.traceback or "Traceback (most recent call last)" in err or "Traceback" in got.stdout:
        problems.append("a Python traceback")
    lines = _error_lines(err) if case.argv[0] != "bash" else [ln for ln in err.splitlines() if ln.strip()][-1:]
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines")
    if not any(re.search(case.expect, ln) for ln in lines):
        problems.append(f"no error line matches {case.expect!r}")
    # Timed in-process only: a process's time is mostly its imports, which a loaded machine stretches.
    if any("{dead}" in a for a in case.argv) and got.in_process and got.seconds > 15:
        problems.append(f"took {got.seconds:.0f} s to report an unreachable MLflow")
    if (paths["tmp"] / "PWNED").exists():
        problems.append("the malicious checkpoint ran code")
    return problems


# Also run as real processes (console script / `python sweeps/x.py`), besides in this process.
AS_PROCESS = (
    "sweep-corrupt-npz",
    "sweep-gpu-on-cpu-machine",
    "sweep-mlflow-down",
    "sweep-space-impossible-model",
    "vmrnn-unknown-command",
    "data-info-corrupt-npz",
    "train-gpu-on-cpu-machine",
    "train-mlflow-down",
    "train-resume-other-architecture",
    "evaluate-pickled-code-in-checkpoint",
    "predict-wrong-frame-size",
)


@pytest.fixture(scope="module")
def env(paths) -> dict[str, str]:
    return scrubbed_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{paths['tmp'] / 'mlflow.db'}",
        VMRNN_CACHE_DIR=str(paths["tmp"] / "cache"),
        VMRNN_STORAGE_PATH=str(paths["tmp"] / "rr"),
        PYTHONPATH=str(REPO),
    )


def _refused_clearly(case: Case, got: Outcome, paths: dict, how: str) -> None:
    problems = check(case, got, paths)
    assert not problems, f"{case.id} ({how}): {'; '.join(problems)}\n{(got.stderr or got.stdout)[-1500:]}"


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(AS_PROCESS) <= set(ids)
    api_ids = [c.id for c in API_CASES]
    assert len(api_ids) == len(set(api_ids))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_rejects(case, paths, env):
    if case.argv[0] == "bash":
        _refused_clearly(case, run_process(case, paths, env), paths, "process")
        return
    got = run_in_process(case, paths, env)
    _refused_clearly(case, got, paths, "in-process")
    assert not ray.is_initialized(), f"{case.id} started Ray before refusing its input"


@pytest.fixture(scope="module")
def process_runs(paths, env) -> dict[str, Future]:
    """The AS_PROCESS cases as real processes, started together (3 at a time) when the first one's test
    asks; each test waits for its own."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        yield {c.id: pool.submit(run_process, c, paths, env) for c in CASES if c.id in AS_PROCESS}


@pytest.mark.parametrize("case", [c for c in CASES if c.id in AS_PROCESS], ids=lambda c: c.id)
def test_cli_rejects_as_a_process(case, process_runs, paths):
    _refused_clearly(case, process_runs[case.id].result(), paths, "process")


# ------------------------------------------------------------------------------------------- Python API
@dataclass(frozen=True)
class ApiCase:
    id: str
    call: Callable[[dict], object]  # given the fixture's paths: a call that must refuse its input
    expect: str  # a regular expression the one-line message must match


def _tiny():
    return build_model("taxibj-tiny")


def _official_tiny(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**to_official_state_dict(_tiny()), **extra}


def _official_tiny_with_a_wrong_shape() -> dict[str, torch.Tensor]:
    state = _official_tiny()
    key = next(k for k, v in state.items() if v.dim() == 2)
    return {**state, key: torch.zeros(3, 3)}


def _plan(**kw):
    defaults = dict(workers_per_trial=1, gpus_per_worker=None, cpus_per_worker=None, max_concurrent=None, num_samples=4)
    return plan_resources(ClusterInfo("local", "local", None, cpus=2, gpus=0), **{**defaults, **kw})


API_CASES: list[ApiCase] = [
    ApiCase(
        "loader-unknown-dataset", lambda p: build_dataset("nosuch", p["data"], "train"), r"unknown dataset 'nosuch'"
    ),
    ApiCase("loader-unknown-split", lambda p: build_dataset("taxibj", p["data"], "dev"), r"split"),
    ApiCase("loader-unknown-option", lambda p: build_dataset("taxibj", p["data"], "train", nosuch=1), r"nosuch"),
    ApiCase("loader-negative-seed", lambda p: build_dataset("taxibj", p["data"], "train", seed=-1), r"seed"),
    ApiCase("loader-missing-data", lambda p: build_dataset("taxibj", p["tmp"] / "nowhere", "train"), r"nowhere"),
    ApiCase("loader-corrupt-npz", lambda p: build_dataset("taxibj", p["corrupt"], "train")[0], r"not a readable"),
    ApiCase("loader-wrong-shape", lambda p: build_dataset("taxibj", p["wrongshape"], "train")[0], r"has shape"),
    ApiCase("loader-nan-values", lambda p: build_dataset("taxibj", p["nans"], "train")[0], r"NaN"),
    ApiCase("loader-kth-empty", lambda p: build_dataset("kth", p["empty"], "train"), r"kth"),
    ApiCase("loader-mmnist-empty", lambda p: build_dataset("mmnist", p["empty"], "train"), r"mnist"),
    ApiCase("loader-custom-empty", lambda p: build_dataset("custom", p["empty"], "train"), r"custom"),
    ApiCase(
        "official-other-architecture",
        lambda p: load_official_state_dict(_tiny(), to_official_state_dict(build_model("mmnist-tiny"))),
        r".",
    ),
    ApiCase(
        "official-other-size",
        lambda p: load_official_state_dict(_tiny(), to_official_state_dict(build_model("taxibj"))),
        r"shape",
    ),
    ApiCase(
        "official-wrong-shape",
        lambda p: load_official_state_dict(_tiny(), _official_tiny_with_a_wrong_shape()),
        r"shape",
    ),
    ApiCase("official-empty", lambda p: load_official_state_dict(_tiny(), {}), r"missing"),
    ApiCase(
        "official-unknown-keys",
        lambda p: load_official_state_dict(_tiny(), _official_tiny(**{"extra.w": torch.ones(1)})),
        r"extra\.w",
    ),
    ApiCase("checkpoint-pickled-code", lambda p: load_state(p["evil_ckpt"]), r"refused: loading it would run code"),
    ApiCase("checkpoint-pickled-code-best", lambda p: load_best_model(p["evil_ckpt"]), r"refused"),
    ApiCase("checkpoint-pickled-code-forecaster", lambda p: load_forecaster(p["evil_ckpt"]), r"refused"),
    ApiCase("checkpoint-garbage", lambda p: load_state(p["garbage_ckpt"]), r"not a readable torch file"),
    ApiCase("checkpoint-not-a-checkpoint", lambda p: load_state(p["empty"]), r"no vmrnn checkpoint"),
    ApiCase("model-unknown-preset", lambda p: build_model("nosuch"), r"nosuch"),
    ApiCase(
        "config-bad-type", lambda p: TrainConfig.from_dict({"dataset": "taxibj", "lr": "x"}), r"'lr' must be a number"
    ),
    ApiCase("config-not-a-dict", lambda p: TrainConfig.from_dict(["taxibj"]), r"must be a dict"),
    ApiCase("resources-zero-workers", lambda p: _plan(workers_per_trial=0), r"--workers-per-trial must be >= 1"),
    ApiCase("resources-gpu-on-cpu", lambda p: _plan(gpus_per_worker=1), r"the cluster has 0"),
]


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: c.id)
def test_python_api_rejects(case, paths):
    with pytest.raises(user_error_types() + (ValueError,)) as refused:
        case.call(paths)
    msg = str(refused.value)
    assert "\n" not in msg.strip(), f"not one line: {type(refused.value).__name__}: {msg[:600]!r}"
    assert re.search(case.expect, msg), f"{type(refused.value).__name__}: {msg[:300]!r} does not match {case.expect!r}"
    assert not (paths["tmp"] / "PWNED").exists(), "a malicious checkpoint ran code"
