"""Kernels, laid out as mamba_ssm's: each op beside its reference, Triton kernels in files of their own.

- `vmrnn.ops.selective_scan`: `selective_scan` (mamba_ssm's CUDA kernel as a custom op) / `selective_scan_ref`.
- `vmrnn.ops.ss2d_scan`: `ss2d_scan` (the four-direction SS2D scan on spatial tokens, Triton custom ops) /
  `ss2d_scan_ref`, and `combine_segments_ref`.
- `vmrnn.ops.scan_plan`: `scan_plan` / `ScanPlan`, how the Triton scan is launched for a size.
- `vmrnn.ops.merge_norm_gate`: `merge_norm_gate` (SS2D's epilogue: the four directions summed, LayerNorm, SiLU
  gate; Triton custom ops) / `merge_norm_gate_ref`.
- `vmrnn.ops.triton`: the Triton kernels (ss2d_scan_fwd, ss2d_scan_bwd, ss2d_combine, merge_norm_gate) and their
  launchers.

The package exports the selective-scan names only: a function `ss2d_scan` or `scan_plan` exported here would
hide the module of the same name (likewise `merge_norm_gate`).
"""

from vmrnn.ops.selective_scan import (
    ScanBackendUnavailable,
    cuda_scan_available,
    selective_scan,
    selective_scan_cuda,
    selective_scan_ref,
)

__all__ = [
    "ScanBackendUnavailable",
    "cuda_scan_available",
    "selective_scan",
    "selective_scan_cuda",
    "selective_scan_ref",
]
