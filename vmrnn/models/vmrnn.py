"""VMRNN-B and VMRNN-D, the official rollout, and its loss."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vmrnn.models.blocks import VMRNNCell
from vmrnn.models.config import ModelConfig, model_config
from vmrnn.models.patches import PatchEmbed, PatchExpanding, PatchInflate, PatchMerging


class VMRNNBase(nn.Module):
    """Shared rollout. Subclasses define ``step(frame, state) -> (next_frame, state)``."""

    config: ModelConfig

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Recompute each rollout step in backward instead of storing its activations (memory-bound presets).
        self.checkpoint_steps = False

    def step(self, frame: Tensor, state: Any) -> tuple[Tensor, Any]:
        raise NotImplementedError

    def _step(self, frame: Tensor, state: Any) -> tuple[Tensor, Any]:
        if self.checkpoint_steps and self.training and torch.is_grad_enabled():
            return checkpoint(self.step, frame, state, use_reentrant=False)
        return self.step(frame, state)

    def _check_frames(self, frames: Tensor, what: str) -> None:
        c = self.config
        if frames.dim() != 5:
            raise ValueError(f"{what} must be (batch, time, channels, height, width); got shape {tuple(frames.shape)}")
        _, _, ch, h, w = frames.shape
        if (ch, h, w) != (c.in_chans, c.img_size, c.img_size):
            raise ValueError(
                f"{what} frames are {ch}x{h}x{w} but the model expects "
                f"{c.in_chans}x{c.img_size}x{c.img_size} (channels x height x width)"
            )

    def forward(self, frames: Tensor, n_input: int) -> Tensor:
        """Official rollout over (B, T_tot, C, H, W): predictions of frames 1..T_tot-1.

        Steps 0..n_input-1 read ground-truth frames; later steps read the previous prediction
        (not detached, so gradients flow through the feedback).
        """
        self._check_frames(frames, "frames")
        total = frames.shape[1]
        if not 1 <= n_input < total:
            raise ValueError(f"n_input must be in [1, {total - 1}] for {total} frames; got {n_input}")
        state, out, preds = None, None, []
        for i in range(total - 1):
            out, state = self._step(frames[:, i] if i < n_input else out, state)
            preds.append(out)
        return torch.stack(preds, dim=1)

    def predict(self, inputs: Tensor, n_future: int) -> Tensor:
        """Forecast (B, n_future, C, H, W) from (B, T_in, C, H, W) observed frames."""
        self._check_frames(inputs, "inputs")
        if n_future < 1:
            raise ValueError(f"n_future must be >= 1; got {n_future}")
        state = None
        for i in range(inputs.shape[1] - 1):
            _, state = self._step(inputs[:, i], state)
        out, preds = inputs[:, -1], []
        for _ in range(n_future):
            out, state = self._step(out, state)
            preds.append(out)
        return torch.stack(preds, dim=1)


class VMRNNB(VMRNNBase):
    """VMRNN-B: one VMRNN cell at patch resolution."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        grid = c.img_size // c.patch_size
        self.embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        # Constant drop-path on every block, as the official VMRNN-B (no linspace).
        self.cell = VMRNNCell(c.embed_dim, (grid, grid), c.depth, c.drop_path, c.d_state)
        self.head = PatchInflate(grid, c.patch_size, c.in_chans, c.embed_dim)

    def step(self, frame: Tensor, state: Any) -> tuple[Tensor, Any]:
        h, state = self.cell(self.embed(frame), state)
        return torch.sigmoid(self.head(h)), state


def _linspace_slices(total_rate: float, depths: tuple[int, ...]) -> list[list[float]]:
    rates = torch.linspace(0, total_rate, sum(depths)).tolist()
    starts = [sum(depths[:i]) for i in range(len(depths))]
    return [rates[s : s + d] for s, d in zip(starts, depths)]


class VMRNND(VMRNNBase):
    """VMRNN-D: cells + patch merging going down, cells + patch expanding going up, no skips."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        c = config
        n = len(c.depths_down)
        grid, e = c.img_size // c.patch_size, c.embed_dim
        self.embed = PatchEmbed(c.img_size, c.patch_size, c.in_chans, e)
        down_rates = _linspace_slices(c.drop_path, c.depths_down)
        self.down_cells = nn.ModuleList()
        self.merges = nn.ModuleList()
        for i in range(n):
            r = grid // 2**i
            self.down_cells.append(VMRNNCell(e * 2**i, (r, r), c.depths_down[i], down_rates[i], c.d_state))
            self.merges.append(PatchMerging(r, e * 2**i))
        # depths_up is listed from the output end: up level i (coarsest first) uses depths_up[n-1-i].
        up_rates = _linspace_slices(c.drop_path, c.depths_up)
        self.up_cells = nn.ModuleList()
        self.expands = nn.ModuleList()
        for i in range(n):
            r, dim = grid // 2 ** (n - i), e * 2 ** (n - i)
            self.up_cells.append(VMRNNCell(dim, (r, r), c.depths_up[n - 1 - i], up_rates[n - 1 - i], c.d_state))
            self.expands.append(PatchExpanding(r, dim))
        self.head = PatchInflate(grid, c.patch_size, c.in_chans, e)

    def step(self, frame: Tensor, state: Any) -> tuple[Tensor, Any]:
        n = len(self.down_cells)
        down, up = state if state is not None else ([None] * n, [None] * n)
        new_down, new_up = [], []
        x = self.embed(frame)
        for cell, merge, s in zip(self.down_cells, self.merges, down):
            x, s = cell(x, s)
            new_down.append(s)
            x = merge(x)
        for cell, expand, s in zip(self.up_cells, self.expands, up):
            x, s = cell(x, s)
            new_up.append(s)
            x = expand(x)
        return torch.sigmoid(self.head(x)), (new_down, new_up)


LossKind = Literal["mse", "mse+l1"]
LossTarget = Literal["all", "future"]


def rollout_loss(
    preds: Tensor, frames: Tensor, n_input: int, target: LossTarget = "all", kind: LossKind = "mse"
) -> Tensor:
    """The official training loss of a rollout.

    ``target="all"`` (OpenSTL): mean squared error over all T_tot-1 outputs against frames 1..T_tot-1,
    teacher-forced reconstructions included. ``"future"``: only the predicted frames n_input.. .
    ``kind="mse+l1"`` adds the L1 mean, as the standalone Moving MNIST code trains.
    """
    if target == "all":
        p, t = preds, frames[:, 1:]
    elif target == "future":
        p, t = preds[:, n_input - 1 :], frames[:, n_input:]
    else:
        raise ValueError(f"unknown loss target {target!r}; choose 'all' or 'future'")
    loss = F.mse_loss(p, t)
    if kind == "mse+l1":
        loss = loss + F.l1_loss(p, t)
    elif kind != "mse":
        raise ValueError(f"unknown loss kind {kind!r}; choose 'mse' or 'mse+l1'")
    return loss


def build_model(preset: str | ModelConfig, **overrides: Any) -> VMRNNBase:
    """Build VMRNN-B or VMRNN-D from a preset name (see PRESETS) or a ModelConfig, plus overrides."""
    cfg = model_config(preset, **overrides)
    return VMRNNB(cfg) if cfg.arch == "b" else VMRNND(cfg)
