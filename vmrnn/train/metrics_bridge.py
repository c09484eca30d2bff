"""The training loop's view of `vmrnn.metrics`: make an accumulator, sum it over ranks, flatten its result."""

from __future__ import annotations

from typing import Any

from vmrnn.metrics import MetricAccumulator
from vmrnn.train.distributed import DistEnv, all_reduce_tensor_


def make_accumulator(mode: str, n_frames: int) -> MetricAccumulator:
    # n_frames up front: a rank that sees no batch must still take part in the all-reduce.
    return MetricAccumulator(mode=mode, n_frames=n_frames)


def all_reduce(acc: MetricAccumulator, env: DistEnv) -> None:
    """Sum the accumulator's state over ranks (in place); the same as one pass over all the data."""
    if not env.distributed:
        return
    state = acc.state_tensor()
    all_reduce_tensor_(state, env)
    acc.load_state_tensor(state)


def compute(acc: MetricAccumulator) -> dict[str, Any]:
    """{'mse', 'mae', 'ssim', 'psnr', 'count'} plus per-lead-time lists '<metric>_by_lead'."""
    if acc.count == 0:
        out: dict[str, Any] = {k: float("nan") for k in ("mse", "mae", "ssim", "psnr")}
        out["count"] = 0
        return out
    res = acc.compute()
    out = {k: float(res[k]) for k in ("mse", "mae", "ssim", "psnr")}
    out["count"] = int(res["count"])
    for k, v in res.get("per_frame", {}).items():
        out[f"{k}_by_lead"] = [float(x) for x in v]
    return out
