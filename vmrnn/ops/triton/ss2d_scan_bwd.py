"""The backward kernel of the fused SS2D scan and its launcher (layout: `vmrnn.ops.ss2d_scan`).

Each CK-chunk restarts from its stored start state. A first walk through the chunk keeps the start state of
every SUB-token block; then, block by block from the end, the block's states are rebuilt into a per-program
scratch buffer of SUB states (small enough for the caches) and the program walks back through the block,
carrying the state adjoint. dB / dC are written per channel block and du per direction, and summed on the host
side (or, with the plan's `atomic`, added in place with fp32 atomics: fewer bytes, an order of the sums that
varies from run to run); dA / dD / dbias per (batch, segment), summed on the host side.
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
def _state_step(
    h,
    u_base,
    d_base,
    b_base,
    l,
    L,
    H,
    W,
    k,
    su_l,
    sd_l,
    sb_l,
    A,
    bias,
    dmask,
    offs_n,
    N: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """The state after scan step l of direction k: exp(dt A) h + dt u B, read at the token's spatial place."""
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
    bv = tl.load(b_base + pos * sb_l, mask=(offs_n < N) & valid, other=0.0).to(tl.float32)
    return tl.exp2(dt[:, None] * A) * h + (dt * u)[:, None] * bv[None, :]


