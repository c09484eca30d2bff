"""One optimisation step and one forecast, as callables the training loop and the benchmark share.

The training loop never runs the model directly: it asks `make_train_step` for a step function, so the
execution mode (`vmrnn.train.execution`: precision, compilation, CUDA graphs, fused kernels) is applied
in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from vmrnn.models import rollout_loss
from vmrnn.train.execution import ExecutionConfig, Precision
from vmrnn.train.graphs import GraphedForecast, GraphedTrainStep


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; choose 'fp32' or 'bf16'")
    return contextlib.nullcontext()


def _compiled_forward(module: nn.Module) -> Callable:
    import torch._dynamo  # noqa: PLC0415

    # One compiled graph per (width, grid, dtype, grad mode) is reused by every block of that shape;
    # VMRNN-D has three shapes, times training / inference, times fp32 / bf16 in the benchmark.
    cfg = torch._dynamo.config
    limit_name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    setattr(cfg, limit_name, max(getattr(cfg, limit_name), 64))
    return torch.compile(type(module).forward.__get__(module), fullgraph=True, dynamic=False)


def _graph_safe_checkpointing(core: nn.Module, enable: bool) -> None:
    """Per-step activation checkpointing that can sit inside a CUDA graph.

    torch.utils.checkpoint saves and restores the CUDA RNG state so that drop-path draws the same masks
    when the step is recomputed, and the RNG state cannot be read while a graph is being captured. Here
    the step's drop-path masks are drawn before the checkpointed region and handed to it as inputs, so
    the recomputation reuses them and no RNG state is needed. Same masks, same order as the eager draw.
    """
    from torch.utils.checkpoint import checkpoint  # noqa: PLC0415

    from vmrnn.models.blocks import DropPath  # noqa: PLC0415

    if "_step" in core.__dict__:
        del core._step
    if not enable:
        return
    drops = [m for m in core.modules() if isinstance(m, DropPath) and m.p > 0]

    def run_step(frame: Tensor, state: Any, *masks: Tensor) -> tuple[Tensor, Any]:
        for m, mask in zip(drops, masks):
            m.fixed_mask = mask
        try:
            return core.step(frame, state)
        finally:
            for m in drops:
                m.fixed_mask = None

    def _step(frame: Tensor, state: Any) -> tuple[Tensor, Any]:
        if not (core.training and torch.is_grad_enabled()):
            return core.step(frame, state)
        masks = [frame.new_empty((frame.shape[0],)).bernoulli_(1.0 - m.p) for m in drops]
        return checkpoint(run_step, frame, state, *masks, use_reentrant=False, preserve_rng_state=False)

    core._step = _step


def configure_model(model: nn.Module, execution: ExecutionConfig) -> nn.Module:
    """Apply the execution knobs that live on the model's modules (in place); returns the model."""
    from vmrnn.models import SS2D  # noqa: PLC0415

    core = model.module if hasattr(model, "module") else model  # a DDP-wrapped model (users may wrap their own)
    graph_ckpt = execution.checkpoint_steps and execution.cuda_graphs
    core.checkpoint_steps = execution.checkpoint_steps and not graph_ckpt
    _graph_safe_checkpointing(core, graph_ckpt)
    for m in core.modules():
        if isinstance(m, SS2D):
            m.impl = "fused" if execution.fused else "reference"
            m.fused_norm = execution.fused_norm
            if execution.fused:
                m.fused_backend = execution.scan_backend
                m.scan_backend = "auto"
            else:
                m.scan_backend = execution.scan_backend
                m.fused_backend = "auto"
            # Reference layout in bf16: bf16 u/delta/B/C go into the scan kernel (fp32 state and A/D/bias).
            m.scan_fp32_inputs = execution.precision == "fp32"
            if "forward" in m.__dict__:  # undo an earlier compile
                del m.forward
            if execution.compile:
                m.forward = _compiled_forward(m)
    return model


def _loss_fn(model, frames, n_input, execution, device, loss_target, loss_kind):
    with autocast(device, execution.precision):
        preds = model(frames, n_input)
        return rollout_loss(preds.float(), frames, n_input, target=loss_target, kind=loss_kind)


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    n_input: int,
    execution: ExecutionConfig = ExecutionConfig(),
    loss_target: str = "all",
    loss_kind: str = "mse",
    grad_clip: float | None = None,
    device: torch.device | str = "cpu",
    grad_sync: Callable[[], None] | None = None,
) -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, C, H, W) -> detached loss that runs forward, backward and update.

    grad_sync: the data-parallel gradient all-reduce (`vmrnn.train.data_parallel.GradientAllReduce`), run
    between backward and clipping; it lives inside the CUDA graph when the step is captured.
    """
    configure_model(model, execution)
    if hasattr(model, "module"):
        raise ValueError("make_train_step takes the bare model; data parallelism goes through grad_sync, not DDP")

    def step(frames: Tensor) -> Tensor:
        # The all-reduce's gradients are views of one flat buffer: zero them in place, never drop them.
        optimizer.zero_grad(set_to_none=grad_sync is None)
        loss = _loss_fn(model, frames, n_input, execution, device, loss_target, loss_kind)
        loss.backward()
        if grad_sync is not None:
            grad_sync()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    if execution.cuda_graphs and torch.device(device).type == "cuda":
        return GraphedTrainStep(step, model, optimizer)
    return step


def make_forecast(
    model: nn.Module,
    *,
    n_input: int,
    execution: ExecutionConfig = ExecutionConfig(),
    device: torch.device | str = "cpu",
) -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, ...) -> the full rollout predictions (B, T_tot-1, ...), no grad."""
    configure_model(model, execution)

    @torch.no_grad()
    def forecast(frames: Tensor) -> Tensor:
        with autocast(device, execution.precision):
            return model(frames, n_input).float()

    if execution.cuda_graphs and torch.device(device).type == "cuda":
        return GraphedForecast(forecast, model)
    return forecast
