"""A sweep trial's training config is resolved once, in the trial's process (build_trainer), and its
Ray Train workers get it resolved; the per-worker loop refuses an unresolved one. No Ray is started."""

from __future__ import annotations

import pytest
from ray.train import RunConfig

from test_train_helpers import write_taxibj
from vmrnn.tracking import tags
from vmrnn.train.config import TrainConfig, TrainConfigError
from vmrnn.train.loop import run_training
from vmrnn.train.ray_train import build_trainer
from vmrnn.tune.trial import TrialSetup, trial_train_config


def test_a_trial_config_is_resolved_once_and_reaches_the_workers_resolved(tmp_path, monkeypatch):
    data = write_taxibj(tmp_path / "data")
    setup = TrialSetup(
        sweep="s",
        base={
            "dataset": "taxibj",
            "data_dir": str(data),
            "preset": "taxibj-tiny",
            "epochs": 2,
            "seed": 0,
            "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
            "experiment": "vmrnn-taxibj",
            "device": "cpu",
            "grad_clip": 1.0,
        },
        num_workers=2,
        use_gpu=False,
        resources_per_worker={"CPU": 0.5},
        train_storage_path=str(tmp_path / "train_runs"),
        tags={tags.TAG_EVAL_DATA: "synthetic"},
    )
    cfg = trial_train_config(setup, {"lr": 2e-3, "batch_size": 4, "embed_dim": 32, "depth": 1}, "abc")
    assert not cfg.is_resolved  # val_batch_size comes from the dataset's recipe

    calls = []
    resolve = TrainConfig.resolved
    monkeypatch.setattr(TrainConfig, "resolved", lambda self: calls.append(self.run_key) or resolve(self))
    trainer = build_trainer(
        cfg,
        num_workers=2,
        use_gpu=False,
        resources_per_worker={"CPU": 0.5},
        run_config=RunConfig(name="train-abc", storage_path=str(tmp_path / "train_runs")),
    )
    assert calls == ["s/abc"]

    sent = TrainConfig.from_dict(trainer.train_loop_config["train_config"])
    assert sent.is_resolved and sent == resolve(sent)  # resolving it again in a worker would change nothing
    assert (sent.lr, sent.batch_size, sent.grad_clip, sent.model) == (2e-3, 4, 1.0, {"embed_dim": 32, "depth": 1})
    assert sent.tags[tags.TAG_TRIAL_ID] == "abc" and sent.run_name == "s-abc"


def test_the_worker_loop_refuses_an_unresolved_config(tmp_path):
    with pytest.raises(TrainConfigError, match="run_training needs a resolved config"):
        run_training(TrainConfig.from_dict({"dataset": "taxibj", "data_dir": str(tmp_path)}))


def test_the_cli_path_prepares_once_before_fit_prepares_again(tmp_path, monkeypatch):
    from vmrnn.train.ray_train import prepare_config

    data = write_taxibj(tmp_path / "data")
    cfg = TrainConfig.from_dict(
        {
            "dataset": "taxibj",
            "data_dir": str(data),
            "preset": "taxibj-tiny",
            "tracking_uri": f"sqlite:///{tmp_path / 'm.db'}",
            "device": "cpu",
        }
    )
    calls = []
    resolve = TrainConfig.resolved
    monkeypatch.setattr(TrainConfig, "resolved", lambda self: calls.append(1) or resolve(self))
    once = prepare_config(cfg)
    assert prepare_config(once) is once and len(calls) == 1
    assert len(calls) == 1 and prepare_config(once.replace(lr=1e-3)).lr == 1e-3 and len(calls) == 2