@triton.jit
def _ss2d_bwd_kernel(
    u_ptr,
    dl_ptr,
    b_ptr,
    c_ptr,
    a_ptr,
    dsk_ptr,
    bias_ptr,
    hc_ptr,
    dy_ptr,
    du_ptr,
    ddl_ptr,
    dB_ptr,
    dC_ptr,
    dA_ptr,
    dD_ptr,
    dbias_ptr,
    scr_ptr,
    gl_ptr,
    sdt_ptr,
    gin_ptr,
    L,
    H,
    W,
    D,
    NC,
    NBLK,
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
    SUB: tl.constexpr,
    NSLOT: tl.constexpr,
    U: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    # MODE 0: one program walks the whole sequence back (NSEG = 1, CPS = NC).
    # MODE 1: segment pass of the chunk-parallel backward: program (.., seg) walks its segment back
    #         from a zero state adjoint and stores only the adjoint it carries out (gl) and sum(dt).
    # MODE 2: program (.., seg) walks its segment back from the true carried adjoint (gin, written
    #         by _ss2d_combine_kernel); dA / dD / dbias partials per (batch, segment).
    pid_b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    pid_d = tl.program_id(2) // NSEG
    seg = tl.program_id(2) % NSEG
    offs_d = pid_d * BD + tl.arange(0, BD)
    dmask = offs_d < D
    offs_n = tl.arange(0, N)
    ch = k * D + offs_d
    A_nat = tl.load(a_ptr + offs_n[None, :] * (4 * D) + ch[:, None], mask=dmask[:, None], other=0.0)
    A = A_nat * 1.4426950408889634
    if HAS_D:
        dsk = tl.load(dsk_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BD,), dtype=tl.float32)
    u_base = u_ptr + pid_b * su_b + offs_d
    d_base = dl_ptr + pid_b * sd_b + k * sd_k + offs_d
    b_base = b_ptr + pid_b * sb_b + k * sb_k + offs_n
    c_base = c_ptr + pid_b * sc_b + k * sc_k + offs_n
    dy_base = dy_ptr + pid_b * sy_b + k * sy_k + offs_d
    # ddelta: contiguous (B, L, 4, D).
    ddl_base = ddl_ptr + pid_b * L * 4 * D + k * D + offs_d
    if ATOMIC:
        # du (B, L, D) and dB, dC (B, L, 4, N), fp32, zeroed: the directions and channel blocks add into them
        du_base = du_ptr + pid_b * L * D + offs_d
        du_sl = D
        dB_base = dB_ptr + pid_b * L * 4 * N + k * N + offs_n
        dC_base = dC_ptr + pid_b * L * 4 * N + k * N + offs_n
        dbc_sl = 4 * N
    else:
        # du per direction: contiguous (B, L, 4, D); dB, dC partials per channel block: (B, L, 4, NBLK, N) fp32
        du_base = du_ptr + pid_b * L * 4 * D + k * D + offs_d
        du_sl = 4 * D
        dB_base = dB_ptr + pid_b * L * 4 * NBLK * N + k * NBLK * N + pid_d * N + offs_n
        dC_base = dC_ptr + pid_b * L * 4 * NBLK * N + k * NBLK * N + pid_d * N + offs_n
        dbc_sl = 4 * NBLK * N
    hc_base = hc_ptr + ((pid_b * 4 + k) * NC) * D * N + offs_n[None, :] * D + offs_d[:, None]
    prog = ((pid_b * 4 + k) * NBLK + pid_d) * NSEG + seg
    # scratch per program (NSLOT states): SUB rebuilt states, then (SUB < CK) the CK // SUB block start states
    scr_base = scr_ptr + prog * (NSLOT * BD * N) + offs_n[None, :] * BD + tl.arange(0, BD)[:, None]
    ckp_base = scr_base + SUB * (BD * N)
    scr3 = scr_base[:, :, None]
    uu = tl.arange(0, U)
    sidx = (pid_b * 4 + k) * NSEG + seg
    off2 = offs_n[None, :] * D + offs_d[:, None]

    if MODE == 2:
        g_carry = tl.load(gin_ptr + sidx * D * N + off2, mask=dmask[:, None], other=0.0)
    else:
        g_carry = tl.zeros((BD, N), dtype=tl.float32)  # dA_{l+1} * dL/dh_{l+1}
    if MODE == 1:
        dt_sum = tl.zeros((BD,), dtype=tl.float32)
        for cc in range(CPS):
            c = seg * CPS + CPS - 1 - cc
            for ss in range(CK // U):
                s = CK // U - 1 - ss
                for jj in tl.static_range(U):
                    j = U - 1 - jj
                    l = c * CK + s * U + j
                    valid = l < L
                    pos = scan_position(l, L, H, W, k)  # spatial place of step l
                    m = dmask & valid
                    dt = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                    if HAS_BIAS:
                        dt = dt + bias
                    if SOFTPLUS:
                        dt = softplus(dt)
                    dt = tl.where(m, dt, 0.0)
                    nm = (offs_n < N) & valid
                    cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                    dy = tl.load(dy_base + pos * sy_l, mask=m, other=0.0).to(tl.float32)
                    g_carry = tl.exp2(dt[:, None] * A) * (g_carry + cv[None, :] * dy[:, None])
                    dt_sum += dt
        tl.store(gl_ptr + sidx * D * N + off2, g_carry, mask=dmask[:, None])
        tl.store(sdt_ptr + sidx * D + offs_d, dt_sum, mask=dmask)
    else:
        dA_acc = tl.zeros((BD, N), dtype=tl.float32)
        dD_acc = tl.zeros((BD,), dtype=tl.float32)
        db_acc = tl.zeros((BD,), dtype=tl.float32)
        for cc in range(CPS):
            c = seg * CPS + CPS - 1 - cc
            h = tl.load(hc_base + c * D * N, mask=dmask[:, None], other=0.0)
            if SUB < CK:
                # 0) walk the chunk from its stored start state, keeping every SUB-block's start state: the
                #    rebuilt states then go through the scratch a block at a time (a short reuse distance)
                for sb in range(CK // SUB):
                    tl.store(ckp_base + sb * (BD * N), h)
                    for s in range(SUB // U):
                        for j in tl.static_range(U):
                            l = c * CK + sb * SUB + s * U + j
                            h = _state_step(
                                h,
                                u_base,
                                d_base,
                                b_base,
                                l,
                                L,
                                H,
                                W,
                                k,
                                su_l,
                                sd_l,
                                sb_l,
                                A,
                                bias,
                                dmask,
                                offs_n,
                                N,
                                SOFTPLUS,
                                HAS_BIAS,
                            )
                tl.debug_barrier()
            for sbr in range(CK // SUB):
                sb = CK // SUB - 1 - sbr
                l0 = c * CK + sb * SUB
                if SUB < CK:
                    h = tl.load(ckp_base + sb * (BD * N))
                # 1) rebuild the block's states from its start state (stores batched per U tokens, so the
                #    block's loads are not held behind them)
                for s in range(SUB // U):
                    hbuf = tl.zeros((BD, N, U), dtype=tl.float32)
                    for j in tl.static_range(U):
                        h = _state_step(
                            h,
                            u_base,
                            d_base,
                            b_base,
                            l0 + s * U + j,
                            L,
                            H,
                            W,
                            k,
                            su_l,
                            sd_l,
                            sb_l,
                            A,
                            bias,
                            dmask,
                            offs_n,
                            N,
                            SOFTPLUS,
                            HAS_BIAS,
                        )
                        hbuf = tl.where(uu[None, None, :] == j, h[:, :, None], hbuf)
                    tl.store(scr3 + (s * U + uu)[None, None, :] * (BD * N), hbuf)
                tl.debug_barrier()
                # 2) walk back through the block (outputs batched per U tokens, as above)
                for ss in range(SUB // U):
                    s = SUB // U - 1 - ss
                    dubuf = tl.zeros((BD, U), dtype=tl.float32)
                    ddbuf = tl.zeros((BD, U), dtype=tl.float32)
                    dBbuf = tl.zeros((N, U), dtype=tl.float32)
                    dCbuf = tl.zeros((N, U), dtype=tl.float32)
                    for jj in tl.static_range(U):
                        j = U - 1 - jj
                        l = l0 + s * U + j
                        valid = l < L
                        pos = scan_position(l, L, H, W, k)  # spatial place of step l
                        m = dmask & valid
                        u = tl.load(u_base + pos * su_l, mask=m, other=0.0).to(tl.float32)
                        draw = tl.load(d_base + pos * sd_l, mask=m, other=0.0).to(tl.float32)
                        if HAS_BIAS:
                            draw = draw + bias
                        if SOFTPLUS:
                            dt = softplus(draw)
                        else:
                            dt = draw
                        dt = tl.where(m, dt, 0.0)
                        nm = (offs_n < N) & valid
                        bv = tl.load(b_base + pos * sb_l, mask=nm, other=0.0).to(tl.float32)
                        cv = tl.load(c_base + pos * sc_l, mask=nm, other=0.0).to(tl.float32)
                        dy = tl.load(dy_base + pos * sy_l, mask=m, other=0.0).to(tl.float32)
                        dA = tl.exp2(dt[:, None] * A)
                        hl = tl.load(scr_base + (s * U + j) * BD * N)
                        g = g_carry + cv[None, :] * dy[:, None]
                        dtu = dt * u
                        hp = hl - dtu[:, None] * bv[None, :]  # = dA_l * h_{l-1}, no division
                        ghp = g * hp
                        gb = tl.sum(g * bv[None, :], axis=1)
                        ddt = tl.sum(ghp * A_nat, axis=1) + gb * u
                        dA_acc += ghp * dt[:, None]
                        du = gb * dt
                        if HAS_D:
                            du += dsk * dy
                            dD_acc += dy * u
                        dBp = tl.sum(g * dtu[:, None], axis=0)
                        dCp = tl.sum(hl * dy[:, None], axis=0)
                        if SOFTPLUS:
                            ddt = ddt * tl.sigmoid(draw)
                        ddt = tl.where(m, ddt, 0.0)
                        db_acc += ddt
                        sel = uu[None, :] == j
                        dubuf = tl.where(sel, du[:, None], dubuf)
                        ddbuf = tl.where(sel, ddt[:, None], ddbuf)
                        dBbuf = tl.where(sel, dBp[:, None], dBbuf)
                        dCbuf = tl.where(sel, dCp[:, None], dCbuf)
                        g_carry = dA * g
                    lv = l0 + s * U + uu
                    posv = scan_position(lv, L, H, W, k)
                    vm = (lv < L)[None, :]
                    om = dmask[:, None] & vm
                    tl.store(ddl_base[:, None] + posv[None, :] * (4 * D), ddbuf.to(ddl_ptr.dtype.element_ty), mask=om)
                    nmv = (offs_n < N)[:, None] & vm
                    if ATOMIC:
                        tl.atomic_add(du_base[:, None] + posv[None, :] * du_sl, dubuf, mask=om, sem="relaxed")
                        tl.atomic_add(dB_base[:, None] + posv[None, :] * dbc_sl, dBbuf, mask=nmv, sem="relaxed")
                        tl.atomic_add(dC_base[:, None] + posv[None, :] * dbc_sl, dCbuf, mask=nmv, sem="relaxed")
                    else:
                        dus = dubuf.to(du_ptr.dtype.element_ty)
                        tl.store(du_base[:, None] + posv[None, :] * du_sl, dus, mask=om)
                        tl.store(dB_base[:, None] + posv[None, :] * dbc_sl, dBbuf, mask=nmv)
                        tl.store(dC_base[:, None] + posv[None, :] * dbc_sl, dCbuf, mask=nmv)
                tl.debug_barrier()
        pb = pid_b * NSEG + seg  # partials per (batch, segment), summed on the host side
        tl.store(dA_ptr + pb * 4 * D * N + offs_n[None, :] * (4 * D) + ch[:, None], dA_acc, mask=dmask[:, None])
        if HAS_D:
            tl.store(dD_ptr + pb * 4 * D + ch, dD_acc, mask=dmask)
        if HAS_BIAS:
            tl.store(dbias_ptr + pb * 4 * D + ch, db_acc, mask=dmask)


def ss2d_scan_bwd(
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
    plan: ScanPlan,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """du, ddelta, dA (4D, N) fp32, dB, dC, dD, dbias from the forward's states hc (same `plan`)."""
    require_triton(u)
    b, L, d = u.shape
    n = A.shape[1]
    u = u if u.stride(2) == 1 else u.contiguous()
    delta = delta if delta.stride(3) == 1 else delta.contiguous()
    Bs = Bs if Bs.stride(3) == 1 else Bs.contiguous()
    Cs = Cs if Cs.stride(3) == 1 else Cs.contiguous()
    dy = dy if dy.stride(3) == 1 else dy.contiguous()
    At = A.float().t().contiguous()  # (N, 4D)
    p = plan
    bd, ck, nseg, cps, nc = p.bd, p.ck, p.nseg, p.cps, p.nc
    nblk = triton.cdiv(d, bd)
    dev = u.device
    ddl = torch.empty((b, L, N_DIR, d), device=dev, dtype=delta.dtype)
    if p.atomic:
        du = torch.zeros((b, L, d), device=dev, dtype=torch.float32)
        dBp = torch.zeros((b, L, N_DIR, n), device=dev, dtype=torch.float32)
        dCp = torch.zeros((b, L, N_DIR, n), device=dev, dtype=torch.float32)
    else:
        du = torch.empty((b, L, N_DIR, d), device=dev, dtype=u.dtype)
        dBp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
        dCp = torch.empty((b, L, N_DIR, nblk, n), device=dev, dtype=torch.float32)
    dAp = torch.empty((b * nseg, n, N_DIR * d), device=dev, dtype=torch.float32)
    dDp = torch.empty((b * nseg, N_DIR * d), device=dev, dtype=torch.float32)
    dbp = torch.empty((b * nseg, N_DIR * d), device=dev, dtype=torch.float32)
    nslot = p.sub + ck // p.sub if p.sub < ck else p.sub  # rebuilt states, then the block start states
    scr = torch.empty((b * N_DIR * nblk * nseg, nslot, n, bd), device=dev, dtype=torch.float32)
    dummy = At
    chunked = nseg > 1
    gl = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    gin = torch.empty((b * N_DIR * nseg, n, d), device=dev, dtype=torch.float32) if chunked else dummy
    sdt = torch.empty((b * N_DIR * nseg, d), device=dev, dtype=torch.float32) if chunked else dummy
    grid = (b, N_DIR, nblk * nseg)

    def launch(mode):
        _ss2d_bwd_kernel[grid](
            u,
            delta,
            Bs,
            Cs,
            At,
            Ds if Ds is not None else dummy,
            delta_bias if delta_bias is not None else dummy,
            hc,
            dy,
            du,
            ddl,
            dBp,
            dCp,
            dAp,
            dDp,
            dbp,
            scr,
            gl,
            sdt,
            gin,
            L,
            h,
            w,
            d,
            nc,
            nblk,
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
            dy.stride(0),
            dy.stride(1),
            dy.stride(2),
            N=n,
            BD=bd,
            CK=ck,
            SUB=p.sub,
            NSLOT=nslot,
            U=p.u_bwd,
            SOFTPLUS=delta_softplus,
            HAS_D=Ds is not None,
            HAS_BIAS=delta_bias is not None,
            MODE=mode,
            ATOMIC=bool(p.atomic),
            num_warps=p.warps,
        )

    if chunked:
        launch(1)
        ss2d_combine(gl, sdt, At, gin, b * N_DIR, d, n, nseg, nseg * d * n, d * n, bd, p.warps, reverse=True)
        launch(2)
    else:
        launch(0)
    if p.atomic:
        du, dB, dC = du.to(u.dtype), dBp.to(Bs.dtype), dCp.to(Cs.dtype)
    else:
        du = du.sum(2, dtype=torch.float32).to(u.dtype)
        dB = dBp.sum(3).to(Bs.dtype)
        dC = dCp.sum(3).to(Cs.dtype)
    return du, ddl, dAp.sum(0).t().contiguous(), dB, dC, dDp.sum(0), dbp.sum(0)
