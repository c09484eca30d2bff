"""The torchrun data-parallel checks of benchmarks/ddp_scaling.py, on CPU with gloo (2 processes).

On GPUs the same script runs with NCCL (docs/PERFORMANCE.md, "Multi-GPU"); here it proves the reduction:
2 ranks x batch 2 follow 1 rank x batch 4 step for step, and validation metrics are reduced over ranks.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "ddp_scaling.py"
sys.path.insert(0, str(REPO / "benchmarks"))


def torchrun(nproc: int, *args: str, cwd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # --standalone: a c10d rendezvous on localhost with a free port (loopback only)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(SCRIPT),
        *args,
    ]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_ranks_follow_one_rank_with_the_global_batch(tmp_path):
    from ddp_scaling import compare

    common = ["check", "--preset", "taxibj-tiny", "--global-batch", "4", "--steps", "50", "--device", "cpu"]
    torchrun(1, *common, "--out", str(tmp_path / "one.json"), cwd=tmp_path)
    torchrun(2, *common, "--out", str(tmp_path / "two.json"), cwd=tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert (one["world_size"], two["world_size"], two["per_rank_batch"]) == (1, 2, 2)
    assert one["val"]["count"] == two["val"]["count"] == 8  # every validation sample scored once, over ranks
    got = compare(one, two)
    assert got["max_loss_rel_diff"] < 1e-4, got  # fp32 reduction-order noise only
    assert got["max_val_rel_diff"] < 1e-3, got
    assert got["last_loss"] < 0.8 * got["first_loss"], got  # and it learns


@pytest.mark.slow
def test_weak_scaling_speed_mode_reports_group_throughput(tmp_path):
    torchrun(
        2,
        "speed",
        "--preset",
        "taxibj-tiny",
        "--batch",
        "2",
        "--warmup",
        "1",
        "--iters",
        "3",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "s.json"),
        cwd=tmp_path,
    )
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["world_size"] == 2 and s["step_ms"] > 0
    assert s["samples_per_s"] == pytest.approx(2 * 2 / (s["step_ms"] / 1e3), rel=0.01)
