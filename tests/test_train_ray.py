"""Ray Train (V2) on CPU: 2 gloo workers with fractional CPUs, a SIGKILLed worker, divergence (no mocks)."""

from __future__ import annotations

import pytest
import torch

from test_train_helpers import ddp_train_worker, spawn, state_equal, strip_times, tiny_cfg, write_taxibj
from vmrnn.train.checkpoint import load_state
from vmrnn.train.loop import REPORTED_KEYS, TrainingDiverged

ray = pytest.importorskip("ray")
from ray.train import CheckpointConfig, FailureConfig, RunConfig  # noqa: E402

from faults import KillWorkerAfterReport  # noqa: E402
from vmrnn.train.ray_train import build_trainer, fit  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_taxibj(tmp_path_factory.mktemp("data"))


def test_two_workers_learn_survive_a_killed_worker_and_match_plain_ddp(local_ray, data_root, tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(data_root, epochs=3, tracking=True, tracking_uri=uri, experiment="t-ray", log_model=False)
    marker = tmp_path / "killed"
    run_config = RunConfig(
        name="ray-run",
        storage_path=str(tmp_path / "ray"),
        failure_config=FailureConfig(max_failures=1),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=[KillWorkerAfterReport(rank=1, reports=2, marker=marker)],
    )  # after epoch 1
    trainer = build_trainer(cfg, num_workers=2, use_gpu=False, resources_per_worker={"CPU": 0.5}, run_config=run_config)
    result = trainer.fit()

    assert marker.exists()  # rank 1 really died (SIGKILL) after reporting epoch 1 ...
    rv = result.return_value
    assert rv["resumed_from_epoch"] in (0, 1)  # ... and the new worker group resumed from a checkpoint
    assert set(REPORTED_KEYS) <= set(result.metrics) and result.metrics["epoch"] == 2
    assert result.metrics["world_size"] == 2
    history = load_state(result.checkpoint.path)["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["val_mse"] < history[0]["val_mse"]  # validation loss falls

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("t-ray").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == rv["run_id"]
    for k in REPORTED_KEYS:  # MLflow steps count epochs from 1
        if k != "epoch":
            assert sorted(m.step for m in client.get_metric_history(rv["run_id"], k)) == [1, 2, 3], k

    # The same run without Ray and without the failure: the plain core under DDP (what torchrun runs).
    plain = cfg.replace(tracking=False, checkpoint_dir=str(tmp_path / "plain"), run_key="plain")
    spawn(ddp_train_worker, 2, str(tmp_path / "init"), plain.to_dict(), str(tmp_path / "plain.pt"))
    ref = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert strip_times(history) == strip_times(ref["history"])
    assert state_equal(load_state(result.checkpoint.path)["model"], ref["model"])


def test_divergence_is_reported_not_retried(local_ray, data_root, tmp_path):
    cfg = tiny_cfg(data_root, lr=1e10, warmup_epochs=0, epochs=2, max_train_batches=8)
    with pytest.raises(TrainingDiverged, match="at epoch 1,"):
        fit(
            cfg,
            num_workers=1,
            resources_per_worker={"CPU": 0.5},
            storage_path=str(tmp_path / "ray"),
            name="nan",
            max_failures=2,
            progress=False,
        )
