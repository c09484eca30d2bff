"""The plain-PyTorch training core on CPU, with synthetic TaxiBJ in its published format (no Ray)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from test_train_helpers import eval_worker, spawn, state_equal, strip_times, tiny_cfg, write_taxibj
from vmrnn.cli import main as cli_main
from vmrnn.data import build_dataset
from vmrnn.models import build_model
from vmrnn.tracking.models import load_forecaster
from vmrnn.train.checkpoint import BEST_FILE, CONFIG_FILE, METRICS_FILE, STATE_FILE, find_checkpoint, load_state
from vmrnn.train.distributed import DistEnv
from vmrnn.train.loop import (
    REPORTED_KEYS,
    TrainingDiverged,
    TrainingStopped,
    evaluate,
    make_eval_loader,
    train,
)
from vmrnn.train.schedule import cosine_lr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic and fair on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_taxibj(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def baseline(data_root, tmp_path_factory):
    """3 uninterrupted epochs, checkpoints kept."""
    ck = tmp_path_factory.mktemp("baseline")
    return train(tiny_cfg(data_root, checkpoint_dir=str(ck), keep_checkpoints=5))


def test_epoch_metrics_validation_split_and_test_scoring(baseline, data_root):
    h = baseline.history
    assert [m["epoch"] for m in h] == [0, 1, 2]
    for m in h:
        assert set(REPORTED_KEYS) <= set(m)
        assert all(np.isfinite(m[k]) for k in REPORTED_KEYS)
    # validation runs on the val split (a hold-out of train), never on the test split
    n_val, n_test = len(build_dataset("taxibj", data_root, "val")), len(build_dataset("taxibj", data_root, "test"))
    assert n_val != n_test and all(m["val_samples"] == n_val for m in h)
    assert h[-1]["val_mse"] < h[0]["val_mse"]  # it learns
    sched = dict(lr=3e-3, epochs=3, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-6)
    assert [m["lr"] for m in h] == pytest.approx([cosine_lr(e, **sched) for e in range(3)])
    assert h[0]["lr"] == pytest.approx(1e-5)
    # the test split is scored once, at the end, with the best (by val_mse) weights
    assert "test_mse" in h[-1] and not any("test_mse" in m for m in h[:-1])
    best = baseline.best_epoch
    assert best == int(np.argmin([m["val_mse"] for m in h]))
    assert baseline.test_metrics["count"] == n_test
    best_state = torch.load(find_checkpoint(baseline.checkpoint) / BEST_FILE, weights_only=True)
    model = build_model("taxibj-tiny")
    model.load_state_dict(best_state)
    env = DistEnv()
    redo = evaluate(model, make_eval_loader(build_dataset("taxibj", data_root, "test"), 4, env), n_input=4, env=env)
    assert redo["mse"] == pytest.approx(h[-1]["test_mse"], rel=1e-12)


def test_same_seed_same_result_and_other_seed_differs(baseline, data_root, tmp_path):
    again = train(tiny_cfg(data_root, checkpoint_dir=str(tmp_path / "a")))
    assert strip_times(again.history) == strip_times(baseline.history)
    assert state_equal(load_state(again.checkpoint)["model"], load_state(baseline.checkpoint)["model"])
    other = train(tiny_cfg(data_root, checkpoint_dir=str(tmp_path / "b"), seed=8, epochs=1))
    assert other.history[0]["val_mse"] != baseline.history[0]["val_mse"]


def test_interrupted_run_resumes_to_the_same_weights(baseline, data_root, tmp_path):
    cfg = tiny_cfg(data_root, checkpoint_dir=str(tmp_path / "ck"))

    def stop_after_epoch_1(res):
        if res.epoch == 1:
            raise TrainingStopped("simulated interruption")

    with pytest.raises(TrainingStopped):
        train(cfg, on_epoch_end=stop_after_epoch_1)
    mid = load_state(tmp_path / "ck")
    assert mid["epoch"] == 1 and len(mid["history"]) == 2
    assert sorted(d.name for d in (tmp_path / "ck").iterdir()) == ["epoch_0001", "epoch_0002"]  # named from 1
    resumed = train(cfg)  # picks up epoch_0002 (the second epoch's) from checkpoint_dir
    assert [m["epoch"] for m in resumed.history] == [0, 1, 2]
    final, ref = load_state(resumed.checkpoint), load_state(baseline.checkpoint)
    assert state_equal(final["model"], ref["model"])
    assert strip_times(resumed.history) == strip_times(baseline.history)
    assert final["optimizer"]["state"][0]["step"] == ref["optimizer"]["state"][0]["step"]


def test_checkpoint_contents(baseline):
    d = find_checkpoint(baseline.checkpoint)
    for f in (STATE_FILE, BEST_FILE, CONFIG_FILE, METRICS_FILE):
        assert (d / f).exists(), f
    st = load_state(d)
    assert {
        "epoch",
        "model",
        "optimizer",
        "scheduler",
        "rng",
        "history",
        "best_epoch",
        "best_val_mse",
        "config",
        "model_config",
        "mlflow_run_id",
        "world_size",
    } <= set(st)
    assert st["config"]["run_key"] and st["config"]["preset"] == "taxibj-tiny"
    meta = json.loads((d / CONFIG_FILE).read_text())
    assert meta["dataset"]["in_frames"] == 4 and meta["model"]["embed_dim"] == 16
    assert [m["epoch"] for m in json.loads((d / METRICS_FILE).read_text())] == [1, 2, 3]  # counted from 1


def test_nan_loss_raises_training_diverged(data_root, tmp_path):
    cfg = tiny_cfg(data_root, lr=1e10, warmup_epochs=0, epochs=2, max_train_batches=8)
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d+") as ei:  # the first epoch, counted from 1
        train(cfg)
    assert ei.value.epoch == 0 and not np.isfinite(ei.value.loss)  # the loop's index
    again = pickle.loads(pickle.dumps(ei.value))  # crosses process boundaries (Ray, torchrun)
    assert str(again) == str(ei.value)


def test_torchrun_entry_counts_epochs_from_1(data_root, tmp_path):
    """`python -m vmrnn.train.torchrun_main` (one process here: torchrun's environment absent): its JSON
    summary's best_epoch and the checkpoint folders count epochs from 1, as the console and MLflow do."""
    from vmrnn.train.torchrun_main import main as torchrun_main

    sets = ["preset=taxibj-tiny", "batch_size=4", "val_batch_size=4", "max_train_batches=3", "lr=3e-3", "seed=7"]
    args = ["--dataset", "taxibj", "--data-dir", str(data_root), "--epochs", "2", "--no-tracking"]
    args += ["--checkpoint-dir", str(tmp_path / "ck"), "--result-json", str(tmp_path / "result.json")]
    assert torchrun_main(args + [a for s in sets for a in ("--set", s)]) == 0
    summary = json.loads((tmp_path / "result.json").read_text())
    state = load_state(tmp_path / "ck")
    assert summary["best_epoch"] == state["best_epoch"] + 1 and summary["best_epoch"] in (1, 2)
    assert sorted(d.name for d in (tmp_path / "ck").iterdir()) == ["epoch_0001", "epoch_0002"]


def test_two_process_evaluation_equals_one_process(data_root, tmp_path):
    """Sharded evaluation (3 + 2 of the 5 val samples, no padding) summed with gloo equals one process."""
    torch.manual_seed(0)
    state = build_model("taxibj-tiny").state_dict()
    torch.save(state, tmp_path / "w.pt")
    eval_worker(0, 1, "", str(data_root), str(tmp_path / "w.pt"), str(tmp_path / "one.json"))
    spawn(eval_worker, 2, str(tmp_path / "init"), str(data_root), str(tmp_path / "w.pt"), str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["count"] == two["count"] == len(build_dataset("taxibj", data_root, "val"))
    # Batches of 3 + 2 and of 5 take different float32 GEMM/conv paths on CPU, so the per-sample outputs agree
    # to float32 rounding (~1e-7), not bit for bit; a lost or double-counted sample would be off by ~20%.
    for k in ("mse", "mae", "ssim", "psnr", "loss"):
        assert two[k] == pytest.approx(one[k], rel=1e-6), k
    assert two["mse_by_lead"] == pytest.approx(one["mse_by_lead"], rel=1e-6)


def test_cli_evaluate_and_predict_from_checkpoint(baseline, data_root, tmp_path, capsys):
    ck = str(find_checkpoint(baseline.checkpoint))
    assert cli_main(["evaluate", "--checkpoint", ck, "--data-dir", str(data_root), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mse"] == pytest.approx(baseline.history[-1]["test_mse"], rel=1e-9)

    x = build_dataset("taxibj", data_root, "test")[0][0].numpy()
    np.save(tmp_path / "seq.npy", x)
    assert (
        cli_main(
            [
                "predict",
                "--model",
                ck,
                "--input",
                str(tmp_path / "seq.npy"),
                "--out",
                str(tmp_path / "pred.npy"),
                "--n-future",
                "6",
            ]
        )
        == 0
    )
    pred = np.load(tmp_path / "pred.npy")
    assert pred.shape == (6, 2, 32, 32) and pred.dtype == np.float32
    ref = load_forecaster(ck).predict(x[None])[0]
    np.testing.assert_allclose(pred[:4], ref, rtol=0, atol=1e-6)

    np.save(tmp_path / "bad.npy", x * 3)
    assert (
        cli_main(["predict", "--model", ck, "--input", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "p2.npy")])
        == 2
    )
    assert "[0, 1]" in capsys.readouterr().err
    assert cli_main(["train", "--dataset", "taxibj", "--data-dir", str(data_root), "--no-ray", "--set", "lr=-1"]) == 2
    assert "'lr'" in capsys.readouterr().err
