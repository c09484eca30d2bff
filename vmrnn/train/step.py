"""One optimisation step and one forecast, as callables the training loop and the benchmark share.

The training loop never runs the model directly: it asks `make_train_step` for a step function, so the
execution mode (precision, compilation, CUDA graphs, fused kernels) is chosen in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vmrnn.models import rollout_loss

Precision = Literal["fp32", "bf16"]


@dataclass(frozen=True)
class ExecutionConfig:
    """How a step runs. `reference()` is the official way: fp32 eager, no fusion."""

    precision: Precision = "fp32"
    compile: bool = False
    checkpoint_steps: bool = False
    scan_backend: str = "auto"

    @classmethod
    def reference(cls) -> ExecutionConfig:
        return cls()

    @classmethod
    def fast(cls, device: torch.device | str) -> ExecutionConfig:
        """The default on GPU; on CPU the reference mode (bf16/compile buy nothing there)."""
        if torch.device(device).type == "cuda":
            return cls(precision="bf16")
        return cls()


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; choose 'fp32' or 'bf16'")
    return contextlib.nullcontext()


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, n_input: int,
                    execution: ExecutionConfig = ExecutionConfig(), loss_target: str = "all",
                    loss_kind: str = "mse", grad_clip: float | None = None,
                    device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, C, H, W) -> detached loss that runs forward, backward and update."""
    core = model.module if hasattr(model, "module") else model  # DDP wraps the model
    core.checkpoint_steps = execution.checkpoint_steps

    def step(frames: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, execution.precision):
            preds = model(frames, n_input)
            loss = rollout_loss(preds.float(), frames, n_input, target=loss_target, kind=loss_kind)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    return step


def make_forecast(model: nn.Module, *, n_input: int, execution: ExecutionConfig = ExecutionConfig(),
                  device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, ...) -> the full rollout predictions (B, T_tot-1, ...), no grad."""

    @torch.no_grad()
    def forecast(frames: Tensor) -> Tensor:
        with autocast(device, execution.precision):
            return model(frames, n_input).float()

    return forecast
