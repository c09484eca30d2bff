"""The SS2D scan with cross-scan and cross-merge fused in: `ss2d_scan` (Triton) beside `ss2d_scan_ref`.

The reference SS2D builds four scan-ordered copies of its input (row-major, column-major and both
reversed: `cross_scan`), runs one selective scan over the (B, 4*D, L) stack, and un-permutes and sums the
four outputs (`cross_merge`). Here the scan reads every token straight from the *spatial* channels-last
tensors and writes its output back to the token's spatial place, so no scan-ordered copy ever exists:

    u      (B, L, D)      the SS2D input after conv + SiLU, row-major tokens, channels last
    delta  (B, L, 4, D)   per-direction dt (before bias / softplus), at each token's spatial place
    Bs, Cs (B, L, 4, N)   per-direction B and C (strided views of the x_proj output are fine)
    A      (4D, N) fp32, Ds (4D,), delta_bias (4D,)
 -> y      (B, L, 4, D)   y[:, p, k] = direction k's scan output at the token in spatial place p

Direction k visits spatial place pos_k(l) at scan step l: k=0 row-major l; k=1 column-major
(l % H) * W + l // H; k=2 and k=3 the same walks reversed (l -> L-1-l).

Backends: ``torch`` (`ss2d_scan_ref`: gathers to scan order, runs `selective_scan_ref`, scatters back;
also the CPU path) and ``triton`` (the kernels in `vmrnn.ops.triton`: ss2d_scan_fwd, ss2d_scan_bwd,
ss2d_combine). State and all arithmetic are fp32 whatever the input dtype.

Long sequences at small batch (KTH: 64x64 tokens at B=4, only 128 programs of one warp) run
chunk-parallel (`vmrnn.ops.scan_plan`): the sequence is cut into segments that run from a zero state at
once; a short sequential pass (`ss2d_combine`, reference `combine_segments_ref`) carries the states
across segments (the recurrence is diagonal, so a segment maps a carried state x to
exp(A * sum dt) * x + its own end state); the segments are then replayed from their true start states.
The backward does the same for the state adjoint, walking the other way.
Forward and backward are ``torch.library`` custom ops with fake implementations, so ``torch.compile``
traces through them without a graph break and CUDA graphs can capture them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from vmrnn.ops.scan_plan import N_DIR, ScanPlan, scan_plan
from vmrnn.ops.selective_scan import selective_scan_ref
from vmrnn.ops.triton import HAS_TRITON, triton_usable

if HAS_TRITON:
    from vmrnn.ops.triton.ss2d_scan_bwd import ss2d_scan_bwd
    from vmrnn.ops.triton.ss2d_scan_fwd import ss2d_scan_fwd


# --- index maps ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _scan_index_cpu(h: int, w: int) -> Tensor:
    """(4, L): spatial place of scan step l for each direction."""
    L = h * w
    rows = torch.arange(L)
    cols = torch.arange(L).reshape(h, w).t().reshape(-1)  # column-major walk: step w*H + h -> place h*W + w
    return torch.stack([rows, cols, rows.flip(0), cols.flip(0)])


def scan_index(h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
    return _scan_index_cpu(h, w).to(device)


def to_scan_order(x: Tensor, h: int, w: int) -> Tensor:
    """(B, L, K, C) spatial (K = 4, or 1 for an input shared by the four directions) -> (B, 4, C, L)."""
    idx = scan_index(h, w, x.device)
    b, L, kk, c = x.shape
    out = [x[:, idx[k], k if kk > 1 else 0, :] for k in range(N_DIR)]  # each (B, L, C) in scan order
    return torch.stack(out, dim=1).transpose(2, 3)


def from_scan_order(y: Tensor, h: int, w: int) -> Tensor:
    """(B, 4, C, L) scan order -> (B, L, 4, C) spatial: the adjoint of `to_scan_order` for K = 4."""
    idx = scan_index(h, w, y.device)
    inv = torch.argsort(idx, dim=1)  # spatial place -> scan step
    return torch.stack([y[:, k, :, inv[k]] for k in range(N_DIR)], dim=1).permute(0, 3, 1, 2)


def _check(u: Tensor, delta: Tensor, A: Tensor, Bs: Tensor, Cs: Tensor, h: int, w: int) -> None:
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, L, D); got {tuple(u.shape)}")
    b, L, d = u.shape
    if L != h * w:
        raise ValueError(f"u has {L} tokens but the grid is {h}x{w}")
    if delta.shape != (b, L, N_DIR, d):
        raise ValueError(f"delta must be (batch, L, 4, D) = {(b, L, N_DIR, d)}; got {tuple(delta.shape)}")
    n = A.shape[-1]
    if A.shape != (N_DIR * d, n):
        raise ValueError(f"A must be (4*D, N) = {(N_DIR * d, n)}; got {tuple(A.shape)}")
    for name, t in (("Bs", Bs), ("Cs", Cs)):
        if t.shape != (b, L, N_DIR, n):
            raise ValueError(f"{name} must be (batch, L, 4, N) = {(b, L, N_DIR, n)}; got {tuple(t.shape)}")


def ss2d_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bs: Tensor,
    Cs: Tensor,
    Ds: Tensor | None,
    delta_bias: Tensor | None,
    h: int,
    w: int,
    delta_softplus: bool = True,
) -> Tensor:
    """Reference: gather to scan order, `selective_scan_ref`, scatter back. Returns (B, L, 4, D)."""
    _check(u, delta, A, Bs, Cs, h, w)
    b, L, d = u.shape
    xs = to_scan_order(u.unsqueeze(2), h, w).reshape(b, N_DIR * d, L)
    dts = to_scan_order(delta, h, w).reshape(b, N_DIR * d, L)
    y = selective_scan_ref(xs, dts, A, to_scan_order(Bs, h, w), to_scan_order(Cs, h, w), Ds, delta_bias, delta_softplus)
    return from_scan_order(y.reshape(b, N_DIR, d, L), h, w)


def combine_segments_ref(loc: Tensor, sdt: Tensor, A: Tensor, reverse: bool = False) -> Tensor:
    """Reference of `ss2d_combine`: loc (B*4, S, N, D) per-segment results from a zero carry,
    sdt (B*4, S, D) per-segment sums of dt, A (4D, N) -> the carry into each segment, (B*4, S, N, D)."""
    bk, nseg, n, d = loc.shape
    a = A.float().reshape(N_DIR, d, n).transpose(1, 2).repeat(bk // N_DIR, 1, 1)  # (B*4, N, D)
    x = torch.zeros_like(loc[:, 0])
    out = torch.empty_like(loc)
    for i in range(nseg):
        s = nseg - 1 - i if reverse else i
        out[:, s] = x
        x = torch.exp(sdt[:, s, None, :] * a) * x + loc[:, s]
    return out


# --- the Triton scan as custom ops -----------------------------------------------------------------


def _plan_of(plan: list[int] | None, b: int, L: int, d: int, n: int) -> ScanPlan:
    return ScanPlan(*plan) if plan is not None else scan_plan(b, L, d, n)


@torch.library.custom_op("vmrnn::ss2d_scan_fwd", mutates_args=())
def _op_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bs: Tensor,
    Cs: Tensor,
    Ds: Tensor | None,
    delta_bias: Tensor | None,
    h: int,
    w: int,
    delta_softplus: bool,
    save: bool,
    plan: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    b, L, d = u.shape
    return ss2d_scan_fwd(
        u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save, _plan_of(plan, b, L, d, A.shape[1])
    )


@_op_fwd.register_fake
def _op_fwd_fake(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save, plan=None):
    b, L, d = u.shape
    n = A.shape[1]
    nc = _plan_of(plan, b, L, d, n).nc
    y = u.new_empty((b, L, N_DIR, d))
    hc = u.new_empty((b, N_DIR, nc, n, d) if save else (1,), dtype=torch.float32)
    return y, hc


@torch.library.custom_op("vmrnn::ss2d_scan_bwd", mutates_args=())
def _op_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bs: Tensor,
    Cs: Tensor,
    Ds: Tensor | None,
    delta_bias: Tensor | None,
    hc: Tensor,
    dy: Tensor,
    h: int,
    w: int,
    delta_softplus: bool,
    plan: list[int] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b, L, d = u.shape
    du, ddl, dA, dB, dC, dD, db = ss2d_scan_bwd(
        u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w, delta_softplus, _plan_of(plan, b, L, d, A.shape[1])
    )
    return du, ddl, dA, dB, dC, dD, db


@_op_bwd.register_fake
def _op_bwd_fake(u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, h, w, delta_softplus, plan=None):
    d4 = A.shape[0]
    return (
        u.new_empty(u.shape),
        delta.new_empty(delta.shape),
        A.new_empty(A.shape, dtype=torch.float32),
        Bs.new_empty(Bs.shape),
        Cs.new_empty(Cs.shape),
        A.new_empty((d4,), dtype=torch.float32),
        A.new_empty((d4,), dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save, plan = inputs
    _, hc = output
    ctx.save_for_backward(u, delta, A, Bs, Cs, Ds, delta_bias, hc)
    ctx.h, ctx.w, ctx.softplus, ctx.plan = h, w, delta_softplus, plan
    ctx.has_D, ctx.has_bias = Ds is not None, delta_bias is not None
    ctx.dtypes = (A.dtype, Ds.dtype if Ds is not None else None, delta_bias.dtype if delta_bias is not None else None)


def _backward(ctx, dy, _dhc):
    u, delta, A, Bs, Cs, Ds, delta_bias, hc = ctx.saved_tensors
    du, ddl, dA, dB, dC, dD, db = _op_bwd(
        u, delta, A, Bs, Cs, Ds, delta_bias, hc, dy, ctx.h, ctx.w, ctx.softplus, ctx.plan
    )
    a_t, d_t, b_t = ctx.dtypes
    return (
        du,
        ddl,
        dA.to(a_t),
        dB,
        dC,
        dD.to(d_t) if ctx.has_D else None,
        db.to(b_t) if ctx.has_bias else None,
        None,
        None,
        None,
        None,
        None,
    )


_op_fwd.register_autograd(_backward, setup_context=_setup_context)


def ss2d_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bs: Tensor,
    Cs: Tensor,
    Ds: Tensor | None,
    delta_bias: Tensor | None,
    h: int,
    w: int,
    delta_softplus: bool = True,
    plan: ScanPlan | None = None,
) -> Tensor:
    """The Triton scan, differentiable; `plan` fixes the launch (default: `scan_plan` of the sizes)."""
    if not HAS_TRITON:
        raise RuntimeError("the 'triton' SS2D scan needs the triton package")
    _check(u, delta, A, Bs, Cs, h, w)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, Bs, Cs, Ds, delta_bias)
    )
    y, _ = _op_fwd(
        u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, save, list(plan) if plan is not None else None
    )
    return y


def ss2d_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    Bs: Tensor,
    Cs: Tensor,
    Ds: Tensor | None,
    delta_bias: Tensor | None,
    h: int,
    w: int,
    delta_softplus: bool = True,
    backend: str = "auto",
    plan: ScanPlan | None = None,
) -> Tensor:
    """The fused four-direction SS2D scan, spatial layout in and out (see the module docstring).

    backend: ``triton`` (the kernel), ``torch`` (`ss2d_scan_ref`), ``auto`` (triton where it can run).
    plan: the Triton launch plan (`vmrnn.ops.scan_plan.scan_plan`); None plans from the sizes. It only
    changes how the kernel is launched, never the result; the reference has no launch and ignores it.
    """
    if backend == "auto":
        backend = "triton" if (u.is_cuda and HAS_TRITON) else "torch"
    if backend == "triton":
        return ss2d_scan_triton(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus, plan)
    if backend == "torch":
        return ss2d_scan_ref(u, delta, A, Bs, Cs, Ds, delta_bias, h, w, delta_softplus)
    raise ValueError(f"unknown SS2D scan backend {backend!r}; choose 'auto', 'torch' or 'triton'")


__all__ = [
    "HAS_TRITON",
    "combine_segments_ref",
    "from_scan_order",
    "scan_index",
    "ss2d_scan",
    "ss2d_scan_ref",
    "ss2d_scan_triton",
    "to_scan_order",
    "triton_usable",
]
