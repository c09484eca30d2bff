"""MLflow tracking of training runs: a real local sqlite store, and one real `mlflow server` (no mocks)."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from procs import MlflowServer, free_port
from test_train_helpers import tiny_cfg, write_taxibj
from vmrnn.data import build_dataset
from vmrnn.tracking.models import load_forecaster
from vmrnn.tracking.tags import TAG_RUN_KEY
from vmrnn.tracking.uris import TrackingUnavailable
from vmrnn.train.checkpoint import load_state
from vmrnn.train.loop import REPORTED_KEYS, TrainingDiverged, TrainingStopped, train

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

EPOCH_KEYS = [k for k in REPORTED_KEYS if k != "epoch"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_taxibj(tmp_path_factory.mktemp("data"))


def _store(tmp_path):
    (tmp_path / "store").mkdir(exist_ok=True)
    return f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_mlflow_run_has_params_every_epoch_images_and_a_loadable_model(data_root, tmp_path, monkeypatch):
    uri = _store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for MLflow's own loaders below
    monkeypatch.setattr(tempfile, "tempdir", str((tmp_path / "tmp").resolve()))  # this test's own /tmp
    (tmp_path / "tmp").mkdir()
    cfg = tiny_cfg(
        data_root,
        epochs=2,
        tracking=True,
        tracking_uri=uri,
        experiment="t-local",
        run_name="r1",
        tags={"team": "vision"},
        checkpoint_dir=str(tmp_path / "ck"),
    )
    res = train(cfg)
    assert not list((tmp_path / "tmp").glob("vmrnn-mlflow-*")), "the run's temporary upload folders are gone"
    client = MlflowClient(uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    p = run.data.params
    assert p["dataset"] == "taxibj" and p["preset"] == "taxibj-tiny" and float(p["lr"]) == 3e-3
    assert p["model_config.embed_dim"] == "16" and p["tags.team"] == "vision" and p["run_key"]
    assert run.data.tags[TAG_RUN_KEY] == p["run_key"] and run.data.tags["team"] == "vision"
    # Epochs counted from 1, as the console and Ray's training_iteration: steps, best_epoch, tag, JSON, metrics.json
    for k in EPOCH_KEYS:
        assert _steps(client, res.run_id, k) == [1, 2], k
    vals = [m.value for m in sorted(client.get_metric_history(res.run_id, "val_mse"), key=lambda m: m.step)]
    assert vals == pytest.approx([h["val_mse"] for h in res.history])
    assert _steps(client, res.run_id, "test_mse") == [2]
    best = res.best_epoch + 1
    assert run.data.metrics["best_epoch"] == best and run.data.tags["vmrnn.best_epoch"] == str(best)
    lead = client.download_artifacts(res.run_id, "metrics/val_lead_time_metrics.json", str(tmp_path))
    assert json.loads(Path(lead).read_text())["epoch"] == best
    test_json = client.download_artifacts(res.run_id, "metrics/test_metrics.json", str(tmp_path))
    assert json.loads(Path(test_json).read_text())["scored_after_epoch"] == 2
    history = json.loads((Path(res.checkpoint) / "metrics.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[-1]["best_epoch"] == best
    arts = {a.path for a in client.list_artifacts(res.run_id, "forecasts")}
    assert arts == {"forecasts/forecast_strip.png", "forecasts/forecast.gif"}
    assert {"metrics/lead_time_metrics.png", "metrics/test_metrics.json"} <= {
        a.path for a in client.list_artifacts(res.run_id, "metrics")
    }
    strip = client.download_artifacts(res.run_id, "forecasts/forecast_strip.png", str(tmp_path))
    from PIL import Image

    assert Image.open(strip).size[0] > 100
    # the model: MLflow's own loader (pt2 graph, no vmrnn needed) and ours, both predicting the same
    model_uri = run.data.tags["vmrnn.model_uri"]
    assert run.data.tags["vmrnn.model_format"] == "pt2"
    x = torch.stack([build_dataset("taxibj", data_root, "test")[i][0] for i in range(3)])
    ours = load_forecaster(model_uri)
    ref = load_forecaster(tmp_path / "ck").predict(x.numpy())  # the checkpoint's best weights
    np.testing.assert_allclose(ours.predict(x.numpy()), ref, atol=1e-6)
    assert ours.predict(x[0].numpy(), n_future=7).shape == (7, 2, 32, 32)
    # MLflow's generic loader: the exported graph, a batch size other than the example's, numpy in and out
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{res.run_id}/model")
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x.numpy())), ref, atol=1e-5)
    # A lean model: its input example is one sample (not a batch), short in JSON
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "model")))
    example = mlflow.models.Model.load(local).load_input_example(local)
    assert example.shape == (1, 4, 2, 32, 32) and example.dtype == np.float32
    for name in ("input_example.json", "serving_input_example.json"):
        assert (local / name).stat().st_size < 100_000, name  # 344 KB / 548 KB when it was a pretty-printed batch


def test_resumed_run_continues_the_same_mlflow_run_once_per_epoch(data_root, tmp_path):
    uri = _store(tmp_path)
    common = dict(
        epochs=3,
        experiment="t-resume",
        checkpoint_dir=str(tmp_path / "ck"),
        log_model=False,
        log_images=False,
        run_key="key-123",
    )

    def stop_at(epoch):
        def cb(res):
            if res.epoch == epoch:
                raise TrainingStopped()

        return cb

    # Epochs 0-1 with tracking off (as if every MLflow write was lost), stopped after epoch 1 ...
    with pytest.raises(TrainingStopped):
        train(tiny_cfg(data_root, tracking=False, **common), on_epoch_end=stop_at(1))
    # ... then tracked but interrupted again right after epoch 2 was logged, before the run finished:
    cfg = tiny_cfg(data_root, tracking=True, tracking_uri=uri, **common)
    with pytest.raises(TrainingStopped):
        train(cfg, on_epoch_end=stop_at(2))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t-resume").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    assert _steps(client, run_id, "val_mse") == [1, 2, 3]  # 1 and 2 backfilled from the checkpoint's history
    # Resuming from the epoch-2 checkpoint trains nothing more, logs nothing twice, and finishes the run.
    res = train(cfg)
    assert res.run_id == run_id and load_state(res.checkpoint)["mlflow_run_id"] == run_id
    for k in EPOCH_KEYS:
        assert _steps(client, run_id, k) == [1, 2, 3], k
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_stopped_run_leaves_no_temporary_folders(data_root, tmp_path, monkeypatch):
    """A run that never reaches its end (stopped here; an ASHA-pruned trial is killed) leaves nothing in /tmp:
    each picture's folder goes as soon as MLflow has it."""
    monkeypatch.setattr(tempfile, "tempdir", str((tmp_path / "tmp").resolve()))
    (tmp_path / "tmp").mkdir()

    def stop(res):
        raise TrainingStopped()

    cfg = tiny_cfg(
        data_root, epochs=2, tracking=True, tracking_uri=_store(tmp_path), experiment="t-stop", log_model=False
    )
    with pytest.raises(TrainingStopped):
        train(cfg, on_epoch_end=stop)
    client = MlflowClient(_store(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("t-stop").experiment_id])[0]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "forecasts")} == {
        "forecasts/forecast_strip.png",
        "forecasts/forecast.gif",
    }
    assert not list((tmp_path / "tmp").glob("vmrnn-mlflow-*"))


