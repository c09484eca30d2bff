"""Evaluation metrics: MSE, MAE, SSIM and PSNR, in the official (`paper`) or the `standard` convention.

All functions take (B, T, C, H, W) tensors in [0, 1] (any float dtype, any device) and work in float64.

* **MSE / MAE** (both modes): per frame, the **sum** over C*H*W of the squared / absolute error, then the
  mean over frames (OpenSTL / paper convention; on the [0, 1] scale). Computed on the raw predictions.
* After MSE and MAE the predictions are clipped to [0, 1] (as OpenSTL does); SSIM and PSNR use the
  clipped predictions.
* **SSIM**: 7x7 uniform window, sample covariance (N / (N - 1)), K1 = 0.01, K2 = 0.03, averaged over the
  valid region (the window fully inside the image: what scikit-image's ``structural_similarity`` keeps
  after cropping its border), per channel, then over channels, then over frames. `paper`: data_range
  2.0 (what skimage 0.19 inferred for float input in the official code); `standard`: data_range 1.0.
* **PSNR**, `paper`: per frame ``20 log10(255) - 10 log10(mean((u8(pred*255) - u8(true*255))^2))`` where
  u8 truncates and the subtraction and the squaring wrap modulo 256 as numpy uint8 arithmetic does (an
  error of +-204 counts as 144); `standard`: ``-10 log10(mean((pred - true)^2))`` in float (data range 1).
  A frame predicted exactly gives +inf in both modes, as in the official code.

:class:`MetricAccumulator` streams batches; its state is one float64 tensor of per-frame sums and counts,
so sums from data-parallel workers (``all_reduce`` or summed ``state_tensor()``) give the same result as
one pass over the whole set.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

MODES = ("paper", "standard")
METRICS = ("mse", "mae", "ssim", "psnr")
SSIM_WIN = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_DATA_RANGE = {"paper": 2.0, "standard": 1.0}
_PSNR_PEAK_DB = 20 * math.log10(255)
_CHUNK_FRAMES = 256  # frames per SSIM chunk (bounds memory)


def _check(pred: torch.Tensor, true: torch.Tensor) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} differ in shape")
    if pred.dim() != 5:
        raise ValueError(f"expected (B, T, C, H, W) tensors, got shape {tuple(pred.shape)}")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown metrics mode {mode!r}; choose one of {MODES}")
    return mode


def mse_per_frame(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, T) float64: sum over C, H, W of the squared error."""
    _check(pred, true)
    return (pred.double() - true.double()).square().sum(dim=(2, 3, 4))


