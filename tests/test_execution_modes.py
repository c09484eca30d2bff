"""The one table of execution modes: training and `vmrnn bench` take it, each device resolves it, and a
training run records the execution that actually ran (MLflow params and the vmrnn.execution tag)."""

from __future__ import annotations

import pytest
import torch

from test_train_helpers import tiny_cfg, write_taxibj
from vmrnn.bench import BASELINES, add_ratios, curve_summary, format_row, resolve_modes, validate_request
from vmrnn.cli import main as cli_main
from vmrnn.tracking.tags import TAG_EXECUTION as EXECUTION_TAG
from vmrnn.train.config import CHOICES, TrainConfig, TrainConfigError
from vmrnn.train.execution import (
    MODES,
    OVERRIDES,
    ExecutionConfig,
    ExecutionError,
    resolution_line,
    resolve_execution,
)
from vmrnn.train.loop import train

BASE = {"dataset": "taxibj", "data_dir": "d"}


def test_training_and_bench_accept_exactly_the_table():
    assert CHOICES["execution"] == tuple(MODES)
    for name in MODES:
        assert TrainConfig.from_dict({**BASE, "execution": name}).execution_config("cuda") == MODES[name]
        assert resolve_modes([name])[name] is MODES[name]
    for name in ("manual", "fastest", ""):
        with pytest.raises(TrainConfigError, match="'execution'"):
            TrainConfig.from_dict({**BASE, "execution": name})
        if name:
            with pytest.raises(ValueError, match="unknown mode"):
                resolve_modes([name])


def test_bench_measures_both_baselines_first_unless_left_out():
    assert list(resolve_modes(["fast"])) == [*BASELINES, "fast"]
    assert list(resolve_modes(["fast", "reference", "fast"])) == ["reference", "bf16-graphs", "fast"]
    assert list(resolve_modes(["fast", "-bf16-graphs"])) == ["reference", "fast"]
    assert list(resolve_modes(["-reference", "-bf16-graphs", "bf16"])) == ["bf16"]
    with pytest.raises(ValueError, match="reference"):
        validate_request(["fast", "-reference"], check=True)
    with pytest.raises(ValueError, match="curve mode 'nope'"):
        validate_request(["fast"], curve_modes=["nope"])


def test_bench_ratios_against_each_measured_baseline():
    entries = {
        "reference": {"train_ms": 80.0, "train_peak_gib": 4.0, "infer_ms": 40.0, "infer_peak_gib": 1.0},
        "bf16-graphs": {"train_ms": 20.0, "train_peak_gib": 2.0, "infer_ms": 10.0, "infer_peak_gib": 1.0},
        "fast": {"train_ms": 10.0, "train_peak_gib": 1.0, "train_samples_s": 1.0},
        "fast-ckpt": {"error": "out of memory"},
    }
    add_ratios(entries)
    assert entries["fast"]["vs"] == {
        "reference": {"train_speedup": 8.0, "train_mem_ratio": 4.0},
        "bf16-graphs": {"train_speedup": 2.0, "train_mem_ratio": 2.0},
    }
    assert entries["reference"]["vs"]["bf16-graphs"]["infer_speedup"] == 0.25
    assert "vs" not in entries["fast-ckpt"]
    row = format_row("taxibj", "fast", entries["fast"])
    assert row.endswith("1.00 GiB x8.0 vs reference, x2.0 vs bf16-graphs")
    del entries["bf16-graphs"]  # left out with --modes=...,-bf16-graphs: only the reference ratios
    add_ratios(entries)
    assert list(entries["fast"]["vs"]) == ["reference"]


def test_bench_command_line_is_kept_whole():
    from vmrnn.cli import build_parser  # noqa: PLC0415
    from vmrnn.cli.bench import command_line  # noqa: PLC0415

    args = build_parser().parse_args(["bench", "--presets", "taxibj", "--modes=fast,-bf16-graphs", "--check"])
    cmd = command_line(args)
    assert cmd.startswith("vmrnn bench --presets=taxibj --modes=fast,-bf16-graphs ") and cmd.endswith(" --check")
    assert build_parser().parse_args(cmd.split()[1:]) == args  # it reproduces the run


