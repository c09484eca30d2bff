"""TrainConfig validation/resolution, the lr schedule, optimiser groups, secret redaction (no training)."""

from __future__ import annotations

import math

import pytest
import torch

from test_train_helpers import write_taxibj
from vmrnn.models import ConfigError, build_model
from vmrnn.tracking.runs import config_params
from vmrnn.tracking.tags import redact
from vmrnn.tracking.uris import strip_credentials
from vmrnn.train.config import TrainConfig, TrainConfigError, apply_overrides, flatten
from vmrnn.train.schedule import LRSchedule, build_optimizer, cosine_lr


def test_from_dict_coerces_and_round_trips():
    cfg = TrainConfig.from_dict(
        {
            "dataset": "taxibj",
            "data_dir": "d",
            "epochs": "5",
            "lr": "1e-3",
            "grad_clip": "none",
            "checkpoint_steps": "true",
            "model": '{"depth": 4}',
        }
    )
    assert (cfg.epochs, cfg.lr, cfg.grad_clip, cfg.checkpoint_steps, cfg.model) == (5, 1e-3, None, True, {"depth": 4})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"lr": -1}, "lr"),
        ({"epochs": 0}, "epochs"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"precision": "fp16"}, "precision"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": "fast"}, "lr"),
        ({"device": "tpu"}, "device"),
        ({"schedule": "linear"}, "schedule"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"bogus": 1}, "bogus"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_bad_values_name_the_field(bad, field):
    with pytest.raises(TrainConfigError, match=field) as ei:
        TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "d", **bad})
    assert isinstance(ei.value, ConfigError)  # the CLI prints ConfigError as a one-line user error


def test_missing_dataset_and_data_dir():
    with pytest.raises(TrainConfigError, match="dataset"):
        TrainConfig.from_dict({"data_dir": "d"})
    with pytest.raises(TrainConfigError, match="data_dir"):
        TrainConfig.from_dict({"dataset": "kth"})


def test_resolved_fills_recipe_and_checks_model_shape(tmp_path, monkeypatch):
    root = write_taxibj(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "data"}).resolved()
    assert (c.preset, c.epochs, c.batch_size, c.val_batch_size, c.lr) == ("taxibj", 200, 16, 16, 4e-4)
    assert c.data_dir == str(root.resolve())
    assert c.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert c.experiment == "vmrnn-taxibj"
    with pytest.raises(TrainConfigError, match="64x64"):
        TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "data", "preset": "mmnist-tiny"}).resolved()
    with pytest.raises(TrainConfigError, match="model"):
        TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "data", "model": {"nope": 1}}).resolved()
    k = TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "d"}).with_run_key()
    assert k.run_key and k.with_run_key().run_key == k.run_key


def test_apply_overrides_parses_values():
    d = apply_overrides(
        {"dataset": "taxibj"},
        ["lr=1e-3", "grad_clip=null", "model.depth=4", "tags.team=a=b", "checkpoint-steps=true", "run_name=abc"],
    )
    assert d == {
        "dataset": "taxibj",
        "lr": 1e-3,
        "grad_clip": None,
        "model": {"depth": 4},
        "tags": {"team": "a=b"},
        "checkpoint_steps": True,
        "run_name": "abc",
    }
    with pytest.raises(TrainConfigError, match="unknown"):
        apply_overrides({}, ["nope=1"])
    with pytest.raises(TrainConfigError, match="key=value"):
        apply_overrides({}, ["lr"])
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "None",
        "e": "{}",
    }


def test_cosine_schedule_is_timm_0_6_per_epoch():
    kw = dict(lr=1e-3, epochs=20, warmup_epochs=5, warmup_lr=1e-5, min_lr=1e-6)
    for e in range(5):
        assert cosine_lr(e, **kw) == pytest.approx(1e-5 + e * (1e-3 - 1e-5) / 5, rel=1e-12)
    for e in range(5, 20):  # not shifted by the warm-up
        assert cosine_lr(e, **kw) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * e / 20)))

    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "d", "lr": 1e-3, "epochs": 20})
    opt = build_optimizer(model, cfg)
    per_epoch = LRSchedule(opt, cfg, steps_per_epoch=10)
    assert per_epoch.start_epoch(3) == pytest.approx(cosine_lr(3, **kw))
    per_epoch.before_step(3, 7)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(3, **kw))  # constant within the epoch
    per_step = LRSchedule(opt, cfg.replace(schedule="cosine_step"), steps_per_epoch=10)
    per_step.start_epoch(3)
    per_step.before_step(3, 5)
    assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(3.5, **kw))
    const = LRSchedule(opt, cfg.replace(schedule="constant"), steps_per_epoch=10)
    assert const.start_epoch(0) == 1e-3


def test_adamw_excludes_no_decay_norms_and_biases():
    model = build_model("taxibj-tiny")
    cfg = TrainConfig.from_dict(
        {"dataset": "taxibj", "data_dir": "d", "lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05}
    )
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {n: id(p) in decay for n, p in model.named_parameters()}
    assert names["cell.blocks.0.mixer.in_proj.weight"] and names["cell.blocks.0.mixer.x_proj"]
    for n in (
        "cell.blocks.0.mixer.A_log",
        "cell.blocks.0.mixer.skip",
        "cell.blocks.0.mixer.dt_bias",
        "cell.blocks.0.norm.weight",
        "embed.proj.bias",
        "head.up.1.weight",
    ):
        assert not names[n], n
    adam = build_optimizer(model, cfg.replace(optimizer="adam", weight_decay=0.0))
    assert type(adam) is torch.optim.Adam and len(adam.param_groups) == 1  # the official: one group


def test_secrets_are_redacted():
    assert redact("aws_secret_access_key", "x") == "***"
    assert redact("tags.api_token", "x") == "***"
    assert redact("run_key", "abc") == "abc"
    assert strip_credentials("http://user:pw@host:5000/x") == "http://host:5000/x"
    cfg = TrainConfig.from_dict(
        {
            "dataset": "taxibj",
            "data_dir": "d",
            "preset": "taxibj-tiny",
            "tracking_uri": "https://bob:hunter2@mlflow.example:443",
            "tags": {"db_password": "hunter2", "team": "a"},
        }
    )
    params = config_params(cfg)
    assert "hunter2" not in " ".join(params.values())
    assert params["tags.team"] == "a" and params["model_config.depth"] == "2"


def test_gpu_training_defaults_to_the_optimised_execution_with_a_fallback():
    from vmrnn.train.execution import ExecutionConfig

    cfg = TrainConfig.from_dict({"dataset": "taxibj", "data_dir": "/nonexistent"})
    assert cfg.execution == "fast"
    fast = cfg.execution_config("cuda")
    assert (fast.precision, fast.fused, fast.cuda_graphs) == ("bf16", True, True)
    assert cfg.execution_config("cpu") == ExecutionConfig.reference()  # nothing to gain on CPU
    ref = cfg.replace(execution="reference").execution_config("cuda")
    assert ref == ExecutionConfig.reference()  # the mode to fall back to: fp32, official dataflow
    kth = cfg.replace(execution="fast", checkpoint_steps=True).execution_config("cuda")
    assert kth.checkpoint_steps and kth.precision == "bf16"
    # an override changes one field of the mode; the others keep the mode's values
    assert cfg.replace(precision="fp32").execution_config("cuda") == fast.replace(precision="fp32")
    assert cfg.replace(execution="reference", fused=True).execution_config("cuda").describe() == "fp32+fused"