def mae_per_frame(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """(B, T) float64: sum over C, H, W of the absolute error."""
    _check(pred, true)
    return (pred.double() - true.double()).abs().sum(dim=(2, 3, 4))


def ssim_per_frame(
    pred: torch.Tensor,
    true: torch.Tensor,
    data_range: float,
    win_size: int = SSIM_WIN,
    k1: float = SSIM_K1,
    k2: float = SSIM_K2,
) -> torch.Tensor:
    """(B, T) float64 SSIM, channels averaged; equals skimage ``structural_similarity(p, t,
    data_range=data_range, channel_axis=...)`` per frame (uniform window, sample covariance)."""
    _check(pred, true)
    b, t, c, h, w = pred.shape
    if h < win_size or w < win_size:
        raise ValueError(f"frames of {h}x{w} are smaller than the {win_size}x{win_size} SSIM window")
    x = pred.reshape(b * t * c, 1, h, w)
    y = true.reshape(b * t * c, 1, h, w)
    npix = win_size * win_size
    cov_norm = npix / (npix - 1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    out = []
    step = _CHUNK_FRAMES * max(1, c)
    for s in range(0, x.shape[0], step):
        xs, ys = x[s : s + step].double(), y[s : s + step].double()
        stats = F.avg_pool2d(torch.cat([xs, ys, xs * xs, ys * ys, xs * ys], dim=1), win_size, stride=1)
        ux, uy, uxx, uyy, uxy = stats.unbind(dim=1)
        vx = cov_norm * (uxx - ux * ux)
        vy = cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        out.append(s_map.mean(dim=(1, 2)))
    return torch.cat(out).reshape(b, t, c).mean(dim=2)


def _to_u8_like_numpy(x: torch.Tensor) -> torch.Tensor:
    """numpy's ``uint8(x * 255)`` for a float32 array, as int64: x*255 in float32, truncated toward zero,
    wrapped modulo 256 (what the cast does for out-of-range values on x86)."""
    return torch.remainder((x.float() * 255).to(torch.int64), 256)


def psnr_per_frame(pred: torch.Tensor, true: torch.Tensor, mode: str = "paper") -> torch.Tensor:
    """(B, T) float64 PSNR of (already clipped) predictions; see the module doc for the two modes."""
    _check(pred, true)
    _check_mode(mode)
    if mode == "paper":
        d = torch.remainder(_to_u8_like_numpy(pred) - _to_u8_like_numpy(true), 256)
        mse = torch.remainder(d * d, 256).double().mean(dim=(2, 3, 4))
        return _PSNR_PEAK_DB - 10 * torch.log10(mse)
    mse = (pred.double() - true.double()).square().mean(dim=(2, 3, 4))
    return -10 * torch.log10(mse)


def metrics_per_frame(pred: torch.Tensor, true: torch.Tensor, mode: str = "paper") -> dict[str, torch.Tensor]:
    """{'mse', 'mae', 'ssim', 'psnr'} -> (B, T) float64 values of each frame."""
    _check(pred, true)
    _check_mode(mode)
    with torch.no_grad():
        out = {"mse": mse_per_frame(pred, true), "mae": mae_per_frame(pred, true)}
        clipped = pred.float().clamp(0.0, 1.0)
        out["ssim"] = ssim_per_frame(clipped, true, SSIM_DATA_RANGE[mode])
        out["psnr"] = psnr_per_frame(clipped, true, mode)
    return out


class MetricAccumulator:
    """Streaming MSE / MAE / SSIM / PSNR over batches of (B, T, C, H, W) predictions.

    State: a float64 tensor of shape (5 * n_frames,) = per-frame sums of mse, mae, ssim, psnr and the
    per-frame sample count. Summing the states of several accumulators (``merge``, ``all_reduce``, or
    ``state_tensor`` + ``load_state_tensor``) is the same as accumulating all their batches in one.
    """

    ROWS = (*METRICS, "count")

    def __init__(self, mode: str = "paper", n_frames: int | None = None, device: torch.device | str | None = None):
        self.mode = _check_mode(mode)
        self.n_frames = n_frames
        self.device = torch.device(device) if device is not None else None
        self._state: torch.Tensor | None = None
        if n_frames is not None:
            self._init_state(n_frames, self.device or torch.device("cpu"))

    def _init_state(self, n_frames: int, device: torch.device) -> None:
        if n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames}")
        self.n_frames = int(n_frames)
        self._state = torch.zeros(len(self.ROWS), self.n_frames, dtype=torch.float64, device=device)

    def reset(self) -> None:
        if self._state is not None:
            self._state.zero_()

    def update(self, pred: torch.Tensor, true: torch.Tensor) -> None:
        _check(pred, true)
        t = pred.shape[1]
        if self._state is None:
            self._init_state(t, self.device or pred.device)
        elif t != self.n_frames:
            raise ValueError(f"batch has {t} frames, the accumulator {self.n_frames}")
        vals = metrics_per_frame(pred, true, self.mode)
        assert self._state is not None
        dev = self._state.device
        for i, k in enumerate(METRICS):
            self._state[i] += vals[k].sum(dim=0).to(dev)
        self._state[len(METRICS)] += pred.shape[0]

    # ---- state exchange -------------------------------------------------------------------------
    def state_tensor(self) -> torch.Tensor:
        """A copy of the state: float64 (5 * n_frames,), rows mse, mae, ssim, psnr, count."""
        if self._state is None:
            raise ValueError("the accumulator has no frames yet: give n_frames or call update first")
        return self._state.reshape(-1).clone()

    def load_state_tensor(self, state: torch.Tensor) -> None:
        state = torch.as_tensor(state, dtype=torch.float64)
        if state.dim() != 1 or state.numel() % len(self.ROWS):
            raise ValueError(f"state must be a 1-D tensor of 5 * n_frames values, got shape {tuple(state.shape)}")
        n = state.numel() // len(self.ROWS)
        if self.n_frames is not None and n != self.n_frames:
            raise ValueError(f"state holds {n} frames, the accumulator {self.n_frames}")
        device = self._state.device if self._state is not None else (self.device or state.device)
        self.n_frames = n
        self._state = state.reshape(len(self.ROWS), n).to(device).clone()

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        if other.mode != self.mode:
            raise ValueError(f"cannot merge a {other.mode!r} accumulator into a {self.mode!r} one")
        if other._state is None:
            return self
        if self._state is None:
            self.load_state_tensor(other.state_tensor())
            return self
        if other.n_frames != self.n_frames:
            raise ValueError(f"cannot merge {other.n_frames} frames into {self.n_frames}")
        self._state += other._state.to(self._state.device)
        return self

    def all_reduce(self, group: Any = None) -> MetricAccumulator:
        """Sum the state over the processes of `group` (in place) when torch.distributed is initialized;
        a no-op otherwise. Call it once, after the last update, on every rank. Every rank must already
        know n_frames (pass it to the constructor if a rank may see no batch)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._state is None:
            raise ValueError("all_reduce before any update: construct the accumulator with n_frames")
        state = self._state
        if dist.get_backend(group) == "nccl" and state.device.type != "cuda":
            state = state.cuda()
        dist.all_reduce(state, op=dist.ReduceOp.SUM, group=group)
        self._state = state.to(self._state.device)
        return self

    # ---- results --------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return 0 if self._state is None else int(self._state[len(METRICS), 0].item())

    def compute(self) -> dict[str, Any]:
        """{'mse', 'mae', 'ssim', 'psnr': means over samples and frames, 'count': samples,
        'n_frames', 'mode', 'per_frame': {metric: [mean at lead time 1, 2, ...]}}."""
        if self._state is None or self.count == 0:
            raise ValueError("no samples accumulated")
        s = self._state.detach().cpu()
        per_frame = s[: len(METRICS)] / s[len(METRICS)]
        out: dict[str, Any] = {k: float(per_frame[i].mean()) for i, k in enumerate(METRICS)}
        out.update(
            count=self.count,
            n_frames=self.n_frames,
            mode=self.mode,
            per_frame={k: [float(v) for v in per_frame[i]] for i, k in enumerate(METRICS)},
        )
        return out


def compute_metrics(pred: torch.Tensor, true: torch.Tensor, mode: str = "paper") -> dict[str, Any]:
    """One-shot metrics over a whole (N, T, C, H, W) set (same output as MetricAccumulator.compute)."""
    acc = MetricAccumulator(mode)
    acc.update(pred, true)
    return acc.compute()


__all__ = [
    "METRICS",
    "MODES",
    "MetricAccumulator",
    "compute_metrics",
    "mae_per_frame",
    "metrics_per_frame",
    "mse_per_frame",
    "psnr_per_frame",
    "ssim_per_frame",
]
