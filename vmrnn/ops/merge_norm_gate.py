"""The SS2D epilogue: `merge_norm_gate` (Triton custom ops) beside `merge_norm_gate_ref`.

After the fused scan, SS2D sums the four directions' outputs (the cross-merge), applies its output LayerNorm
and gates with SiLU(z):

    y    (B, L, K, D)  the scan's output per direction at the tokens' spatial places (`vmrnn.ops.ss2d_scan`)
    z    (B, H, W, D)  the gate, H * W = L (a strided view such as a split of the in_proj output is fine)
 -> out  (B, H, W, D)  LayerNorm(sum_k y[:, :, k]) * silu(z)

The reference is that composition in torch: under bf16 autocast about five kernels forward (sum, cast,
LayerNorm in fp32, SiLU, product) and more backward, with the fp32 LayerNorm output kept for the backward.
The Triton op runs one kernel each way and keeps the merged tokens (in the activations' dtype, rounded where
the reference rounds them) and two fp32 numbers per token. Its output is in z's dtype (the reference's is
fp32 under autocast; the output projection casts it to bf16 either way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vmrnn.ops.triton import HAS_TRITON

if HAS_TRITON:
    from vmrnn.ops.triton.merge_norm_gate import merge_norm_gate_bwd, merge_norm_gate_fwd


def _check(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor) -> None:
    if y.dim() != 4:
        raise ValueError(f"y must be (batch, L, directions, D); got {tuple(y.shape)}")
    b, L, _, d = y.shape
    if z.shape[-1] != d or z.numel() != b * L * d:
        raise ValueError(f"z must hold batch x L = {b} x {L} tokens of D={d} channels; got {tuple(z.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.shape != (d,):
            raise ValueError(f"the LayerNorm {name} must be (D,) = ({d},); got {tuple(t.shape)}")


def merge_norm_gate_ref(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """Reference: the four directions summed in fp32, rounded to z's dtype, LayerNorm, times SiLU(z)."""
    _check(y, z, weight, bias)
    merged = y.sum(2, dtype=torch.float32).view(z.shape).to(z.dtype)
    return F.layer_norm(merged, (z.shape[-1],), weight, bias, eps) * F.silu(z)


@torch.library.custom_op("vmrnn::merge_norm_gate_fwd", mutates_args=())
def _op_fwd(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return merge_norm_gate_fwd(y, z, weight, bias, eps)


@_op_fwd.register_fake
def _op_fwd_fake(y, z, weight, bias, eps):
    d = z.shape[-1]
    m = z.numel() // d
    return (
        z.new_empty(z.shape),
        y.new_empty((m, d)),
        y.new_empty((m,), dtype=torch.float32),
        y.new_empty((m,), dtype=torch.float32),
    )


@torch.library.custom_op("vmrnn::merge_norm_gate_bwd", mutates_args=())
def _op_bwd(
    g: Tensor, ym: Tensor, z: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return merge_norm_gate_bwd(g, ym, z, weight, bias, mean, rstd)


@_op_bwd.register_fake
def _op_bwd_fake(g, ym, z, weight, bias, mean, rstd):
    d = ym.shape[1]
    return (
        ym.new_empty(ym.shape),
        z.new_empty(z.shape),
        ym.new_empty((d,), dtype=torch.float32),
        ym.new_empty((d,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    y, z, weight, bias, _ = inputs
    _, ym, mean, rstd = output
    ctx.save_for_backward(ym, z, weight, bias, mean, rstd)
    ctx.y_shape = tuple(y.shape)


def _backward(ctx, g, _gym, _gmean, _grstd):
    ym, z, weight, bias, mean, rstd = ctx.saved_tensors
    dy, dz, dw, db = _op_bwd(g, ym, z, weight, bias, mean, rstd)
    b, L, k, d = ctx.y_shape
    # every direction's output gets the same gradient: one tensor, seen K times (stride 0)
    return dy.view(b, L, 1, d).expand(b, L, k, d), dz, dw.to(weight.dtype), db.to(bias.dtype), None


_op_fwd.register_autograd(_backward, setup_context=_setup_context)


def merge_norm_gate(
    y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, backend: str = "auto"
) -> Tensor:
    """LayerNorm(sum over directions of y) * silu(z) (see the module docstring).

    backend: ``triton`` (one kernel each way), ``torch`` (`merge_norm_gate_ref`), ``auto`` (triton on CUDA
    tensors when triton is installed).
    """
    if backend == "auto":
        backend = "triton" if (y.is_cuda and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("the 'triton' SS2D epilogue needs the triton package")
        _check(y, z, weight, bias)
        return _op_fwd(y, z, weight, bias, float(eps))[0]
    if backend == "torch":
        return merge_norm_gate_ref(y, z, weight, bias, eps)
    raise ValueError(f"unknown SS2D epilogue backend {backend!r}; choose 'auto', 'torch' or 'triton'")


__all__ = ["merge_norm_gate", "merge_norm_gate_ref"]
