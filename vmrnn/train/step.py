"""One optimisation step and one forecast, as callables the training loop and the benchmark share.

The training loop never runs the model directly: it asks `make_train_step` for a step function, so the
execution mode (precision, compilation, CUDA graphs, fused kernels) is chosen in one place.

Modes (each a field of `ExecutionConfig`, each checked against the reference in tests/test_perf_*.py and
on the GPU by `vmrnn bench --check`):

- ``precision="bf16"``: autocast to bf16 for the matrix products and activations; the selective-scan state,
  its A / D / dt-bias, LayerNorm statistics and the loss stay fp32.
- ``fused=True``: SS2D runs its fused layout (channels-last depthwise conv, one GEMM for the four x_proj
  projections, the four-direction scan reading and writing spatial tokens: `vmrnn.ops.ss2d_scan`; long
  sequences at small batch run chunk-parallel). `vmrnn.models.ss2d.FUSED_TRITON_MAX_L` (default None:
  no limit) can send larger grids back to the reference dataflow with mamba_ssm's kernel.
- ``scan_backend``: the reference layout's selective scan (``auto`` | ``torch`` | ``cuda``) or, when fused,
  the fused scan's (``auto`` | ``torch`` | ``triton``); ``auto`` takes the compiled kernel on GPU.
- ``compile=True``: every SS2D forward goes through ``torch.compile`` (inductor fuses the element-wise
  work around the GEMMs and the scan; the scan kernels are custom ops with fake implementations, so
  ``fullgraph=True`` holds: no graph break).
- ``cuda_graphs=True``: the whole step (zero_grad, forward, backward, clipping, optimizer step) is
  captured once per input shape in a CUDA graph and replayed: no per-kernel launch cost.
- ``checkpoint_steps=True``: each rollout step's activations are recomputed in backward (memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vmrnn.models import rollout_loss

Precision = Literal["fp32", "bf16"]
FUSED_BACKENDS = ("auto", "torch", "triton")
REFERENCE_BACKENDS = ("auto", "torch", "cuda")


@dataclass(frozen=True)
class ExecutionConfig:
    """How a step runs. `reference()` is the official way: fp32 eager, one scan call per SS2D, no fusion."""

    precision: Precision = "fp32"
    compile: bool = False
    checkpoint_steps: bool = False
    scan_backend: str = "auto"
    fused: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}; choose 'fp32' or 'bf16'")
        allowed = FUSED_BACKENDS if self.fused else REFERENCE_BACKENDS
        if self.scan_backend not in allowed:
            layout = "fused" if self.fused else "reference"
            raise ValueError(f"scan_backend {self.scan_backend!r} does not exist for the {layout} SS2D layout; "
                             f"choose one of {allowed}")

    @classmethod
    def reference(cls) -> ExecutionConfig:
        return cls()

    @classmethod
    def fast(cls, device: torch.device | str, *, checkpoint_steps: bool = False,
             compile: bool = False) -> ExecutionConfig:
        """The default on GPU: bf16, fused SS2D with the Triton scan, the whole step in a CUDA graph.

        On CPU it is the reference mode (bf16 / graphs buy nothing there). Pass ``checkpoint_steps=True``
        for long rollouts of large grids when memory is short; ``compile=True`` adds torch.compile of
        every SS2D (fewer kernels, a minute or more of compilation per grid size; see PERFORMANCE.md).
        """
        if torch.device(device).type == "cuda":
            return cls(precision="bf16", fused=True, cuda_graphs=True, checkpoint_steps=checkpoint_steps,
                       compile=compile)
        return cls(checkpoint_steps=checkpoint_steps)

    def replace(self, **changes: Any) -> ExecutionConfig:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [self.precision]
        if self.fused:
            parts.append("fused")
        if self.scan_backend != "auto":
            parts.append(f"scan={self.scan_backend}")
        if self.compile:
            parts.append("compile")
        if self.cuda_graphs:
            parts.append("graphs")
        if self.checkpoint_steps:
            parts.append("ckpt")
        return "+".join(parts)


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

    core = model.module if hasattr(model, "module") else model  # DDP wraps the model
    graph_ckpt = execution.checkpoint_steps and execution.cuda_graphs
    core.checkpoint_steps = execution.checkpoint_steps and not graph_ckpt
    _graph_safe_checkpointing(core, graph_ckpt)
    for m in core.modules():
        if isinstance(m, SS2D):
            m.impl = "fused" if execution.fused else "reference"
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


def make_train_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, n_input: int,
                    execution: ExecutionConfig = ExecutionConfig(), loss_target: str = "all",
                    loss_kind: str = "mse", grad_clip: float | None = None,
                    device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, C, H, W) -> detached loss that runs forward, backward and update."""
    configure_model(model, execution)

    def step(frames: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = _loss_fn(model, frames, n_input, execution, device, loss_target, loss_kind)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    if execution.cuda_graphs and torch.device(device).type == "cuda" and not hasattr(model, "module"):
        return GraphedTrainStep(step, model, optimizer)
    return step


def make_forecast(model: nn.Module, *, n_input: int, execution: ExecutionConfig = ExecutionConfig(),
                  device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A function frames (B, T_tot, ...) -> the full rollout predictions (B, T_tot-1, ...), no grad."""
    configure_model(model, execution)

    @torch.no_grad()
    def forecast(frames: Tensor) -> Tensor:
        with autocast(device, execution.precision):
            return model(frames, n_input).float()

    if execution.cuda_graphs and torch.device(device).type == "cuda":
        return GraphedForecast(forecast, model)
    return forecast


# --- CUDA graphs -----------------------------------------------------------------------------------

_MAX_GRAPHS = 4  # input shapes captured per step function; others run eagerly (e.g. a ragged last batch)


def _graph_key(frames: Tensor, model: nn.Module) -> tuple:
    return (tuple(frames.shape), frames.dtype, frames.device, model.training)


class GraphedForecast:
    """Captures the no-grad rollout once per input shape and replays it."""

    def __init__(self, fn: Callable[[Tensor], Tensor], model: nn.Module, warmup: int = 2) -> None:
        self.fn, self.model, self.warmup = fn, model, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}

    def __call__(self, frames: Tensor) -> Tensor:
        key = _graph_key(frames, self.model)
        if key not in self.graphs:
            if len(self.graphs) >= _MAX_GRAPHS:
                return self.fn(frames)
            static_in = frames.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.fn(static_in)
            self.graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[key]
        static_in.copy_(frames)
        graph.replay()
        return static_out.clone()


class GraphedTrainStep:
    """The whole training step in one CUDA graph per input shape.

    Capture needs a few warm-up steps (lazy optimizer state, cuDNN / Triton / inductor set-up). They run
    on the first batch and are then undone: parameters and optimizer state are restored in place, so
    the first call makes exactly one real update, as the eager step does. The optimizer runs with
    ``capturable=True`` and a tensor learning rate, so LR schedulers keep working (they write the tensor
    in place; a float written over it is noticed and copied in before the next replay).
    """

    def __init__(self, step: Callable[[Tensor], Tensor], model: nn.Module, optimizer: torch.optim.Optimizer,
                 warmup: int = 3) -> None:
        self.step, self.model, self.optimizer, self.warmup = step, model, optimizer, warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor]] = {}
        self._lr_tensors: list[Tensor | None] = []
        self._pool = None

    def _prepare_optimizer(self, device: torch.device) -> None:
        if self._lr_tensors:
            return
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = True
            lr = group.get("lr")
            if "capturable" in group and not isinstance(lr, Tensor):
                group["lr"] = torch.tensor(float(lr), device=device)
            self._lr_tensors.append(group["lr"] if isinstance(group.get("lr"), Tensor) else None)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, Tensor) and step.device != device:
                state["step"] = step.to(device=device, dtype=torch.float32)

    def _sync_lr(self) -> None:
        for group, lr_t in zip(self.optimizer.param_groups, self._lr_tensors):
            if lr_t is not None and group["lr"] is not lr_t:
                lr_t.fill_(float(group["lr"]))  # a scheduler wrote a float: keep the captured tensor
                group["lr"] = lr_t

    def _snapshot(self) -> tuple[list[Tensor], dict]:
        params = [p.detach().clone() for p in self.model.parameters()]
        state = {p: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
                 for p, s in self.optimizer.state.items()}
        return params, state

    @torch.no_grad()
    def _restore(self, snap: tuple[list[Tensor], dict]) -> None:
        params, state = snap
        for p, saved in zip(self.model.parameters(), params):
            p.copy_(saved)
        for p, s in self.optimizer.state.items():
            old = state.get(p)
            for k, v in s.items():
                if isinstance(v, Tensor):
                    if old is not None and k in old:
                        v.copy_(old[k])
                    else:
                        v.zero_()  # lazily created by the warm-up: back to a fresh optimizer's zeros

    def _capture(self, frames: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor]:
        self._prepare_optimizer(frames.device)
        static_in = frames.clone()
        snap = self._snapshot()
        rng = torch.cuda.get_rng_state(frames.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(static_in)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager warm-up's blocks, so the graph's pool does not double the peak
        self._restore(snap)
        torch.cuda.set_rng_state(rng, frames.device)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, pool=self._pool):
            static_loss = self.step(static_in)
        if self._pool is None:
            self._pool = graph.pool()
        return graph, static_in, static_loss

    def __call__(self, frames: Tensor) -> Tensor:
        key = _graph_key(frames, self.model)
        if key not in self.graphs:
            if len(self.graphs) >= _MAX_GRAPHS or not self.model.training:
                return self.step(frames)
            self.graphs[key] = self._capture(frames)
        graph, static_in, static_loss = self.graphs[key]
        self._sync_lr()
        static_in.copy_(frames)
        graph.replay()
        return static_loss.clone()