def test_divergence_marks_the_run_failed_with_the_reason(data_root, tmp_path):
    uri = _store(tmp_path)
    cfg = tiny_cfg(
        data_root,
        lr=1e10,
        warmup_epochs=0,
        epochs=1,
        max_train_batches=8,
        tracking=True,
        tracking_uri=uri,
        experiment="t-nan",
        log_model=False,
    )
    with pytest.raises(TrainingDiverged):
        train(cfg)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("t-nan").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert "diverged" in run.data.tags["vmrnn.failure_reason"]


def test_unreachable_tracking_server_fails_fast_naming_the_uri(data_root):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match=uri.replace(".", r"\.")):
        train(tiny_cfg(data_root, tracking=True, tracking_uri=uri))
    assert time.monotonic() - t0 < 15


def test_one_experiment_rule_for_training_and_sweeps(data_root, tmp_path, monkeypatch):
    """Whoever creates an experiment of a sqlite store (a training run or a sweep, from any folder), its
    artifacts go beside the database; a deleted experiment is refused by both, never silently restored."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    from vmrnn.tracking.experiments import ExperimentDeleted, ensure_experiment
    from vmrnn.tracking.sweeps import SweepTracker

    uri = _store(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    client = MlflowClient(uri)
    trained = ensure_experiment(uri, "t rule/train")
    swept = SweepTracker(uri, "t-rule-sweep").experiment_id
    for exp_id, folder in ((trained, "t_rule_train"), (swept, "t-rule-sweep")):
        location = local_file_uri_to_path(client.get_experiment(exp_id).artifact_location)
        assert Path(location) == tmp_path / "store" / "mlruns" / folder
    assert ensure_experiment(uri, "t-rule-sweep") == swept  # training finds the sweep's experiment
    # MLflow's UI opens our experiments on the runs table (model training, not its GenAI view), with a description
    for exp_id in (trained, swept):
        exp_tags = client.get_experiment(exp_id).tags
        assert exp_tags["mlflow.experimentKind"] == "custom_model_development", exp_tags
        assert "nested run per trial" in exp_tags["mlflow.note.content"]
    # ... also one created by MLflow itself (or an older vmrnn) when vmrnn first uses it; a kind chosen is kept
    bare = client.create_experiment("t-bare", artifact_location=str(tmp_path / "store" / "mlruns" / "t-bare"))
    chosen = client.create_experiment(
        "t-chosen",
        artifact_location=str(tmp_path / "store" / "mlruns" / "t-chosen"),
        tags={"mlflow.experimentKind": "genai_development"},
    )
    ensure_experiment(uri, "t-bare"), ensure_experiment(uri, "t-chosen")
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
    assert client.get_experiment(chosen).tags["mlflow.note.content"]
    client.delete_experiment(swept)
    with pytest.raises(ExperimentDeleted, match="'t-rule-sweep' in .* is deleted: restore it"):
        train(tiny_cfg(data_root, tracking=True, tracking_uri=uri, experiment="t-rule-sweep"))
    with pytest.raises(ExperimentDeleted, match="'t-rule-sweep'"):
        SweepTracker(uri, "t-rule-sweep").experiment_id  # noqa: B018 (the property creates or finds it)
    assert client.get_experiment(swept).lifecycle_stage == "deleted"
    assert not list((tmp_path / "elsewhere").iterdir())  # nothing was written in the current folder


@pytest.mark.slow
def test_real_mlflow_server_with_an_outage_mid_run(data_root, tmp_path, monkeypatch):
    """Against a real `mlflow server`: it goes down after epoch 0 and comes back after epoch 1; training
    keeps going, the buffered metrics arrive, every epoch is logged once, and the model is logged."""
    monkeypatch.setenv("VMRNN_MLFLOW_FLUSH_TIMEOUT_S", "60")
    server = MlflowServer(tmp_path / "srv").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    try:

        def outage(res):
            if res.epoch == 0:
                server.stop()
            elif res.epoch == 1:
                server.start()

        cfg = tiny_cfg(
            data_root,
            epochs=3,
            tracking=True,
            tracking_uri=server.uri,
            experiment="t-server",
            model_format="pickle",
            checkpoint_dir=str(tmp_path / "ck"),
        )
        res = train(cfg, on_epoch_end=outage)
        client = MlflowClient(server.uri)
        run = client.get_run(res.run_id)
        assert run.info.status == "FINISHED"
        for k in EPOCH_KEYS:
            assert _steps(client, res.run_id, k) == [1, 2, 3], k
        assert client.list_artifacts(res.run_id, "forecasts")
        assert run.data.tags["vmrnn.model_format"] == "pickle"
        fc = load_forecaster(run.data.tags["vmrnn.model_uri"])
        x = build_dataset("taxibj", data_root, "test")[0][0].numpy()
        np.testing.assert_allclose(fc.predict(x), load_forecaster(tmp_path / "ck").predict(x), atol=1e-6)
        pickled = mlflow.pytorch.load_model(run.data.tags["vmrnn.model_uri"])
        assert pickled(torch.from_numpy(x)[None]).shape == (1, 4, 2, 32, 32)
    finally:
        server.stop()


def test_pinned_tracking_uri_restores_the_process_settings_exactly(tmp_path, monkeypatch):
    """Registering and loading models:/ pin both URIs for the call; afterwards the globals are what they
    were (unset stays unset), so a later run in the same process talks to its own store."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from vmrnn.tracking.uris import pinned_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", None)
    monkeypatch.setattr(registry_utils, "_registry_uri", None)
    inner = f"sqlite:///{tmp_path / 'a.db'}"
    with pinned_tracking_uri(inner):
        assert mlflow.get_tracking_uri() == inner and mlflow.get_registry_uri() == inner
    assert tracking_utils._tracking_uri is None and registry_utils._registry_uri is None
    assert "MLFLOW_TRACKING_URI" not in os.environ
    outer = f"sqlite:///{tmp_path / 'b.db'}"
    mlflow.set_registry_uri(outer)
    with pinned_tracking_uri(inner):
        pass
    assert registry_utils._registry_uri == outer
