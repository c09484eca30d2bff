"""Metrics: against scikit-image and numpy restatements of the official code, hand-computed cases,
streaming versus one-shot, and data-parallel reduction."""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage.metrics import structural_similarity

from vmrnn.metrics import (
    MetricAccumulator,
    compute_metrics,
    mae_per_frame,
    metrics_per_frame,
    mse_per_frame,
    psnr_per_frame,
    ssim_per_frame,
)


def pair(shape=(3, 4, 2, 16, 20), seed=0, noise=0.15):
    g = torch.Generator().manual_seed(seed)
    true = torch.rand(shape, generator=g)
    pred = true + noise * torch.randn(shape, generator=g)  # some values outside [0, 1]: exercises the clip
    return pred.float(), true.float()


def official_numpy(pred: np.ndarray, true: np.ndarray, data_range: float) -> dict:
    """The official OpenSTL metric code restated in numpy from VMRNN_SPEC 4.1 (skimage with an explicit
    data_range and channel_axis in place of skimage 0.19's inferred range and multichannel)."""
    mse = np.mean(np.sum((pred - true) ** 2, axis=(2, 3, 4)))
    mae = np.mean(np.sum(np.abs(pred - true), axis=(2, 3, 4)))
    pred = np.maximum(pred, 0)
    pred = np.minimum(pred, 1)
    ssim, psnr = 0.0, 0.0
    for b in range(pred.shape[0]):
        for f in range(pred.shape[1]):
            ssim += structural_similarity(
                pred[b, f].swapaxes(0, 2), true[b, f].swapaxes(0, 2), data_range=data_range, channel_axis=-1
            )
            with np.errstate(over="ignore"):
                err = np.mean((np.uint8(pred[b, f] * 255) - np.uint8(true[b, f] * 255)) ** 2)
            psnr += float("inf") if err == 0 else 20 * np.log10(255) - 10 * np.log10(err)
    n = pred.shape[0] * pred.shape[1]
    return {"mse": mse, "mae": mae, "ssim": ssim / n, "psnr": psnr / n}


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_scikit_image(channels, data_range):
    pred, true = pair((2, 3, channels, 17, 23), seed=channels)
    p, t = pred.double().clamp(0, 1), true.double()
    ours = ssim_per_frame(p, t, data_range)
    ref = np.array(
        [
            [
                structural_similarity(p[b, f].numpy(), t[b, f].numpy(), data_range=data_range, channel_axis=0)
                for f in range(3)
            ]
            for b in range(2)
        ]
    )
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12)


def test_paper_mode_reproduces_the_official_code():
    pred, true = pair((2, 3, 2, 32, 32), seed=5)
    ref = official_numpy(pred.numpy(), true.numpy(), 2.0)
    got = compute_metrics(pred, true, "paper")
    # float32 inputs: the official code sums in float32 and skimage filters in float32; we work in float64
    assert got["mse"] == pytest.approx(ref["mse"], rel=1e-5)
    assert got["mae"] == pytest.approx(ref["mae"], rel=1e-5)
    assert got["ssim"] == pytest.approx(ref["ssim"], abs=1e-5)
    assert got["psnr"] == pytest.approx(ref["psnr"], rel=1e-12)  # integer arithmetic: exact
    # and with float64 inputs the SSIM agrees to rounding
    p64, t64 = pred.double(), true.double()
    ref64 = official_numpy(p64.numpy(), t64.numpy(), 2.0)
    assert compute_metrics(p64, t64, "paper")["ssim"] == pytest.approx(ref64["ssim"], abs=1e-12)
    std = compute_metrics(pred, true, "standard")
    assert std["ssim"] == pytest.approx(official_numpy(p64.numpy(), t64.numpy(), 1.0)["ssim"], abs=1e-5)
    assert std["ssim"] < got["ssim"]  # data_range 2 inflates SSIM


def test_mse_mae_are_per_frame_sums_averaged_over_frames():
    true = torch.zeros(1, 2, 1, 8, 8)
    pred = true.clone()
    pred[0, 0] = 0.5  # frame 0: 64 pixels off by 0.5; frame 1 exact
    assert mse_per_frame(pred, true).tolist() == [[16.0, 0.0]]
    assert mae_per_frame(pred, true).tolist() == [[32.0, 0.0]]
    r = compute_metrics(pred, true, "standard")
    assert r["mse"] == 8.0 and r["mae"] == 16.0
    assert r["per_frame"]["mse"] == [16.0, 0.0] and r["per_frame"]["mae"] == [32.0, 0.0]
    assert r["per_frame"]["psnr"][1] == math.inf and r["per_frame"]["ssim"][1] == 1.0
    assert r["per_frame"]["psnr"][0] == pytest.approx(-10 * math.log10(0.25))


def test_paper_psnr_wraps_like_uint8():
    true = torch.zeros(1, 2, 1, 8, 8)
    pred = torch.zeros(1, 2, 1, 8, 8)
    pred[0, 0] = 0.8  # uint8(0.8 * 255) = 204: error +204 -> 204^2 = 41616 = 144 (mod 256)
    true[0, 1] = 0.8  # error -204 -> 52 (mod 256) -> 2704 = 144 (mod 256)
    psnr = psnr_per_frame(pred, true, "paper")
    expect = 20 * math.log10(255) - 10 * math.log10(144)
    assert psnr[0].tolist() == pytest.approx([expect, expect], rel=1e-14)
    # the float definition sees a much larger error
    std = psnr_per_frame(pred, true, "standard")
    assert std[0, 0].item() == pytest.approx(-10 * math.log10(0.64))
    # an error of 16 wraps to 0: the paper PSNR is then infinite
    pred2 = torch.full((1, 1, 1, 8, 8), 16 / 255 + 1e-4)
    assert psnr_per_frame(pred2, torch.zeros_like(pred2), "paper").item() == math.inf