def test_bench_cli_rejects_a_mode_outside_the_table_before_looking_for_a_gpu(capsys):
    assert cli_main(["bench", "--modes=fast,manual"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown mode(s) ['manual']" in err and "bf16-fused-graphs" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("name", list(MODES))
def test_resolution_per_device(name):
    mode = MODES[name]
    assert resolve_execution(name, device_type="cuda") == mode
    # CPU: the GPU-only parts are off, activation checkpointing stays
    assert resolve_execution(name, device_type="cpu") == ExecutionConfig(checkpoint_steps=mode.checkpoint_steps)
    # several workers: the same mode, CUDA graphs included (the gradient all-reduce is part of the graph)
    assert resolve_execution(name, device_type="cuda", world_size=2) == mode


def test_overrides_change_single_fields_and_the_device_still_decides():
    assert resolve_execution("fast", {"precision": "fp32", "compile": None}, device_type="cuda") == MODES[
        "fast"
    ].replace(precision="fp32")
    # the fused epilogue goes with the fused layout
    assert resolve_execution("fast", {"fused": False}, device_type="cuda") == MODES["bf16-graphs"]
    assert resolve_execution("reference", {"scan_backend": "cuda"}, device_type="cuda").scan_backend == "cuda"
    assert resolve_execution("reference", {"scan_backend": "cuda"}, device_type="cpu").scan_backend == "auto"
    assert resolve_execution("fast", {"scan_backend": "torch"}, device_type="cpu").scan_backend == "torch"
    with pytest.raises(ExecutionError, match="scan_backend 'triton' does not exist for the reference") as ei:
        resolve_execution("reference", {"scan_backend": "triton"}, device_type="cpu")
    assert ei.value.option == "scan_backend" and "execution mode 'reference'" in str(ei.value)
    with pytest.raises(ExecutionError, match="mode 'manual' does not exist"):
        resolve_execution("manual", device_type="cuda")


@pytest.mark.parametrize(
    "bad, option",
    [
        ({"execution": "manual"}, "execution"),
        ({"execution": "reference", "scan_backend": "triton"}, "scan_backend"),
        ({"execution": "fast", "fused": False, "scan_backend": "triton"}, "scan_backend"),
        ({"scan_backend": "tpu"}, "scan_backend"),
        ({"precision": "fp16"}, "precision"),
        ({"fused": "maybe"}, "fused"),
        ({"cuda_graphs": 3}, "cuda_graphs"),
    ],
)
def test_bad_modes_and_overrides_are_one_line_errors_naming_the_option(bad, option):
    with pytest.raises(TrainConfigError, match=f"'{option}'") as ei:
        TrainConfig.from_dict({**BASE, **bad})
    assert "\n" not in str(ei.value)


def test_overrides_default_to_the_mode_and_none_round_trips():
    cfg = TrainConfig.from_dict({**BASE, "precision": "none", "fused": "null"})
    assert all(getattr(cfg, k) is None for k in OVERRIDES) and cfg.execution == "fast"
    assert cfg.execution_overrides() == {}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_effective_config_fills_every_override_and_the_tag():
    cfg = TrainConfig.from_dict({**BASE, "checkpoint_steps": True, "tags": {"team": "a"}})
    gpu = cfg.with_effective_execution("cuda")
    assert (gpu.precision, gpu.fused, gpu.cuda_graphs, gpu.compile, gpu.checkpoint_steps, gpu.scan_backend) == (
        "bf16",
        True,
        True,
        False,
        True,
        "auto",
    )
    assert gpu.tags == {"team": "a", EXECUTION_TAG: "bf16+fused+norm+graphs+ckpt", "vmrnn.world_size": "1"}
    assert gpu.execution == "fast"
    assert gpu.with_effective_execution("cuda") == gpu  # idempotent
    cpu = gpu.with_effective_execution("cpu")  # e.g. a GPU run's checkpoint resumed on CPU
    assert (cpu.precision, cpu.fused, cpu.cuda_graphs) == ("fp32", False, False)
    assert cpu.tags[EXECUTION_TAG] == "fp32+ckpt"
    ddp = cfg.with_effective_execution("cuda", world_size=4)
    assert ddp.cuda_graphs is True and ddp.tags[EXECUTION_TAG] == "bf16+fused+norm+graphs+ckpt"
    assert ddp.tags["vmrnn.world_size"] == "4"


def test_resolution_line():
    assert resolution_line("fast", device="cuda:0") == "fast -> bf16+fused+norm+graphs on cuda:0"
    assert resolution_line("fast", device="cpu") == "fast -> fp32 on cpu (GPU-only parts off)"
    assert resolution_line("reference", device="cpu") == "reference -> fp32 on cpu"
    assert (
        resolution_line("reference", {"precision": "bf16"}, device="cpu")
        == "reference -> fp32 on cpu (GPU-only parts off)"
    )
    assert (
        resolution_line("fast", device="cuda:1", world_size=2)
        == "fast -> bf16+fused+norm+graphs on cuda:1, data-parallel over 2 workers "
        "(one gradient all-reduce in the step)"
    )


def test_mlflow_records_the_execution_that_ran(tmp_path, capsys):
    """The default mode on CPU: MLflow's params are what ran (fp32, no fusion, no graphs), not the mode's
    GPU values nor the unset overrides, and the run is tagged with the description."""
    mlflow = pytest.importorskip("mlflow")
    torch.set_num_threads(1)
    root = write_taxibj(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tiny_cfg(
        root,
        epochs=1,
        max_train_batches=1,
        max_val_batches=1,
        test_at_end=False,
        tracking=True,
        tracking_uri=uri,
        experiment="t-exec",
        log_model=False,
        log_images=False,
        checkpoint_steps=True,
    )
    assert cfg.execution == "fast" and cfg.precision is None
    res = train(cfg)
    assert "execution: fast -> fp32+ckpt on cpu (GPU-only parts off)" in capsys.readouterr().out.splitlines()
    run = mlflow.tracking.MlflowClient(uri).get_run(res.run_id)
    p = run.data.params
    assert {k: p[k] for k in ("execution", *OVERRIDES)} == {
        "execution": "fast",
        "precision": "fp32",
        "fused": "False",
        "cuda_graphs": "False",
        "compile": "False",
        "checkpoint_steps": "True",
        "scan_backend": "auto",
    }
    assert run.data.tags[EXECUTION_TAG] == "fp32+ckpt"
    assert res.config.execution_config("cpu") == ExecutionConfig(checkpoint_steps=True)  # the checkpoints' config


def test_curve_summary_compares_window_means_with_the_fp32_curve():
    ref = [1.0] * 200
    spike = [1.0] * 25 + [1.2] * 25 + [1.0] * 150  # one 25-step window 20% off: 5% over its 100-step window
    again = [1.0 + 0.01 * (-1) ** i for i in range(200)]
    out = curve_summary(
        {"fp32-fused-graphs": ref, "fast": spike, "fp32-fused-graphs (again)": again}, "fp32-fused-graphs"
    )
    assert set(out) == {"fast", "fp32-fused-graphs (again)"}
    assert out["fast"]["max_window_rel_dev"] == pytest.approx(0.2)
    assert out["fast"]["max_window100_rel_dev"] == pytest.approx(0.05)
    assert out["fast"]["final_window"] == out["fast"]["ref_final_window"] == 1.0
    assert out["fp32-fused-graphs (again)"]["max_window_rel_dev"] == pytest.approx(0.0004)
