"""Forward and backward kernels of the SS2D epilogue (reference: `vmrnn.ops.merge_norm_gate.merge_norm_gate_ref`).

One program takes BLOCK_M tokens with all D channels: the four directions' outputs summed (the cross-merge),
rounded to the activations' dtype as the reference does, LayerNorm with fp32 statistics, times SiLU(z). The
backward recomputes the normalised tokens from the saved merged ones, writes d(merged) once (the four
directions share it) and dz, and sums the LayerNorm weight and bias gradients per program (added up on the
host side).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from vmrnn.ops.triton import require_triton


@triton.jit
def _merge_norm_gate_fwd_kernel(
    y_ptr,
    z_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    ym_ptr,
    mean_ptr,
    rstd_ptr,
    M,
    D,
    sy_m,
    sy_k,
    sz_m,
    eps,
    K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    rm = rows < M
    cm = cols < D
    m2 = rm[:, None] & cm[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(K):
        acc += tl.load(y_ptr + rows[:, None] * sy_m + k * sy_k + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    xm = acc.to(ym_ptr.dtype.element_ty)  # the merged tokens in the activations' dtype (the reference rounds here)
    tl.store(ym_ptr + rows[:, None] * D + cols[None, :], xm, mask=m2)
    x = xm.to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(m2, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    a = xc * rstd[:, None] * w[None, :] + b[None, :]
    z = tl.load(z_ptr + rows[:, None] * sz_m + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    out = a * (z * tl.sigmoid(z))
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(mean_ptr + rows, mean, mask=rm)
    tl.store(rstd_ptr + rows, rstd, mask=rm)


@triton.jit
def _merge_norm_gate_bwd_kernel(
    g_ptr,
    ym_ptr,
    z_ptr,
    w_ptr,
    b_ptr,
    mean_ptr,
    rstd_ptr,
    dy_ptr,
    dz_ptr,
    dw_ptr,
    db_ptr,
    M,
    D,
    sg_m,
    sz_m,
    ROWS,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cm = cols < D
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(0, ROWS, BLOCK_M):
        rows = pid.to(tl.int64) * ROWS + i + tl.arange(0, BLOCK_M)
        rm = rows < M
        m2 = rm[:, None] & cm[None, :]
        g = tl.load(g_ptr + rows[:, None] * sg_m + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        x = tl.load(ym_ptr + rows[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)
        xhat = tl.where(m2, (x - mean[:, None]) * rstd[:, None], 0.0)
        z = tl.load(z_ptr + rows[:, None] * sz_m + cols[None, :], mask=m2, other=0.0).to(tl.float32)
        sg = tl.sigmoid(z)
        a = xhat * w[None, :] + b[None, :]
        da = g * (z * sg)
        dz = g * a * sg * (1.0 + z * (1.0 - sg))  # d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))
        dw += tl.sum(da * xhat, axis=0)
        db += tl.sum(da, axis=0)
        dxh = da * w[None, :]
        c1 = tl.sum(dxh * xhat, axis=1) / D
        c2 = tl.sum(dxh, axis=1) / D
        dx = (dxh - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dy_ptr + rows[:, None] * D + cols[None, :], dx.to(dy_ptr.dtype.element_ty), mask=m2)
        tl.store(dz_ptr + rows[:, None] * D + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m2)
    tl.store(dw_ptr + pid * D + cols, dw, mask=cm)
    tl.store(db_ptr + pid * D + cols, db, mask=cm)


def _rows(t: Tensor, d: int) -> Tensor:
    """(..., D) as (M, D) with unit channel stride: a view where the strides allow (z, a split of in_proj)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


@functools.cache
def _sms(index: int | None) -> int:
    dev = index if index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _block_m(d: int) -> int:
    return max(1, min(16, 4096 // triton.next_power_of_2(d)))


def merge_norm_gate_fwd(y: Tensor, z: Tensor, weight: Tensor, bias: Tensor, eps: float):
    """out (shape of z, z's dtype), the merged tokens (M, D) in y's dtype, mean and rstd (M,) fp32."""
    require_triton(y)
    d = z.shape[-1]
    y3 = y.reshape(-1, y.shape[-2], d)
    if y3.stride(2) != 1:
        y3 = y3.contiguous()
    z2 = _rows(z, d)
    m = z2.shape[0]
    out = torch.empty(z.shape, device=z.device, dtype=z.dtype)  # contiguous: rows of D
    ym = torch.empty((m, d), device=y.device, dtype=y.dtype)
    mean = torch.empty((m,), device=y.device, dtype=torch.float32)
    rstd = torch.empty((m,), device=y.device, dtype=torch.float32)
    bm, bd = _block_m(d), triton.next_power_of_2(d)
    _merge_norm_gate_fwd_kernel[(triton.cdiv(m, bm),)](
        y3, z2, weight, bias, out, ym, mean, rstd, m, d, y3.stride(0), y3.stride(1), z2.stride(0), eps,
        K=y3.shape[1], BLOCK_M=bm, BLOCK_D=bd, num_warps=4,
    )  # fmt: skip
    return out, ym, mean, rstd


def merge_norm_gate_bwd(g: Tensor, ym: Tensor, z: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor):
    """d(merged) (M, D) in ym's dtype, dz (shape of z), dweight and dbias (D,) fp32."""
    require_triton(g)
    m, d = ym.shape
    g2 = _rows(g, d)
    z2 = _rows(z, d)
    dy = torch.empty_like(ym)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    bm, bd = _block_m(d), triton.next_power_of_2(d)
    # Enough programs to fill the GPU, each summing the weight gradients of many tokens.
    progs = 4 * _sms(g.device.index) if g.is_cuda else 4
    rows = bm * triton.cdiv(triton.cdiv(m, progs), bm)
    progs = triton.cdiv(m, rows)
    dw = torch.empty((progs, d), device=g.device, dtype=torch.float32)
    db = torch.empty((progs, d), device=g.device, dtype=torch.float32)
    _merge_norm_gate_bwd_kernel[(progs,)](
        g2, ym, z2, weight, bias, mean, rstd, dy, dz, dw, db, m, d, g2.stride(0), z2.stride(0),
        ROWS=rows, BLOCK_M=bm, BLOCK_D=bd, num_warps=4,
    )  # fmt: skip
    return dy, dz, dw.sum(0), db.sum(0)