def test_uint8_truncation_matches_numpy():
    vals = np.concatenate(
        [np.arange(256, dtype=np.float32) / np.float32(255), np.random.default_rng(0).random(5000, dtype=np.float32)]
    )
    # per-pixel against numpy's uint8 arithmetic on float32 arrays
    for shift in (0, 37, 200):
        p = vals.reshape(1, 1, 1, -1, 1)
        t = np.roll(vals, shift).reshape(1, 1, 1, -1, 1)
        with np.errstate(over="ignore"):
            err = np.mean((np.uint8(p * 255) - np.uint8(t * 255)) ** 2)
        ours = psnr_per_frame(torch.from_numpy(p.copy()), torch.from_numpy(t.copy()), "paper").item()
        expect = float("inf") if err == 0 else 20 * np.log10(255) - 10 * np.log10(err)
        assert ours == pytest.approx(expect, rel=1e-14)


def test_predictions_are_clipped_after_mse_and_mae():
    true = torch.ones(1, 1, 1, 8, 8)
    pred = torch.full((1, 1, 1, 8, 8), 1.5)
    for mode in ("paper", "standard"):
        r = compute_metrics(pred, true, mode)
        assert r["mse"] == 16.0 and r["mae"] == 32.0  # raw predictions
        assert r["psnr"] == math.inf and r["ssim"] == 1.0  # clipped predictions equal the target


def test_streaming_equals_one_shot_and_states_sum():
    pred, true = pair((11, 5, 1, 12, 12), seed=3)
    for mode in ("paper", "standard"):
        one = compute_metrics(pred, true, mode)
        acc = MetricAccumulator(mode, n_frames=5)
        for a, b in ((0, 4), (4, 5), (5, 11)):
            acc.update(pred[a:b], true[a:b])
        s = acc.compute()
        assert s["count"] == one["count"] == 11 and s["n_frames"] == 5 and s["mode"] == mode
        for k in ("mse", "mae", "ssim", "psnr"):
            assert s[k] == pytest.approx(one[k], rel=1e-13)
            np.testing.assert_allclose(s["per_frame"][k], one["per_frame"][k], rtol=1e-13)
        # two "workers" on disjoint shards: summed states == one-shot
        w1, w2 = MetricAccumulator(mode), MetricAccumulator(mode)
        w1.update(pred[:6], true[:6])
        w2.update(pred[6:], true[6:])
        state = w1.state_tensor() + w2.state_tensor()
        assert state.dtype == torch.float64 and state.shape == (25,)
        total = MetricAccumulator(mode)
        total.load_state_tensor(state)
        merged = MetricAccumulator(mode).merge(w1).merge(w2)
        for r in (total.compute(), merged.compute()):
            for k in ("mse", "mae", "ssim", "psnr"):
                assert r[k] == pytest.approx(one[k], rel=1e-13)
    # per-lead-time values are means over samples of each frame
    per = metrics_per_frame(pred, true, "standard")  # `one` is the standard-mode result here
    np.testing.assert_allclose(one["per_frame"]["ssim"], per["ssim"].mean(0).numpy(), rtol=1e-13)


def test_accumulator_errors():
    acc = MetricAccumulator("paper")
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="mode"):
        MetricAccumulator("fancy")
    p, t = pair((2, 3, 1, 8, 8))
    acc.update(p, t)
    with pytest.raises(ValueError, match="frames"):
        acc.update(*pair((2, 4, 1, 8, 8)))
    with pytest.raises(ValueError, match="shape"):
        acc.update(p, t[:, :2])
    with pytest.raises(ValueError, match="SSIM window"):
        compute_metrics(*pair((1, 1, 1, 6, 6)))
    assert MetricAccumulator("paper").all_reduce() is not None  # no process group: a no-op


def _worker(rank: int, world: int, init: str, out: str) -> None:
    # forked from a process whose OpenMP pool is initialised: stay single-threaded (as DataLoader workers do)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pred, true = pair((7, 3, 2, 10, 10), seed=9)
    acc = MetricAccumulator("paper", n_frames=3)
    shard = slice(0, 5) if rank == 0 else slice(5, 7)  # uneven shards
    acc.update(pred[shard], true[shard])
    acc.all_reduce()
    if rank == 0:
        torch.save(acc.state_tensor(), out)
    dist.destroy_process_group()


def test_all_reduce_over_two_processes(tmp_path):
    init = f"file://{tmp_path / 'store'}"
    out = str(tmp_path / "state.pt")
    ctx = mp.start_processes(
        _worker, args=(2, init, out), nprocs=2, join=False, start_method="fork" if os.name == "posix" else "spawn"
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 120 s")
    acc = MetricAccumulator("paper")
    acc.load_state_tensor(torch.load(out))
    one = compute_metrics(*pair((7, 3, 2, 10, 10), seed=9), "paper")
    r = acc.compute()
    assert r["count"] == 7
    for k in ("mse", "mae", "ssim", "psnr"):
        assert r[k] == pytest.approx(one[k], rel=1e-13)
