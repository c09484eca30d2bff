"""The forward kernel of the fused SS2D scan and its launcher (layout: `vmrnn.ops.ss2d_scan`).

The state (BD channels x N) stays in registers while a program walks its tokens in scan order, reading
every token at its spatial place; the state is stored every CK tokens for the backward. All arithmetic
and the state are fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from vmrnn.ops.scan_plan import N_DIR, ScanPlan
from vmrnn.ops.triton import require_triton
from vmrnn.ops.triton.ss2d_combine import ss2d_combine
from vmrnn.ops.triton.ss2d_steps import scan_position, softplus


@triton.jit
def _ss2d_fwd_kernel(
    u_ptr,
    dl_ptr,
    b_ptr,
    c_ptr,
    a_ptr,
    dsk_ptr,
    bias_ptr,
    y_ptr,
    hc_ptr,
    hl_ptr,
    sdt_ptr,
    L,
    H,
    W,
    D,
    NC,
    NSEG,
    CPS,
    su_b,
    su_l,
    sd_b,
    sd_l,
    sd_k,
    sb_b,
    sb_l,
    sb_k,
    sc_b,
    sc_l,
    sc_k,
    sy_b,
    sy_l,
    sy_k,
    N: tl.constexpr,
    BD: tl.constexpr,
    CK: tl.constexpr,
    U: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr,
    MODE: tl.constexpr,
):
    # MODE 0: one program walks the whole sequence (NSEG = 1, CPS = NC) from a zero state.
    # MODE 1: segment pass of the chunk-parallel scan: program (.., seg) walks its CPS chunks from a
    #         zero state and stores only its end state (hl) and the sum of its dt (sdt); no output.
    # MODE 2: replay: program (.., seg) starts from the true segment start state, which
    #         _ss2d_combine_kernel wrote into hc at chunk seg * CPS, and writes y (and hc if SAVE).
    pid_b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    pid_d = tl.program_id(2) // NSEG
    seg = tl.program_id(2) % NSEG
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_n = tl.arange(0, N)
    ch = k * D + offs_d
    # A arrives transposed, (N, 4D): channels contiguous, so every (BD, N) tile keeps a channel's N
    # states in one thread and the sums over N need no shuffles.
    A = tl.load(a_ptr + offs_n[None, :] * (4 * D) + ch[:, None], mask=dmask[:, None], other=0.0) * 1.4426950408889634
    if HAS_D:
        dsk = tl.load(dsk_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    u_base = u_ptr + pid_b * su_b + offs_d
    d_base = dl_ptr + pid_b * sd_b + k * sd_k + offs_d
    b_base = b_ptr + pid_b * sb_b + k * sb_k + offs_n
    c_base = c_ptr + pid_b * sc_b + k * sc_k + offs_n
    y_base = y_ptr + pid_b * sy_b + k * sy_k + offs_d
    hc_base = hc_ptr + ((pid_b * 4 + k) * NC) * D * N + offs_n[None, :] * D + offs_d[:, None]
    if MODE == 2:
        h = tl.load(hc_base + (seg * CPS) * D * N, mask=dmask[:, None], other=0.0)
    else:
        h = tl.zeros((BD, N), dtype=tl.float32)
    dt_sum = tl.zeros((BD,), dtype=tl.float32)
    jj = tl.arange(0, U)
    for ci in range(CPS):
        c = seg * CPS + ci
        if SAVE:
            tl.store(hc_base + c * D * N, h, mask=dmask[:, None])
        for s in range(CK // U):
            # The U outputs of this block are stored together after it: with no store between them,
            # the compiler issues the block's loads early instead of one memory round trip a token.
            ybuf = tl.zeros((BD, U), dtype=tl.float32)
            for j in tl.static_range(U):
                l = c * CK + s * U + j
                valid = l < L
                pos = scan_position(l, L, H, W, k)  # spatial place of step l
                m = dmask & valid
                u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    dt = dt + bias
                if SOFTPLUS:
                    dt = softplus(dt)
                dt = tl.where(m, dt, 0.0)
                nm = (offs_n < N) & valid
                bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                dA = tl.exp2(dt[:, None] * A)
                h = dA * h + (dt * u)[:, None] * bv[None, :]
                if MODE == 1:
                    dt_sum += dt
                else:
                    cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                    y = tl.sum(h * cv[None, :], axis=1)
                    if HAS_D:
                        y = y + dsk * u
                    ybuf = tl.where(jj[None, :] == j, y[:, None], ybuf)
            if MODE != 1:
                lv = c * CK + s * U + jj
                posv = scan_position(lv, L, H, W, k)
                tl.store(
                    y_base[:, None] + posv[None, :] * sy_l,
                    ybuf.to(y_ptr.dtype.element_ty),
                    mask=dmask[:, None] & (lv < L)[None, :],
                )
    if MODE == 1:
        sidx = (pid_b * 4 + k) * NSEG + seg
        tl.store(hl_ptr + sidx * D * N + offs_n[None, :] * D + offs_d[:, None], h, mask=dmask[:, None])
        tl.store(sdt_ptr + sidx * D + offs_d, dt_sum, mask=dmask)


def ss2d_scan_fwd(
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
    plan: ScanPlan,
) -> tuple[Tensor, Tensor]:
    """y (B, L, 4, D) and, with `save`, the chunk start states hc (B, 4, nc, N, D) fp32 for the backward."""
    require_triton(u)
    b, L, d = u.shape
    n = A.shape[1]
    if u.stride(2) != 1:
        u = u.contiguous()
    if delta.stride(3) != 1:
        delta = delta.contiguous()
    if Bs.stride(3) != 1:
        Bs = Bs.contiguous()
    if Cs.stride(3) != 1:
        Cs = Cs.contiguous()
    At = A.float().t().contiguous()  # (N, 4D)
    p = plan
    bd, ck, nseg, cps, nc = p.bd, p.ck, p.nseg, p.cps, p.nc
    nblk = triton.cdiv(d, bd)
    dev = u.device
    y = torch.empty((b, L, N_DIR, d), device=dev, dtype=u.dtype)
    chunked = nseg > 1
    hc = torch.empty((b, N_DIR, nc, n, d) if (save or chunked) else (1,), device=dev, dtype=torch.float32)
    dummy = At
    hl = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    sdt = torch.empty((b * N_DIR * nseg, d), device=dev, dtype=torch.float32) if chunked else dummy
    grid = (b, N_DIR, nblk * nseg)

    def launch(mode, save_states):
        _ss2d_fwd_kernel[grid](
            u,
            delta,
            Bs,
            Cs,
            At,
            Ds if Ds is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            y,
            hc,
            hl,
            sdt,
            L,
            h,
            w,
            d,
            nc,
            nseg,
            cps,
            u.stride(0),
            u.stride(1),
            delta.stride(0),
            delta.stride(1),
            delta.stride(2),
            Bs.stride(0),
            Bs.stride(1),
            Bs.stride(2),
            Cs.stride(0),
            Cs.stride(1),
            Cs.stride(2),
            y.stride(0),
            y.stride(1),
            y.stride(2),
            N=n,
            BD=bd,
            CK=ck,
            U=p.u_fwd,
            SOFTPLUS=delta_softplus,
            HAS_D=Ds is not None,
            HAS_BIAS=delta_bias is not None,
            SAVE=save_states,
            MODE=mode,
            num_warps=p.warps,
        )

    if not chunked:
        launch(0, save)
        return y, hc
    launch(1, False)
    ss2d_combine(hl, sdt, At, hc, b * N_DIR, d, n, nseg, nc * d * n, cps * d * n, bd, p.warps, reverse=False)
    launch(2, save)
    return y, (hc if save else hc.new_empty((1,)))
