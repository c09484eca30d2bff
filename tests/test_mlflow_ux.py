"""What a user meets around MLflow, on real local stores and the real `vmrnn` command (no mocks):

- reading a model (`vmrnn predict --model models:/...`) never creates a store, and names the tracking URI it
  looked in and how to point elsewhere;
- a trial pruned by ASHA reads as stopped early (FINISHED, tagged PRUNED with its last epoch), not as a crash;
- the forecast strip's title clears its column labels; `vmrnn --help` speaks to users; `vmrnn predict --help`
  gives each dataset's input shape from the dataset registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from vmrnn.tracking import tags as T
from vmrnn.tune import defaults as D


def _vmrnn(*args: str, cwd: Path, tracking_uri_env: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)
    if tracking_uri_env:
        env["MLFLOW_TRACKING_URI"] = tracking_uri_env
    return subprocess.run(
        [sys.executable, "-m", "vmrnn", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _registered_champion(uri: str) -> None:
    """A real (tiny, pickled) TaxiBJ forecaster registered as vmrnn-taxibj@champion in the store `uri`."""
    import mlflow
    import torch

    from vmrnn.models import build_model
    from vmrnn.tracking.experiments import ensure_experiment
    from vmrnn.tracking.models import log_forecaster
    from vmrnn.tracking.uris import client, pinned_tracking_uri
    from vmrnn.train.export import model_meta

    torch.manual_seed(0)
    model = build_model("taxibj-tiny")
    ds = {"name": "taxibj", "in_frames": 4, "out_frames": 4, "channels": 2, "height": 32, "width": 32}
    with pinned_tracking_uri(uri):
        mlflow.set_experiment(experiment_id=ensure_experiment(uri, "ux-read"))  # artifacts beside the store
        with mlflow.start_run():
            info, _ = log_forecaster(
                model.state_dict(), model_meta(model.config.to_dict(), ds), np.zeros((4, 2, 32, 32)), fmt="pickle"
            )
        version = mlflow.register_model(info.model_uri, "vmrnn-taxibj")
    client(uri).set_registered_model_alias("vmrnn-taxibj", T.CHAMPION, version.version)


def test_predict_reads_without_writing_and_names_the_store(tmp_path):
    here, store = tmp_path / "elsewhere", tmp_path / "store"
    here.mkdir(), store.mkdir()
    np.save(here / "x.npy", np.zeros((4, 2, 32, 32), np.float32))
    predict = ("predict", "--model", "models:/vmrnn-taxibj@champion", "--input", "x.npy", "--out", "y.npy")

    # No store in this folder: a one-line error naming the default store and both ways to point elsewhere.
    out = _vmrnn(*predict, cwd=here)
    assert out.returncode == 2, out.stderr
    err = out.stderr.strip()
    assert len(err.splitlines()) == 1 and f"sqlite:///{here / 'mlflow.db'}" in err, err
    assert "--tracking-uri" in err and "MLFLOW_TRACKING_URI" in err
    assert sorted(p.name for p in here.iterdir()) == ["x.npy"], "reading created nothing"

    # A store that lacks the model: the error names that store.
    uri = f"sqlite:///{store / 'mlflow.db'}"
    _registered_champion(uri)
    out = _vmrnn(
        "predict",
        "--model",
        "models:/vmrnn-kth@champion",
        "--input",
        "x.npy",
        "--out",
        "y.npy",
        "--tracking-uri",
        uri,
        cwd=here,
    )
    assert out.returncode == 2 and uri in out.stderr and "vmrnn-kth" in out.stderr, out.stderr

    # Pointed at the store that holds it, by flag or by environment: it predicts.
    out = _vmrnn(*predict, "--tracking-uri", uri, cwd=here)
    assert out.returncode == 0, out.stderr
    assert np.load(here / "y.npy").shape == (4, 2, 32, 32)
    (here / "y.npy").unlink()
    out = _vmrnn(*predict, cwd=here, tracking_uri_env=uri)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in here.iterdir()) == ["x.npy", "y.npy"]


def test_a_pruned_trial_reads_as_stopped_early_not_killed(tmp_path):
    from vmrnn.tracking.sweeps import SweepTracker, run_key

    tracker = SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ux-sweep")
    parent, _ = tracker.get_or_create_parent("s", {})
    run = tracker.client.create_run(
        tracker.experiment_id, tags={T.TAG_RUN_KEY: run_key("s", "t1"), T.TAG_TRIAL_ID: "t1", T.TAG_PARENT_RUN: parent}
    )
    for step, mse in ((1, 0.5), (2, 0.4)):  # the training layer logs epochs counted from 1
        tracker.client.log_metric(run.info.run_id, D.METRIC, mse, step=step)

    for _ in range(2):  # idempotent: the sweep's end marks every trial again
        tracker.mark_trial(sweep="s", trial_id="t1", status=D.TRIAL_PRUNED, parent_run_id=parent)
    got = tracker.client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED", "early stopping is a normal outcome, not KILLED"
    assert got.data.tags[T.TAG_TRIAL_STATUS] == D.TRIAL_PRUNED
    assert got.data.tags[T.TAG_PRUNED_AT_EPOCH] == "2" and got.data.metrics["pruned_at_epoch"] == 2
    assert len(tracker.client.get_metric_history(run.info.run_id, "pruned_at_epoch")) == 1


def test_forecast_strip_title_clears_the_column_labels():
    import matplotlib.pyplot as plt

    from vmrnn.train.visualize import strip_figure

    rng = np.random.default_rng(0)
    for n, c in ((1, 1), (2, 2), (1, 3)):
        frames = [rng.random((n, 4, c, 16, 16)) for _ in range(3)]
        fig = strip_figure(*frames, title="epoch 2  val_mse 0.0123")
        renderer = fig.canvas.get_renderer()
        title = fig._suptitle.get_window_extent(renderer)
        labels = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_title()]
        assert labels and all(title.y0 >= label.y1 for label in labels), (n, c)
        assert title.y1 <= fig.bbox.y1  # and stays inside the picture
        plt.close(fig)


def test_help_speaks_to_users_and_predict_gives_each_input_shape(tmp_path):
    from vmrnn.data import DATASETS

    top = _vmrnn("--help", cwd=tmp_path)
    assert top.returncode == 0 and "register(" not in top.stdout and "subparsers" not in top.stdout
    assert "sweeps/" in top.stdout
    text = " ".join(_vmrnn("predict", "--help", cwd=tmp_path).stdout.split())
    for name, spec in DATASETS.items():
        if spec.in_frames is not None:
            assert (
                f"{name} ({spec.in_frames}, {spec.channels}, {spec.height}, {spec.width}) -> "
                f"{spec.out_frames} frames" in text
            ), name
        else:
            assert f"{name} the shape of the data" in text


@pytest.fixture(autouse=True)
def _no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_ui_hints_open_the_model_training_view_and_run_as_printed(tmp_path):
    """A store on disk: `mlflow ui` spelled for this environment (never a bare name the shell may not find),
    then the run's page in the model-training view; a tracking server: its own page, without credentials."""
    import shlex

    from vmrnn.tracking.experiments import ui_hint

    uri = f"sqlite:///{tmp_path / 'with space' / 'mlflow.db'}"
    command, _, link = ui_hint(uri, "3", "abc").partition(", then open ")
    words = shlex.split(command)
    assert Path(words[0]).is_file() or words[:3] == [words[0], "-m", "mlflow"], command
    assert words[-2:] == ["--backend-store-uri", uri]  # quoted: the folder's space survives the shell
    assert link == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    remote = ui_hint("https://bob:s3cret@mlflow.internal:5000", "7")
    assert remote == "open https://mlflow.internal:5000/#/experiments/7/runs?workflowType=machine_learning"
