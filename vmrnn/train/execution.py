"""How a step runs: `ExecutionConfig`, the one table of named modes, and their resolution per device.

Training (`TrainConfig.execution` names a mode, its override fields change single knobs) and
`vmrnn bench` (`--modes`) both take their modes from `MODES`. The fields:

- ``precision="bf16"``: autocast to bf16 for the matrix products and activations; the selective-scan state,
  its A / D / dt-bias, LayerNorm statistics and the loss stay fp32.
- ``fused=True``: SS2D runs its fused layout (channels-last depthwise conv, one GEMM for the four x_proj
  projections, the four-direction scan reading and writing spatial tokens: `vmrnn.ops.ss2d_scan`; long
  sequences at small batch run chunk-parallel).
- ``fused_norm=True`` (fused only): the cross-merge, SS2D's output LayerNorm and the SiLU gate run as one op,
  a Triton kernel each way on GPU (`vmrnn.ops.merge_norm_gate`). Only a mode sets it, not a training override;
  overriding ``fused=False`` turns it off too.
- ``scan_backend``: the reference layout's selective scan (``auto`` | ``torch`` | ``cuda``) or, when fused,
  the fused scan's (``auto`` | ``torch`` | ``triton``); ``auto`` takes the compiled kernel on GPU.
- ``compile=True``: every SS2D forward goes through ``torch.compile`` (inductor fuses the element-wise
  work around the GEMMs and the scan; the scan kernels are custom ops with fake implementations, so
  ``fullgraph=True`` holds: no graph break).
- ``cuda_graphs=True``: the whole step (zero_grad, forward, backward, clipping, optimizer step) is
  captured once per input shape in a CUDA graph and replayed: no per-kernel launch cost.
- ``checkpoint_steps=True``: each rollout step's activations are recomputed in backward (memory).

Each mode is checked against the reference in tests/test_perf_step.py and on the GPU by `vmrnn bench --check`.
This module imports no torch: the training config validates modes with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")
FUSED_BACKENDS = ("auto", "torch", "triton")
REFERENCE_BACKENDS = ("auto", "torch", "cuda")
# The fields a training config may set on top of its mode (None there: the mode's value).
OVERRIDES = ("precision", "fused", "cuda_graphs", "compile", "checkpoint_steps", "scan_backend")


class ExecutionError(ValueError):
    """A mode or an execution field that does not exist or does not fit; `option` names the field."""

    def __init__(self, option: str, detail: str) -> None:
        self.option, self.detail = option, detail
        super().__init__(f"{option} {detail}")


@dataclass(frozen=True)
class ExecutionConfig:
    """How a step runs. `reference()` is the official way: fp32 eager, one scan call per SS2D, no fusion."""

    precision: Precision = "fp32"
    compile: bool = False
    checkpoint_steps: bool = False
    scan_backend: str = "auto"
    fused: bool = False
    cuda_graphs: bool = False
    fused_norm: bool = False

    def __post_init__(self) -> None:
        if self.fused_norm and not self.fused:
            raise ExecutionError("fused_norm", "needs the fused SS2D layout (fused=True)")
        if self.precision not in PRECISIONS:
            raise ExecutionError("precision", f"{self.precision!r} does not exist; choose 'fp32' or 'bf16'")
        allowed = FUSED_BACKENDS if self.fused else REFERENCE_BACKENDS
        if self.scan_backend not in allowed:
            layout = "fused" if self.fused else "reference"
            raise ExecutionError(
                "scan_backend",
                f"{self.scan_backend!r} does not exist for the {layout} SS2D "
                f"layout (fused={self.fused}); choose one of {list(allowed)}",
            )

    @classmethod
    def reference(cls) -> ExecutionConfig:
        return cls()

    def replace(self, **changes: Any) -> ExecutionConfig:
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = [self.precision]
        if self.fused:
            parts.append("fused")
        if self.fused_norm:
            parts.append("norm")
        if self.scan_backend != "auto":
            parts.append(f"scan={self.scan_backend}")
        if self.compile:
            parts.append("compile")
        if self.cuda_graphs:
            parts.append("graphs")
        if self.checkpoint_steps:
            parts.append("ckpt")
        return "+".join(parts)


_REF = ExecutionConfig.reference()
_FUSED_GRAPHS = _REF.replace(precision="bf16", fused=True, cuda_graphs=True)
_FAST = _FUSED_GRAPHS.replace(fused_norm=True)

# The named modes, from the reference to the default fast one, each adding one optimisation. What runs
# on a given device is `resolve_execution`'s answer (on CPU every mode runs as the reference).
MODES: dict[str, ExecutionConfig] = {
    "reference": _REF,
    "fp32-graphs": _REF.replace(cuda_graphs=True),
    "fp32-fused": _REF.replace(fused=True),
    "fp32-fused-graphs": _REF.replace(fused=True, cuda_graphs=True),
    "bf16": _REF.replace(precision="bf16"),
    "bf16-fused": _REF.replace(precision="bf16", fused=True),
    "bf16-fused-compile": _REF.replace(precision="bf16", fused=True, compile=True),
    "bf16-fused-graphs": _FUSED_GRAPHS,
    "bf16-graphs": _REF.replace(precision="bf16", cuda_graphs=True),
    # The default on GPU: bf16, fused SS2D with the Triton scan and its epilogue (cross-merge, out_norm,
    # gate) as one Triton kernel each way, the whole step in a CUDA graph.
    "fast": _FAST,
    # For long rollouts of large grids when memory is short.
    "fast-ckpt": _FAST.replace(checkpoint_steps=True),
    # torch.compile of every SS2D: fewer kernels, a minute or more of compilation per grid size.
    "fast-compile": _FAST.replace(compile=True),
}
DEFAULT_MODE = "fast"


def resolve_execution(
    mode: str, overrides: Mapping[str, Any] | None = None, *, device_type: str, world_size: int = 1
) -> ExecutionConfig:
    """The ExecutionConfig that runs: `MODES[mode]` with the non-None `overrides`, for this device.

    On a device other than CUDA the GPU-only parts are dropped: fp32, the reference layout, no CUDA
    graphs, no torch.compile, no GPU scan backend (bf16 autocast and compilation buy nothing there, and
    the Triton / mamba_ssm kernels need a GPU); activation checkpointing stays. Data-parallel runs
    (world_size > 1) keep every part, CUDA graphs included: the gradient all-reduce is part of the captured
    step (vmrnn.train.data_parallel). Raises ExecutionError naming the bad field.
    """
    if mode not in MODES:
        raise ExecutionError("execution", f"mode {mode!r} does not exist; choose one of {list(MODES)}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - set(OVERRIDES))
    if unknown:
        raise ExecutionError(unknown[0], f"is not an execution field; the fields are {list(OVERRIDES)}")
    # the fused epilogue is part of the fused layout: off with it
    epilogue = {"fused_norm": False} if given.get("fused") is False else {}
    try:
        cfg = MODES[mode].replace(**given, **epilogue)
    except ExecutionError as exc:
        set_ = ", ".join(f"{k}={v!r}" for k, v in given.items())
        raise ExecutionError(
            exc.option, f"{exc.detail} (execution mode {mode!r}{' with ' + set_ if set_ else ''})"
        ) from None
    if device_type != "cuda":
        backend = "torch" if cfg.scan_backend == "torch" else "auto"
        cfg = ExecutionConfig(precision="fp32", checkpoint_steps=cfg.checkpoint_steps, scan_backend=backend)
    if world_size < 1:
        raise ExecutionError("world_size", f"must be >= 1; got {world_size}")
    return cfg


def resolution_line(mode: str, overrides: Mapping[str, Any] | None = None, *, device: str, world_size: int = 1) -> str:
    """One line for the start of a run: "fast -> bf16+fused+norm+graphs on cuda:0", "fast -> fp32 on cpu
    (GPU-only parts off)"."""
    asked = resolve_execution(mode, overrides, device_type="cuda")
    ran = resolve_execution(mode, overrides, device_type=device.split(":")[0], world_size=world_size)
    note = " (GPU-only parts off)" if ran != asked else ""
    if world_size > 1:
        note += f", data-parallel over {world_size} workers (one gradient all-reduce in the step)"
    return f"{mode} -> {ran.describe()} on {device}{note}"


__all__ = [
    "DEFAULT_MODE",
    "MODES",
    "OVERRIDES",
    "ExecutionConfig",
    "ExecutionError",
    "Precision",
    "resolution_line",
    "resolve_execution",
]
